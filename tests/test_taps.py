"""Depth probing (tuneflow.training.taps): which tap a frozen-backbone head reads, on a bounded,
stratified sample, chosen once per run and kept on resume."""
import numpy as np
import pytest

import tuneflow.recipes as registry
from conftest import fast_overrides as _fast, make_image_folder
from tuneflow import finetune


def test_small_different_probes_every_tap(tmp_path, tiny_folder):
    res = finetune("small_different", tiny_folder, tmp_path / "r", overrides=_fast("small_different"),
                   verbose=0, export=False)
    from tuneflow.backbones import get_spec
    assert set(res.report["taps"]) == set(get_spec("efficientnet_lite0").taps)
    assert res.report["tap"] in res.report["taps"]


def test_the_depth_probe_looks_at_a_stratified_sample_of_a_large_set(tmp_path, monkeypatch, caplog):
    """Above PROBE_MAX_* images the probe ranks depths on a seeded, class-stratified sample (memory
    and time bounded by the sample, not the data); the run still trains and reports on everything."""
    from tuneflow.training import taps as taps_mod
    monkeypatch.setattr(taps_mod, "PROBE_MAX_TRAIN", 9)
    monkeypatch.setattr(taps_mod, "PROBE_MAX_VAL", 4)
    seen = []
    real = taps_mod._probe_scores
    monkeypatch.setattr(taps_mod, "_probe_scores", lambda plan, xtr, ytr, xva, yva: (
        seen.append((len(xtr), np.bincount(ytr, minlength=3).tolist(), len(xva))),
        real(plan, xtr, ytr, xva, yva))[1])
    data = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=12)
    with caplog.at_level("INFO", logger="tuneflow"):
        res = finetune("small_different", data, tmp_path / "r", overrides=_fast("small_different"), verbose=0,
                       export=False)
    n_train, n_val = res.report["num_train"], res.report["num_val"]
    assert n_train > 9 and n_val > 4
    assert f"of {n_train} training and" in caplog.text and f"of {n_val} validation images" in caplog.text
    for n_tr, per_class, n_va in seen:  # one probe per tap, each on the same small sample
        assert n_tr <= 9 + 3 and min(per_class) >= 1 and n_va <= 4 + 3
    assert len(seen) == len(res.report["taps"]) > 1


def test_a_resumed_run_keeps_its_stored_tap_and_never_probes_again(monkeypatch):
    import tensorflow as tf
    from tuneflow.training import taps as taps_mod
    from tuneflow.training.plan import Plan
    bundle = type("B", (), {"classes": ["a", "b"], "train": type("S", (), {"y": np.array([0, 1] * 4)})()})()
    plan = Plan.make(registry.get("small_different").override(**_fast("small_different")), bundle, tf.distribute.get_strategy(), "float32")
    taps = plan.taps()
    assert len(taps) > 1

    def probe(*a, **k):
        raise AssertionError("probed although a stored tap was given")
    monkeypatch.setattr(taps_mod, "probe_taps", probe)
    assert taps_mod.choose_tap(plan, bundle, None, {}, stored=taps[-1]) == taps[-1]
    with pytest.raises(AssertionError, match="probed"):  # a stored tap the plan lacks is probed for
        taps_mod.choose_tap(plan, bundle, None, {}, stored="no_such_layer")


def test_probe_sample_keeps_small_splits_whole_and_every_class_of_large_ones():
    from tuneflow.data.sources import Split
    from tuneflow.training.taps import probe_sample
    y = np.array([0] * 90 + [1] * 9 + [2] * 1, np.int32)
    split = Split(np.zeros((100, 2, 2, 3), np.uint8), y, [f"f{i}" for i in range(100)])
    assert probe_sample(split, 3, 100, 0) is split
    a, b = probe_sample(split, 3, 20, 0), probe_sample(split, 3, 20, 0)
    assert 18 <= len(a) <= 23 and np.bincount(a.y, minlength=3).min() >= 1
    assert a.files == b.files  # seeded: the same sample every time (the cache key depends on it)
    assert probe_sample(split, 3, 20, 1).files != a.files
