import json
import re

import keras
import numpy as np
import pytest

import tuneflow.recipes as registry
from conftest import make_image_folder, random_lite0_weights
from tuneflow import build_backbone, finetune, save_backbone
from tuneflow.features import cache as fcache
from tuneflow.training.distribute import choose_precision
from tuneflow.training.heads import choose_norm
from tuneflow.runs.folder import RunExistsError

FAST = {"input_size": 32, "backbone": "efficientnet_lite0", "weights": random_lite0_weights(), "batch_size": 8, "precision": "float32"}


def _fast(recipe_name, **extra):
    r = registry.get(recipe_name)
    kw = dict(FAST)
    for s in r.stages:
        kw[f"{s.name}__epochs"] = 1
    kw.update(extra)
    return kw


@pytest.mark.parametrize("name", registry.NAMES)
def test_every_recipe_runs_each_stage_and_writes_a_readable_run(tmp_path, tiny_folder, name):
    res = finetune(name, tiny_folder, tmp_path / "run", overrides=_fast(name), verbose=0)
    run = res.run_dir
    for f in ("recipe.json", "metrics.csv", "curves.png", "confusion.png", "report.json",
              "report.md", "model.keras", "backbone.weights.h5", "run.json"):
        assert (run / f).exists(), f
    rep = json.loads((run / "report.json").read_text())
    for k in ("val_accuracy", "val_loss", "wall_seconds", "recipe", "backbone", "num_train",
              "num_val", "classes", "per_class", "verdict", "global_batch"):
        assert k in rep
    assert [s["name"] for s in rep["stages"]] == [s.name for s in registry.get(name).stages]
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("stage,epoch,loss,accuracy,val_loss,val_accuracy,lr")
    assert len(rows) - 1 == len(registry.get(name).stages)
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    # the saved model takes raw pixels and reproduces the reported accuracy's predictions
    model = keras.saving.load_model(run / "model.keras")
    assert model.predict(np.zeros((1, 32, 32, 3), np.uint8), verbose=0).shape == (1, 2)


def test_small_different_probes_every_tap(tmp_path, tiny_folder):
    res = finetune("small_different", tiny_folder, tmp_path / "r", overrides=_fast("small_different"),
                   verbose=0)
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
        res = finetune("small_different", data, tmp_path / "r", overrides=_fast("small_different"), verbose=0)
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
    plan = Plan.make(registry.get("small_different").override(**FAST), bundle, tf.distribute.get_strategy(), "float32")
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


def test_batchnorm_statistics_stay_frozen_while_fine_tuning(tmp_path, tiny_folder):
    # pretrained-style weights from a file, so that freeze_bn applies (from scratch BN must learn)
    src = build_backbone("efficientnet_lite0", weights=None, input_size=32)
    for layer in src.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.random.default_rng(0).normal(size=layer.moving_mean.shape))
    save_backbone(src, tmp_path / "w")
    res = finetune("large_similar", tiny_folder, tmp_path / "r", verbose=0,
                   overrides={**_fast("large_similar"), "weights": str(tmp_path / "w"), "finetune__lr": 0.05})
    # the last checkpoint is the end of fine-tuning (the final model may be the head stage's best)
    from tuneflow.runs.checkpoints import restore_model
    after = res.model  # the Keras model as trained, its backbone's layers at the top level
    restore_model(after, res.run_dir / "checkpoints" / "last")
    changed_conv = False
    after_layers = {layer.name: layer for layer in after.layers}
    for a in src.layers:
        b = after_layers.get(a.name)
        if b is None:
            continue
        if isinstance(a, keras.layers.BatchNormalization):
            for va, vb in zip(a.weights, b.weights):
                np.testing.assert_array_equal(np.asarray(va), np.asarray(vb), err_msg=a.name)
        elif a.name.startswith("top_conv"):
            changed_conv = not np.array_equal(np.asarray(a.kernel), np.asarray(b.kernel))
    assert changed_conv, "the unfrozen top block should have trained"


