"""The LR range test (tuneflow.training.lr_range; `tuneflow lr-find` prints it): restore, smoothers, rules, inconclusive curves, finetune's tap, CLI JSON, stages, lr=auto."""
import json
import logging
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import make_image_folder, random_lite0_weights
from tuneflow.cli import main
from tuneflow.errors import RecipeError
from tuneflow.training.lr_range import (BETA, inconclusive, lr_find, minimum_tenth, range_test, resolve_auto_lr,
                                        smooth, steepest, suggest, valley)

FAST = {"input_size": 32, "backbone": "efficientnet_lite0", "precision": "float32", "head_solver": "sgd"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("lrf") / "data", per_class=16)


def _batches(x, y, batch=8):
    while True:
        for b in range(0, len(y), batch):
            yield x[b:b + batch], y[b:b + batch]


def test_range_test_puts_model_and_optimizer_back_exactly():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 6)).astype("float32"), rng.integers(0, 3, 64)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.BatchNormalization(), keras.layers.Dense(3, activation="softmax")])
    opt = keras.optimizers.Adam(1e-3)
    model.compile(opt, "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)  # moments, iterations and BN statistics are not zero
    before = [v.numpy().copy() for v in model.variables + opt.variables]
    loss = keras.losses.SparseCategoricalCrossentropy()
    curve = range_test(model, opt, lambda t, p, sample_weight=None: loss(t, p, sample_weight=sample_weight),
                       _batches(x, y), 1e-5, 10.0, steps=60)
    assert len(curve["lrs"]) > 10 and curve["lrs"][1] > curve["lrs"][0]
    after = [v.numpy() for v in model.variables + opt.variables]
    assert len(before) == len(after)
    for b, a in zip(before, after):
        np.testing.assert_array_equal(b, a)
    assert float(opt.learning_rate) == pytest.approx(1e-3)


class FixedLoss(keras.Model):
    """A 'model' whose loss is whatever the batch says (its one weight only gets a gradient)."""

    def __init__(self):
        super().__init__()
        self.w = self.add_weight(shape=(), initializer="zeros")

    def call(self, x, training=False):
        return x + 0.0 * self.w


def test_noise_on_a_near_zero_loss_is_not_divergence_a_blow_up_is():
    """fastai's stop (EMA > 4x its minimum) alone fired after 2 steps on a head that already fits
    its batches (loss ~3e-4, a batch at 3e-3); a real blow-up rises by nats and still stops."""
    keras.utils.set_random_seed(0)
    model, opt = FixedLoss(), keras.optimizers.SGD(1e-3)

    def batches(losses):
        for v in losses:
            yield np.full((4,), v, np.float32), np.zeros(4, np.int64)

    def loss_fn(y, p, sample_weight=None):
        return tf.reduce_mean(p)

    noisy = [3.5e-4, 5.5e-3, 2e-4, 4e-3, 1e-4] * 8
    curve = range_test(model, opt, loss_fn, batches(noisy), 1e-7, 10.0, steps=40)
    assert curve["stopped"] == "end of range" and len(curve["lrs"]) == 40
    rising = [0.5] * 20 + [0.5 * 2 ** i for i in range(1, 20)]
    curve = range_test(model, opt, loss_fn, batches(rising), 1e-7, 10.0, steps=39)
    assert curve["stopped"].startswith("diverged at lr") and len(curve["lrs"]) < 39


def test_rules_on_a_known_curve():
    lrs = list(np.logspace(-6, 1, 80))
    # Flat, a steep fall centred at 1e-3, a minimum near 1e-1, then a rise.
    losses = [2.0 - 1.5 / (1 + math.exp(-3 * (math.log10(lr) + 3))) + 0.5 * max(0, math.log10(lr) + 1) ** 2
              for lr in lrs]
    found = suggest({"lrs": lrs, "losses": losses, "stopped": "end of range"})
    assert found["rule"] == "valley"
    best = lrs[int(np.argmin(losses))]
    assert 1e-4 < found["suggested_lr"] < best
    assert found["steep"] == pytest.approx(1e-3, rel=0.25)
    s = smooth(lrs, losses)
    assert found["min"] == pytest.approx(lrs[int(np.argmin(s))] / 10)
    assert abs(math.log10(found["min"] * 10 / best)) <= 0.25  # smoothing moves a noise-free minimum little
    assert found["suggested_lr"] == valley(lrs, _causal_ema(losses))  # valley: on fastai's EMA, as defined
    assert found["inconclusive"] is None
    with pytest.raises(RecipeError, match="rule="):
        suggest({"lrs": lrs, "losses": losses, "stopped": ""}, rule="best")


def _synthetic_loss(x):
    """A range test's shape in x = log10(LR): flat, a fall steepest at 1e-4, a shallow floor whose
    minimum is near 1e-2, then divergence past 1."""
    return (0.7 - 0.5 / (1 + np.exp(-2.5 * (x + 4))) + 0.1 * np.maximum(0, x + 2) ** 2
            + 3 * np.maximum(0, x) ** 2)


def _causal_ema(losses):
    """The debiased per-step EMA (beta 0.98) the rules used to run on, as a control."""
    out, avg = [], 0.0
    for i, v in enumerate(losses):
        avg = BETA * avg + (1 - BETA) * v
        out.append(avg / (1 - BETA ** (i + 1)))
    return np.array(out)


@pytest.mark.parametrize("seed", range(10))
def test_rules_find_the_minimum_and_the_steepest_fall_of_a_noisy_curve(seed):
    fine = np.linspace(-7, 1, 8001)
    x_min = fine[np.argmin(_synthetic_loss(fine))]  # about -1.96
    x_steep = fine[np.argmin(np.gradient(_synthetic_loss(fine), fine))]  # -4.0
    lrs = np.logspace(-7, 1, 100)  # the default range and number of steps
    losses = _synthetic_loss(np.log10(lrs)) + np.random.default_rng(seed).normal(0, 0.03, len(lrs))
    found = suggest({"lrs": list(lrs), "losses": list(losses), "stopped": "end of range"})
    # steepest slope and minimum/10 read the zero-lag curve:
    assert abs(math.log10(found["min"] * 10) - x_min) <= 0.6, found
    assert abs(math.log10(found["steep"]) - x_steep) <= 0.3, found
    # The same noisy curve under the causal EMA misses by more than these tolerances (its minimum
    # trails by more than a decade), so this test tells a lagging smoother from a zero-lag one.
    ema = _causal_ema(losses)
    assert (math.log10(minimum_tenth(lrs, ema) * 10) - x_min > 0.6
            or abs(math.log10(steepest(lrs, ema)) - x_steep) > 0.3)
    # valley reads the EMA (its definition and calibration): in the descent, before the minimum.
    assert found["suggested_lr"] == valley(lrs, ema)
    assert x_steep <= math.log10(found["suggested_lr"]) <= x_min, found
    assert found["inconclusive"] is None


@pytest.mark.parametrize("seed", range(10))
def test_a_flat_curve_is_inconclusive_and_says_why(seed):
    """Flat loss plus 4% noise per step (brain_mri_yn's kind of curve): no rule has anything to read."""
    lrs = np.logspace(-7, 1, 100)
    losses = 0.69 + np.random.default_rng(seed).normal(0, 0.03, len(lrs))
    found = suggest({"lrs": list(lrs), "losses": list(losses), "stopped": "end of range"})
    assert found["inconclusive"] and ("falls only" in found["inconclusive"] and "--max-lr" in found["inconclusive"]
                                      or "lowest at the start" in found["inconclusive"]), found
    # A loss that only rises names the start of the range; a real fall with the same noise is conclusive.
    rising = 0.69 + 0.05 * (np.log10(lrs) + 7) + np.random.default_rng(seed).normal(0, 0.03, len(lrs))
    assert "lowest at the start of the range (step" in inconclusive(lrs, smooth(lrs, rising))
    falling = _synthetic_loss(np.log10(lrs)) + np.random.default_rng(seed).normal(0, 0.03, len(lrs))
    assert inconclusive(lrs, smooth(lrs, falling)) is None


def test_smoother_has_no_lag_and_a_window_in_decades():
    lrs = np.logspace(-7, 1, 100)
    line = 3.0 - 0.2 * np.log10(lrs)
    np.testing.assert_allclose(smooth(lrs, line), line, atol=1e-9)  # a straight stretch stays put, ends included
    # A bump at 1e-3: its smoothed peak stays at 1e-3 and has the same height at 100 or 400 steps.
    peaks = []
    for steps in (100, 400):
        grid = np.logspace(-7, 1, steps)
        s = smooth(grid, np.exp(-0.5 * ((np.log10(grid) + 3) / 0.3) ** 2))
        assert abs(math.log10(grid[int(np.argmax(s))]) + 3) <= 0.05
        peaks.append(s.max())
    assert peaks[0] == pytest.approx(peaks[1], rel=0.03)


@pytest.mark.parametrize("kwargs, words", [
    ({"start_lr": 1.0, "end_lr": 0.1}, ["start_lr=1, end_lr=0.1", "--min-lr", "0 < start_lr < end_lr"]),
    ({"start_lr": 0.0}, ["start_lr=0", "0 < start_lr < end_lr"]),
    ({"start_lr": float("nan")}, ["start_lr=nan", "0 < start_lr < end_lr"]),
    ({"steps": 2}, ["steps=2", "--steps", "at least 5 steps"]),
])
def test_a_bad_range_is_refused_before_anything_runs(tmp_path, kwargs, words):
    with pytest.raises(RecipeError) as err:
        lr_find("small_similar", tmp_path / "no such folder", **kwargs)  # refused before the data is read
    assert all(w in str(err.value) for w in words), str(err.value)


def test_a_test_that_diverged_at_once_is_too_short_to_suggest():
    curve = {"lrs": [1e-7, 1e-6, 1e-5], "losses": [0.7, 0.9, float("nan")], "stopped": "diverged at lr 1e-05 (NaN loss)"}
    with pytest.raises(RecipeError, match=r"stopped after 3 steps .*too few to suggest an LR.*--min-lr"):
        suggest(curve)


def test_cli_refuses_a_bad_range_with_the_flags_named(tmp_path, capsys):
    code = main(["lr-find", "small_similar", "--data", str(tmp_path), "--min-lr", "1", "--max-lr", "0.01"])
    assert code != 0 and "--min-lr" in capsys.readouterr().err


def test_cli_json_on_the_head_stage(folder, tmp_path, capsys):
    argv = ["lr-find", "small_similar", "--data", str(folder), "--out", str(tmp_path), "--json"]
    for k, v in FAST.items():
        argv += ["--set", f"{k}={v}"]
    assert main(argv) == 0
    found = json.loads(capsys.readouterr().out)
    assert sorted(found) == ["inconclusive", "min", "rule", "steep", "suggested_lr", "tap"]
    assert found["rule"] == "valley" and found["tap"] is None  # small_similar: one depth, the backbone's end
    for k in ("suggested_lr", "steep", "min"):
        assert math.isfinite(found[k]) and 1e-8 <= found[k] <= 10, found
    assert (tmp_path / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_unfrozen_stage_trains_images_and_says_what_it_did(folder, tmp_path):
    found = lr_find("large_similar", folder, stage="finetune", steps=15, out=tmp_path,
                    overrides={**FAST, "batch_size": 8})
    assert found["stage"] == "finetune" and len(found["lrs"]) <= 15
    assert 1e-7 <= found["suggested_lr"] <= 10
    with pytest.raises(RecipeError, match="has stages"):
        lr_find("large_similar", folder, stage=5, overrides=FAST, out=tmp_path)


@pytest.mark.slow
def test_resolve_auto_lr_replaces_only_auto_lr_keys(folder, tmp_path):
    fixed = ["input_size=32", "precision=float32", "head_solver=sgd"]
    assert resolve_auto_lr("small_similar", folder, fixed) == fixed  # nothing to resolve: unchanged
    out = resolve_auto_lr("small_similar", folder, ["head.lr=auto"] + fixed, out=tmp_path)
    assert (tmp_path / "lr_find_head.png").exists()
    # small_similar's backbone=auto is probed once, and the choice travels with the overrides
    assert out[1:-1] == fixed and out[0].startswith("head.lr=") and out[-1].startswith("backbone=efficientnet_lite")
    lr = float(out[0].split("=", 1)[1])
    assert 1e-7 <= lr <= 10
    as_dict = resolve_auto_lr("small_similar", folder, {"head__lr": "auto", **dict(p.split("=") for p in fixed)},
                              out=tmp_path)
    assert as_dict["head__lr"] == pytest.approx(lr)  # deterministic: same data, seed and range
    assert as_dict["backbone"] == out[-1].split("=", 1)[1]
    from tuneflow.training.inputs import resolve_recipe
    assert resolve_recipe("small_similar", out).stages[0].lr == pytest.approx(lr)


def test_cli_warns_when_the_curve_is_inconclusive(folder, tmp_path, capsys, monkeypatch):
    """A curve with no fall (the range test's result replaced by a flat one; the rest is the real
    CLI path) is flagged in the JSON, and a warning names the reason and what to do."""
    from tuneflow.training import lr_range as mod
    lrs = list(np.logspace(-7, 1, 100))
    rising = [0.69 + 0.001 * i for i in range(100)]
    flat = {"lrs": lrs, "losses": rising, "smoothed": list(smooth(lrs, rising)),
            "ema": rising, "stopped": "end of range"}
    seen = {}
    monkeypatch.setattr(mod, "range_test", lambda *a, **k: seen.update(range=a[4:]) or flat)
    argv = ["lr-find", "small_similar", "--data", str(folder), "--out", str(tmp_path), "--min-lr", "1e-9",
            "--steps", "40"]
    for k, v in FAST.items():
        argv += ["--set", f"{k}={v}"]
    assert main(argv + ["--json"]) == 0
    assert seen["range"] == (1e-9, 10.0, 40)  # the range options reach the test
    cap = capsys.readouterr()
    found = json.loads(cap.out)
    assert found["inconclusive"] and "lowest at the start of the range" in found["inconclusive"]
    assert "warning: inconclusive" in cap.err and "--min-lr" in cap.err and "check the data" in cap.err
    assert main(argv) == 0
    assert "warning: inconclusive" in capsys.readouterr().out


def test_auto_lr_keeps_the_recipes_lr_when_the_curve_is_inconclusive(folder, tmp_path, monkeypatch, caplog):
    """lr=auto on a curve with no fall (the range test's result replaced by a flat one) does not use
    its numbers: the stage keeps the recipe's own LR, and a warning says why."""
    from tuneflow.training import lr_range as mod
    lrs = list(np.logspace(-7, 1, 100))
    rising = [0.69 + 0.001 * i for i in range(100)]
    flat = {"lrs": lrs, "losses": rising, "smoothed": list(smooth(lrs, rising)), "ema": rising,
            "stopped": "end of range"}
    monkeypatch.setattr(mod, "range_test", lambda *a, **k: flat)
    fixed = ["input_size=32", "precision=float32", "head_solver=sgd", "backbone=efficientnet_lite0"]
    with caplog.at_level(logging.WARNING, logger="tuneflow"):
        out = resolve_auto_lr("small_similar", folder, fixed + ["head.lr=auto"], out=tmp_path)
    assert out == fixed + ["head.lr=0.001"]  # small_similar's own head lr
    assert any("the recipe's own value" in r.message and "inconclusive" in r.message for r in caplog.records)


def test_head_stage_uses_the_depth_finetune_keeps(tmp_path, monkeypatch):
    """small_different: lr_find trains the head on the tap finetune's depth probe picks, and says which.

    On this tiny folder every depth separates the classes perfectly and the probe would keep the
    first tap on the tie; its scorer is made to prefer the widest features (the deepest tap) so
    that a range test on the first tap cannot pass for the probe's choice."""
    from tuneflow import finetune
    from tuneflow.training import taps as taps_mod
    real = taps_mod._probe_scores
    monkeypatch.setattr(taps_mod, "_probe_scores", lambda plan, xtr, ytr, xva, yva: {
        **real(plan, xtr, ytr, xva, yva), "inner": float(xtr.shape[1])})
    data = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=10)
    over = {"input_size": 32, "backbone": "efficientnet_lite0", "weights": random_lite0_weights(), "batch_size": 8, "precision": "float32",
            "head_solver": "sgd", "head__epochs": 1}
    found = lr_find("small_different", data, steps=10, out=tmp_path, overrides=over)
    res = finetune("small_different", data, tmp_path / "run", overrides=over, verbose=0, export=False)
    taps = list(res.report["taps"])
    assert len(taps) > 1 and res.report["tap"] == taps[-1] != taps[0]
    assert found["tap"] == res.report["tap"], (found["tap"], taps)
