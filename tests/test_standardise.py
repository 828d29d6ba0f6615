"""Linear heads trained by SGD on standardised cached features (tuneflow.training.standardise)."""
import keras
import numpy as np
import pytest

from tuneflow.recipe import Recipe
from tuneflow.training.standardise import MIN_STD, StandardisedHead, feature_moments
from tuneflow.training.cached import cache_trainer

from conftest import make_image_folder


def _head(c=12, k=3, dropout=0.2, seed=0):
    keras.utils.set_random_seed(seed)
    from tuneflow.training.heads import build_head
    r = Recipe(name="t", head="linear", dropout=dropout, l2=1e-3)
    head = build_head((2, 2, c), k, r, "batch", classifier_penalty=False)
    trainer, _ = cache_trainer(r, head, c)
    return r, head, trainer


def test_feature_moments_over_views_and_memory_maps(tmp_path, monkeypatch):
    from tuneflow.training import standardise
    monkeypatch.setattr(standardise, "MOMENT_CHUNK", 64)  # several chunks per view, a short last one
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, 500, 7)) * [1e-3, 0.1, 1, 10, 100, 0, 0.5] + 3).astype(np.float32)
    x[..., 5] = 2.0  # a constant channel: std 1, not 1/0
    path = tmp_path / "f.npy"
    mm = np.lib.format.open_memmap(path, "w+", np.float32, x.shape)
    mm[:] = x
    mm.flush()
    for arr in (x, np.load(path, mmap_mode="r")):
        mean, std = feature_moments(arr)
        flat = x.reshape(-1, 7).astype(np.float64)
        np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-6)
        want = flat.std(0)
        want[5] = 1.0
        np.testing.assert_allclose(std, want, rtol=1e-5)
    mean2, std2 = feature_moments(x[0])  # (N, C): one view
    np.testing.assert_allclose(mean2, x[0].astype(np.float64).mean(0), rtol=1e-6)
    assert MIN_STD > 0


def test_begin_then_fold_is_exact_and_the_twin_computes_what_the_head_does():
    r, head, plain = _head()
    rng = np.random.default_rng(1)
    k, b = plain.layers[-1].get_weights()
    plain.layers[-1].set_weights([rng.normal(size=k.shape).astype(np.float32),
                                  rng.normal(size=b.shape).astype(np.float32)])
    ftr = (rng.normal(size=(2, 80, 12)) * np.logspace(-3, 1, 12) + 0.5).astype(np.float32)
    before = plain.predict(ftr[0], verbose=0)
    std = StandardisedHead(r, plain, ftr)
    np.testing.assert_allclose(std.trainer.predict(ftr[0], verbose=0), before, atol=2e-5)
    std.fold()
    np.testing.assert_allclose(plain.predict(ftr[0], verbose=0), before, atol=2e-5)
    # Train the twin a little: the folded head on raw features gives what the twin gave.
    std.trainer.compile(keras.optimizers.Adam(0.05), "sparse_categorical_crossentropy")
    std.trainer.fit(ftr[0], rng.integers(0, 3, 80), epochs=2, verbose=0)
    trained = std.trainer.predict(ftr[0], verbose=0)
    assert np.abs(trained - before).max() > 1e-3
    std.fold()
    np.testing.assert_allclose(plain.predict(ftr[0], verbose=0), trained, atol=2e-5)
    # The penalty is on the twin (standardised units), none on the model's own classifier.
    assert std.dense.kernel_regularizer is not None and plain.layers[-1].kernel_regularizer is None
    assert std.trainer.losses and not plain.losses


def test_sgd_learns_badly_scaled_features_only_when_standardised():
    """The point of it: signal in channels ~1000x smaller than the rest (as in pooled backbone
    features) is out of reach of a fixed-LR Adam head on raw features (Adam moves each weight by ~lr a step), and easy standardised."""
    rng = np.random.default_rng(0)
    n, c = 600, 12
    scale = np.where(np.arange(c) < 4, 1e-3, 1.0)
    z = rng.normal(size=(n, c))
    y = (z[:, :4].sum(1) > 0).astype(np.int64)  # the label lives in the 4 tiny channels
    x = (z * scale).astype(np.float32)
    accs = {}
    for standardise in (False, True):
        r, head, plain = _head(c=c, k=2, dropout=0.0)
        trainer = StandardisedHead(r, plain, x[None]).trainer if standardise else plain
        trainer.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
        trainer.fit(x[:400], y[:400], epochs=20, batch_size=32, verbose=0)
        accs[standardise] = float(np.mean(plain.predict(x[400:], verbose=0).argmax(1) == y[400:])) \
            if not standardise else float(np.mean(trainer.predict(x[400:], verbose=0).argmax(1) == y[400:]))
    assert accs[True] >= 0.9, accs
    assert accs[False] <= 0.7, accs


def _layer(model, name):
    return next(layer for layer in model._flatten_layers() if layer.name == name)