def test_class_weights_reach_the_loss():
    from tuneflow.data import Split
    from tuneflow.data.pipeline import class_weights, train_dataset
    rng = np.random.default_rng(0)
    y = np.array([0] * 18 + [1] * 2)
    x = rng.integers(0, 3, (20, 4, 4, 3)).astype(np.uint8)  # small inputs: no saturated softmax
    w = class_weights(y, 2, "balanced")
    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    probs = model.predict(x.astype(np.float32), verbose=0)
    per = -np.log(probs[np.arange(20), y])
    ds = train_dataset(Split(x, y), 20, weights=w)
    weighted = model.fit(ds, epochs=1, verbose=0).history["loss"][0]
    plain = model.fit(train_dataset(Split(x, y), 20), epochs=1, verbose=0).history["loss"][0]
    np.testing.assert_allclose(weighted, np.sum(w[y] * per) / 20, rtol=1e-4)
    np.testing.assert_allclose(plain, per.mean(), rtol=1e-4)
    assert abs(weighted - plain) > 1e-3


def test_imbalanced_run_reports_per_class_metrics(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class={"a": 24, "b": 6})
    res = finetune("small_similar", root, tmp_path / "r", verbose=0,
                   overrides={**_fast("small_similar"), "class_weight": "balanced"})
    assert set(res.report["per_class"]) == {"a", "b"}
    assert res.report["train_counts"]["a"] > res.report["train_counts"]["b"]


def test_feature_cache_is_reused_and_invalidated(tmp_path, tiny_folder):
    ov = _fast("small_similar")
    finetune("small_similar", tiny_folder, tmp_path / "r1", overrides=ov, verbose=0)
    n = len(list(fcache.cache_root().glob("*.npy")))
    finetune("small_similar", tiny_folder, tmp_path / "r2", overrides=ov, verbose=0)
    assert len(list(fcache.cache_root().glob("*.npy"))) == n  # reused
    finetune("small_similar", tiny_folder, tmp_path / "r3", overrides={**ov, "input_size": 40}, verbose=0)
    assert len(list(fcache.cache_root().glob("*.npy"))) == n + 2  # new size -> new train+val entries
    base = dict(backbone="b", weights="w", size=32, tap=None, data="d")
    k = fcache.cache_key(**base)
    for field, value in [("backbone", "c"), ("weights", "v"), ("size", 40), ("tap", "x"), ("data", "e")]:
        assert fcache.cache_key(**{**base, field: value}) != k
    from tuneflow.data import load_data
    b = load_data(tiny_folder, 32)
    f0 = b.fingerprint()
    b.train.x[0, 0, 0, 0] ^= 1
    assert b.fingerprint() != f0


def test_existing_run_is_refused_unless_overwrite(tmp_path, tiny_folder):
    ov = _fast("small_similar")
    finetune("small_similar", tiny_folder, tmp_path / "r", overrides=ov, verbose=0)
    with pytest.raises(RunExistsError, match="--resume .*--overwrite"):
        finetune("small_similar", tiny_folder, tmp_path / "r", overrides=ov, verbose=0)
    finetune("small_similar", tiny_folder, tmp_path / "r", overrides=ov, verbose=0, overwrite=True)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(RunExistsError, match="not a tuneflow run"):
        finetune("small_similar", tiny_folder, other, overrides=ov, verbose=0, overwrite=True)
    assert (other / "thesis.tex").exists()


def test_failed_fresh_run_leaves_nothing_behind(tmp_path, tiny_folder, monkeypatch):
    from tuneflow.training import stages
    boom = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))  # noqa: E731
    monkeypatch.setattr(stages, "cached_features", boom)
    with pytest.raises(RuntimeError, match="boom"):
        finetune("small_similar", tiny_folder, tmp_path / "r", overrides=_fast("small_similar"), verbose=0)
    assert not (tmp_path / "r").exists()


def test_failure_after_a_checkpoint_keeps_the_run_for_resume(tmp_path, tiny_folder, monkeypatch):
    from tuneflow.fit import one_run as train
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        finetune("small_similar", tiny_folder, tmp_path / "r", overrides=_fast("small_similar"), verbose=0)
    status = json.loads((tmp_path / "r" / "run.json").read_text())
    assert status["status"] == "failed" and "boom" in status["error"]


def test_bad_data_fails_before_a_run_folder_exists(tmp_path):
    from tuneflow.data import DataError
    with pytest.raises(DataError, match="does not exist"):
        finetune("small_similar", tmp_path / "nope", tmp_path / "r", overrides=FAST, verbose=0)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("seed", [0, 1])
def test_nan_loss_stops_training_with_a_diagnosis(tmp_path, tiny_folder, seed):
    # Divergence by construction, whatever the seed: plain SGD at lr=10 with an L2 penalty of 1e6
    # multiplies the head's kernel by about -2e7 every step, so it overflows within ~6 steps
    # (the head stage runs ~30).
    ov = {**_fast("large_different"), "seed": seed, "clipnorm": 0.0, "l2": 1e6, "head__epochs": 10,
          "head_solver": "sgd",
          "head__lr": 10.0, "head__optimizer": "sgd", "head__schedule": "constant", "head__patience": 0}
    res = finetune("large_different", tiny_folder, tmp_path / "r", overrides=ov, verbose=0)
    note = res.report["nan"]
    assert note is not None, "training did not diverge: the NaN path was not exercised"
    assert "'head' produced a NaN/inf loss" in note
    assert "learning rate 10 is high" in note and "clipnorm" in note and "L1/L2 penalty (1e+06)" in note
    assert res.report["stages"][0]["epochs_run"] < 10  # stopped, not run to the end
    assert len(res.report["stages"]) == 1  # and the later stage was not started
    assert json.loads((res.run_dir / "run.json").read_text())["status"] == "finished"


def test_a_diverging_stage_is_named_in_the_report_and_not_kept(tmp_path, tiny_folder):
    """A real divergence (plain SGD at lr 1 on the top blocks: the training loss climbs from ~0.002
    to thousands): the model keeps the head's weights, and the report names the stage, its losses
    and what to do, beside which weights the model holds."""
    # Real ImageNet weights (offline Lite0): the head fits at once and the fine-tuning's first epoch
    # is still near it; random weights blow up within the first epoch, where no curve shows it.
    ov = {**_fast("large_similar"), "weights": "imagenet", "finetune__epochs": 4, "finetune__lr": 1.0,
          "finetune__patience": 0,
          "finetune__optimizer": "sgd", "finetune__schedule": "constant", "clipnorm": 0.0}
    res = finetune("large_similar", tiny_folder, tmp_path / "r", overrides=ov, verbose=0)
    rep = res.report
    assert rep["nan"] is None  # finite: not the NaN path
    head, ft = rep["stage_health"]
    assert ft["diverged"] and not head["diverged"], [(h["first_loss"], h["max_loss"]) for h in rep["stage_health"]]
    assert ft["max_loss"] > 3 * ft["first_loss"] and ft["epochs"] == 4
    assert rep["model_from"]["stage"] == "head" and rep["model_from"]["epoch"] == "end"
    assert "Stage 'finetune' diverged" in rep["advice"] and "not kept (the model is from stage 'head')" in rep["advice"]
    assert f"tuneflow lr-find large_similar --data {tiny_folder} --stage 1" in rep["advice"]
    md = (res.run_dir / "report.md").read_text()
    assert "**diverged**" in md and "- model: the best validated weights, from stage 'head' (its end)" in md


@pytest.mark.parametrize("opt", ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "adamw"])
@pytest.mark.parametrize("schedule", ["constant", "step", "exponential", "inverse_time", "cosine", "warmup_cosine", "one_cycle", "plateau"])
def test_optimizer_and_schedule_registry(opt, schedule):
    from tuneflow.training.optim import current_lr, make_optimizer
    from tuneflow.recipe import Stage
    stage = Stage("s", epochs=4, optimizer=opt, lr=0.1, schedule=schedule, warmup_epochs=1)
    o = make_optimizer(stage, 0.1, steps_per_epoch=10, clipnorm=5.0)
    assert o.global_clipnorm == 5.0
    lr0 = current_lr(o)
    assert 0 < lr0 <= 0.1 + 1e-6
    if schedule == "warmup_cosine":
        assert lr0 == pytest.approx(0.001)
    if schedule == "one_cycle":
        assert lr0 == pytest.approx(0.1 / 25, rel=1e-5)