@pytest.mark.slow
def test_finetune_with_an_sgd_head_exports_the_model_it_measured(tmp_path):
    """End to end: the SGD head trains standardised and is folded at the stage's end; the run's
    artifact (raw features in, no extra layer, no Keras penalty on the classifier) predicts what
    training's own path measured on the cached features."""
    import tuneflow
    data = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=12)
    over = {"input_size": 32, "backbone": "efficientnet_lite0", "precision": "float32", "head_solver": "sgd", "head__epochs": 6,
            "head__patience": 0, "head__lr": 0.01, "l2": 1e-3}
    res = tuneflow.finetune("small_similar", data, tmp_path / "run", overrides=over, verbose=0)
    clf = _layer(res.model, "head_classifier")
    assert clf.kernel_regularizer is None
    assert not any("standardise" in layer.name for layer in res.model._flatten_layers())
    fast = res.report["fast_path"]
    assert fast["predictions_differing"] == 0, fast  # the folded head is the head training measured
    assert fast["val_accuracy"] == pytest.approx(res.report["val_accuracy"])
    assert res.report["val_accuracy"] > 0.6  # and it learned (chance: 1/3)
    # The report says which weights the model holds: the head stage's end (its checkpoint).
    assert res.report["model_from"] == {**res.report["model_from"], "stage": "head", "index": 0, "epoch": "end"}
    assert res.report["model_from"]["val_accuracy"] == pytest.approx(fast["val_accuracy"])
    (health,) = res.report["stage_health"]
    assert health["epochs"] == 6 and not health["diverged"]
    assert "- model: the best validated weights, from stage 'head' (its end)" in (res.run_dir / "report.md").read_text()
    # The artifact, loaded by plain Keras, holds the same folded classifier.
    loaded = keras.models.load_model(res.run_dir / "model.keras", compile=False)
    assert not any("standardise" in layer.name for layer in loaded._flatten_layers())
    for a, b in zip(_layer(loaded, "head_classifier").get_weights(), clf.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_early_stopping_restores_the_best_epoch_before_the_fold(tmp_path):
    """The stage ends on its best epoch (early stopping restores it into the twin), and that is what
    is folded into the model: the report's fast path scores exactly the best epoch's metrics."""
    import csv

    import tuneflow
    import shutil
    data = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=20)
    files = sorted(data.rglob("*.png"))  # a quarter of the labels wrong: no epoch is perfect
    for i, f in enumerate(files[::4]):
        shutil.move(str(f), str(data / "abc"[(i + 1) % 3] / f"moved_{f.name}"))
    over = {"input_size": 32, "backbone": "efficientnet_lite0", "precision": "float32", "head_solver": "sgd", "head__epochs": 40,
            "head__patience": 3, "head__lr": 0.3, "dropout": 0.5}
    res = tuneflow.finetune("small_similar", data, tmp_path / "run", overrides=over, verbose=0)
    rows = [r for r in csv.DictReader(open(res.run_dir / "metrics.csv")) if r["stage"] == "0"]
    best = max(rows, key=lambda r: (float(r["val_accuracy"]), -float(r["val_loss"])))
    last = rows[-1]
    assert len(rows) < 40 and best is not last, "early stopping did not restore an earlier epoch"
    assert (best["val_accuracy"], best["val_loss"]) != (last["val_accuracy"], last["val_loss"])
    fast = res.report["fast_path"]
    assert fast["val_accuracy"] == pytest.approx(float(best["val_accuracy"]))
    assert fast["val_loss"] == pytest.approx(float(best["val_loss"]), rel=1e-4)
    assert res.report["model_from"]["val_loss"] == pytest.approx(float(best["val_loss"]), rel=1e-4)


class _Crash(Exception):
    pass


def test_a_resumed_cached_stage_starts_from_the_restored_classifier(tmp_path, monkeypatch):
    """Two SGD head stages on the cache; a crash in the second, then --resume: the process starts
    with a fresh classifier, restores the first stage's folded one from its checkpoint, and the
    twin must start from that (carried in after the restore), not from the fresh weights. The
    second stage trains at lr ~ 0, so its val metrics must be the first stage's end."""
    import csv

    import tuneflow
    import tuneflow.training.stages as train
    from tuneflow.recipe import Stage
    data = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=12)
    recipe = Recipe(name="two_heads", head="linear", head_solver="sgd", input_size=32, precision="float32",
                    dropout=0.0, l2=0.0,
                    stages=(Stage("head", epochs=5, lr=0.01), Stage("again", epochs=2, lr=1e-12)))
    original = train.EpochHook.on_epoch_end

    def crash_in_stage_1(self, epoch, logs=None):
        original(self, epoch, logs)
        if self.stage_index == 1:
            raise _Crash("simulated crash")

    monkeypatch.setattr(train.EpochHook, "on_epoch_end", crash_in_stage_1)
    with pytest.raises(_Crash):
        tuneflow.finetune(recipe, data, tmp_path / "run", verbose=0, export=False)
    monkeypatch.setattr(train.EpochHook, "on_epoch_end", original)
    tuneflow.finetune(recipe, data, tmp_path / "run", verbose=0, resume=True, export=False)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    end0 = [r for r in rows if r["stage"] == "0"][-1]
    again = [r for r in rows if r["stage"] == "1"]
    assert len(again) == 2
    for r in again:
        assert float(r["val_loss"]) == pytest.approx(float(end0["val_loss"]), rel=1e-4)
        assert r["val_accuracy"] == end0["val_accuracy"]
    assert float(end0["val_loss"]) < 0.8 * np.log(3)  # the first stage learned: a fresh head would be ~ln 3