def test_one_cycle_rises_to_the_peak_then_anneals():
    """fastai's shape: lr/25 at the start, the peak at 25% of the steps, lr/1e5 at the end, and
    monotone on each side; it survives a save/load round trip (resumable checkpoints)."""
    import keras
    from tuneflow.training.optim import OneCycle, make_schedule
    from tuneflow.recipe import Stage
    sched = make_schedule(Stage("s", epochs=4, lr=0.01, schedule="one_cycle"), 0.01, steps_per_epoch=25)
    assert isinstance(sched, OneCycle) and sched.total_steps == 100
    lrs = np.array([float(sched(i)) for i in range(101)])
    assert lrs[0] == pytest.approx(0.01 / 25, rel=1e-5) and lrs.max() == pytest.approx(0.01, rel=1e-5) and lrs.argmax() == 25
    assert lrs[100] == pytest.approx(0.01 / 1e5, rel=1e-3)
    assert (np.diff(lrs[:26]) > 0).all() and (np.diff(lrs[25:]) < 0).all()
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(sched))
    assert [float(again(i)) for i in (0, 25, 60)] == pytest.approx([lrs[0], lrs[25], lrs[60]], rel=1e-5)


def test_one_cycle_edges_warmup_and_a_resumed_optimizer():
    import keras
    from tuneflow.training.optim import OneCycle, current_lr, make_optimizer, make_schedule
    from tuneflow.recipe import Stage
    assert float(OneCycle(0.01, 1)(0)) == pytest.approx(0.01, rel=1e-5)  # a 1-step stage runs at the peak
    flat = OneCycle(0.01, 100, pct_start=0.0)  # no rise: starts at the peak and anneals
    assert float(flat(0)) == pytest.approx(0.01, rel=1e-5) and float(flat(100)) == pytest.approx(1e-7, rel=1e-3)
    for bad, msg in (({"pct_start": 1.5}, "pct_start=1.5 must lie in [0, 1]"), ({"div": 0}, "must be positive")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            OneCycle(0.01, 100, **bad)
    # warmup_epochs sets the rise: 2 of 4 epochs -> the peak at step 20 of 40 (the default 25% would be step 10)
    sched = make_schedule(Stage("s", epochs=4, lr=0.01, schedule="one_cycle", warmup_epochs=2), 0.01, 10)
    lrs = [float(sched(i)) for i in range(41)]
    assert int(np.argmax(lrs)) == 20 and sched.pct_start == 0.5
    # A resumed stage rebuilds its optimizer and restores `iterations`: the LR is the schedule's at that step.
    st = Stage("s", epochs=4, optimizer="adam", lr=0.01, schedule="one_cycle")
    opt = make_optimizer(st, 0.01, steps_per_epoch=10)
    opt.build([keras.Variable(np.zeros(2, np.float32))])
    opt.iterations.assign(17)
    assert current_lr(opt) == pytest.approx(float(OneCycle(0.01, 40)(17)), rel=1e-5)


def test_norm_and_precision_choices():
    assert choose_norm("auto", 32) == "batch" and choose_norm("auto", 4) == "instance"
    assert choose_norm("group", 32) == "group"
    assert choose_precision("float32") == "float32"


def test_precision_auto_follows_the_cpu(monkeypatch):
    """``auto`` is bfloat16 exactly where the CPU computes it (on a machine without a GPU), both ways
    on any CPU (``TUNEFLOW_CPU_BF16`` stands in for the hardware)."""
    import tensorflow as tf
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("auto follows the GPU here")
    monkeypatch.setenv("TUNEFLOW_CPU_BF16", "1")
    assert choose_precision("auto") == "mixed_bfloat16"
    monkeypatch.setenv("TUNEFLOW_CPU_BF16", "0")
    assert choose_precision("auto") == "float32"
    monkeypatch.delenv("TUNEFLOW_CPU_BF16")
    flags = open("/proc/cpuinfo").read()
    assert (choose_precision("auto") == "mixed_bfloat16") == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.parametrize("head, norm", [("conv", "instance"), ("mlp", "batch"), ("conv", "group")])
def test_heads_and_norms_train(tmp_path, tiny_folder, head, norm):
    res = finetune("small_similar", tiny_folder, tmp_path / "r", verbose=0,
                   overrides={**_fast("small_similar"), "head": head, "norm": norm, "spatial_dropout": 0.1})
    assert res.report["norm"] == norm


def test_replace_backbone_bn_with_instance_norm(tmp_path, tiny_folder):
    res = finetune("large_different", tiny_folder, tmp_path / "r", verbose=0,
                   overrides={**_fast("large_different"), "replace_backbone_bn": "instance"})
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in res.model.layers)
    assert any(isinstance(layer, keras.layers.GroupNormalization) for layer in res.model.layers)
    assert res.report["val_accuracy"] >= 0


def test_kfold_reports_mean_and_spread(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=6)
    res = finetune("small_similar", root, tmp_path / "r", verbose=0, overrides={**_fast("small_similar"), "folds": 3})
    assert len(res.report["fold_val_accuracy"]) == 3 and "val_accuracy_std" in res.report
    assert (tmp_path / "r" / "fold-3" / "report.md").exists()


def test_no_export_reaches_every_fold(tmp_path):
    """--no-export (what search trials run) with folds: no fold and not the run writes model/;
    every fold reports training's own path."""
    root = make_image_folder(tmp_path / "d", per_class=6)
    res = finetune("small_similar", root, tmp_path / "r", verbose=0, export=False,
                   overrides={**_fast("small_similar"), "folds": 2})
    assert len(res.report["fold_val_accuracy"]) == 2
    for folder in (tmp_path / "r", tmp_path / "r" / "fold-1", tmp_path / "r" / "fold-2"):
        assert not (folder / "model").exists() and not (folder / "model.keras").exists()
    for i in (1, 2):
        rep = json.loads((tmp_path / "r" / f"fold-{i}" / "report.json").read_text())
        assert rep["evaluated"].startswith("no artifact") and rep["artifact_seconds"] is None


def test_numpy_arrays_in_a_notebook(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (40, 32, 32, 3)).astype(np.uint8)
    y = np.arange(40) % 2
    x[y == 1, 8:24, 8:24] = 255
    res = finetune(registry.get("small_similar"), (x, y), tmp_path / "r", overrides=_fast("small_similar"), verbose=0)
    assert res.report["data"] == "arrays"


def test_suggest_reads_size_and_similarity(tmp_path, monkeypatch):
    from tuneflow import suggest as sg
    small = make_image_folder(tmp_path / "s", per_class=10, size=48)
    big = make_image_folder(tmp_path / "b", per_class=30, size=48, seed=3)
    monkeypatch.setattr(sg, "LARGE_PER_CLASS", 20)
    a = sg.suggest(small, input_size=64, candidates=("efficientnet_lite0",))
    b = sg.suggest(big, input_size=64, candidates=("efficientnet_lite0",))
    assert a["recipe"].startswith("small_") and b["recipe"].startswith("large_")
    for r in (a, b):
        final, early = r["probe_accuracy"][r["final_tap"]], max(
            v for k, v in r["probe_accuracy"].items() if k != r["final_tap"])
        assert r["similar"] == (final >= early - sg.MARGIN)
        assert r["recipe"].endswith("similar" if r["similar"] else "different")


def test_suggest_names_the_cheapest_backbone_within_the_margin(monkeypatch):
    from tuneflow import suggest as sg
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 12)
    x = rng.integers(0, 60, (24, 48, 48, 3)).astype(np.float32)
    x[y == 1, 12:36, 12:36] = 230
    monkeypatch.setattr(sg, "BACKBONE_MARGIN", 1.0)  # any accuracy ties: the cheapest must win
    c = sg.choose_backbone(x, y, ("efficientnet_lite0", "efficientnet_lite1"))
    assert c["backbone"] == "efficientnet_lite0" and set(c["probes"]) == {"efficientnet_lite0", "efficientnet_lite1"}
    assert "cheapest" in c["reason"]
    monkeypatch.setattr(sg, "BACKBONE_MARGIN", 0.0)
    c = sg.choose_backbone(x, y, ("efficientnet_lite0", "efficientnet_lite1"), budget_seconds=0.0)
    assert list(c["probes"]) == ["efficientnet_lite0"] and "budget" in c["reason"]


def test_suggest_keeps_the_recipes_own_backbone_unless_another_probes_clearly_better():
    """`auto` must not swap a recipe's measured backbone (large_similar: Lite1 at 280 px) for one
    that merely ties on a small probe (one image's worth at this sample size counts as a tie), and
    must swap it for one clearly better, the cheapest such."""
    from tuneflow import suggest as sg
    assert registry.get("large_similar").backbone == "efficientnet_lite1"
    assert registry.get("small_similar").backbone == "efficientnet_lite0"

    def choice(acc, chosen, images=1000):
        names = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
        return {"backbone": chosen, "images": images, "reason": "r",
                "probes": {n: {"accuracy": a} for n, a in zip(names, acc)}}

    b, why = sg.prefer_recipe_backbone(choice((0.990, 0.992, 0.993), "efficientnet_lite0"), "large_similar")
    assert b == "efficientnet_lite1" and "keeps it" in why and "0.992" in why  # own within the margin
    b, why = sg.prefer_recipe_backbone(choice((0.990, 0.992, 0.993), "efficientnet_lite0"), "small_similar")
    assert b == "efficientnet_lite0" and why == ""  # own is the choice already
    # The cheapest within the margin of the best (Lite0) is only 0.001 above own: not a reason to
    # leave it; Lite2, 0.0055 above own, is, and it replaces it.
    b, why = sg.prefer_recipe_backbone(choice((0.9945, 0.9935, 0.999), "efficientnet_lite0"), "large_similar")
    assert b == "efficientnet_lite2" and "replaces it" in why and "0.999 vs 0.994" in why
    # Two of them clearly above own: the cheaper wins.
    b, _ = sg.prefer_recipe_backbone(choice((0.990, 0.970, 0.992), "efficientnet_lite0"), "large_similar")
    assert b == "efficientnet_lite0"
    # On 120 probed images one image is 0.0083: a 0.008 lead is a tie, a 0.017 lead is not.
    b, why = sg.prefer_recipe_backbone(choice((0.975, 0.967, 0.975), "efficientnet_lite0", 120), "large_similar")
    assert b == "efficientnet_lite1" and "0.008" in why
    b, _ = sg.prefer_recipe_backbone(choice((0.983, 0.967, 0.983), "efficientnet_lite0", 120), "large_similar")
    assert b == "efficientnet_lite0"
    # The budget stopped the probe before the recipe's own backbone: it stays, and the reason says so.
    b, why = sg.prefer_recipe_backbone({"backbone": "efficientnet_lite0", "reason": "r", "images": 120,
                                        "probes": {"efficientnet_lite0": {"accuracy": 0.9}}}, "large_similar")
    assert b == "efficientnet_lite1" and "not probed within the time budget" in why


def test_suggest_names_the_recipes_backbone_on_a_tie(tmp_path, monkeypatch):
    from tuneflow import suggest as sg
    big = make_image_folder(tmp_path / "b", per_class=30, size=48, seed=3)
    monkeypatch.setattr(sg, "LARGE_PER_CLASS", 20)
    monkeypatch.setattr(sg, "BACKBONE_MARGIN", 1.0)  # every probe ties: the cheapest, Lite0, is chosen
    monkeypatch.setattr(sg, "MARGIN", 1.0)  # the final layer always "wins": large_similar (Lite1)
    r = sg.suggest(big, input_size=64, candidates=("efficientnet_lite0", "efficientnet_lite1"))
    assert r["recipe"] == "large_similar"
    assert r["backbone"] == "efficientnet_lite1" and "keeps it" in r["backbone_reason"], r["backbone_reason"]
    assert r["probe_backbone"] == "efficientnet_lite0" and r["probe_size"] == 64  # what the taps' evidence came from
