"""Linear probes (tuneflow.training.probe): converged, deterministic, as good as scikit-learn's
default, and exactly a Keras Dense layer on the raw features."""
import warnings

import numpy as np
import pytest

from conftest import SHARED
from tuneflow.errors import DataError, RunError
from tuneflow.training.probe import DEFAULT_GRID, LinearProbe, fit_probe


def cnn_like(n, d=64, k=3, seed=0, sep=1.0):
    """Features like pooled CNN activations: non-negative, each with its own scale (1e-3..1e1)
    and offset, the class signal spread over many of them."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    centres = rng.normal(0, sep, (k, d))
    z = centres[y] + rng.normal(0, 1.0, (n, d))
    scale = 10.0 ** rng.uniform(-3, 1, d)
    return (np.log1p(np.exp(z)) * scale + scale * rng.uniform(0, 5, d)).astype(np.float32), y


def keras_dense(probe: LinearProbe, d: int):
    import keras
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(probe.n_classes, activation="softmax")])
    probe.write_into(model.layers[-1])
    return model


@pytest.mark.parametrize("k", [2, 4])
def test_dense_weights_reproduce_predict_proba(k):
    x, y = cnn_like(200, d=48, k=k, seed=k)
    probe = fit_probe(x, y)
    xt, _ = cnn_like(300, d=48, k=k, seed=k)  # same feature scales, new vectors
    want = probe.predict_proba(xt)
    kernel, bias = probe.dense_weights()
    assert kernel.shape == (48, k) and bias.shape == (k,) and kernel.dtype == np.float32
    got = np.asarray(keras_dense(probe, 48).predict(xt, verbose=0))
    assert got.shape == (300, k)
    assert np.abs(got - want).max() < 1e-5
    assert np.abs(want.sum(1) - 1).max() < 1e-9


def test_at_least_as_good_as_sklearn_default_on_cnn_like_features():
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    wins = []
    for seed in range(3):
        x, y = cnn_like(2300, d=64, k=3, seed=seed, sep=0.35)
        tr, te = slice(0, 300), slice(300, None)  # 2000 test vectors: +-1 point of noise
        probe = fit_probe(x[tr], y[tr], seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # the default's 100 iterations
            sk = LogisticRegression().fit(x[tr], y[tr]).score(x[te], y[te])
        ours = probe.score(x[te], y[te])
        assert ours >= sk - 0.01, (seed, ours, sk, probe.chosen_C)
        assert probe.converged and probe.folds == 5
        print(f"seed {seed}: probe {ours:.4f} (C={probe.chosen_C:g}), sklearn default {sk:.4f}")
        wins.append(ours - sk)
    assert np.mean(wins) > 0.02, wins  # standardising pays on features of unequal scales


def test_deterministic():
    x, y = cnn_like(150, k=3, seed=1)
    a, b = fit_probe(x, y, seed=3), fit_probe(x, y, seed=3)
    assert a.chosen_C == b.chosen_C and a.inner_scores == b.inner_scores
    np.testing.assert_array_equal(a.dense_weights()[0], b.dense_weights()[0])
    np.testing.assert_array_equal(a.predict_proba(x), b.predict_proba(x))
    assert a.chosen_C in a.inner_scores and set(a.inner_scores) == set(DEFAULT_GRID)
    assert 0 <= a.inner_accuracy <= 1


def test_class_weights_raise_minority_recall():
    x, y = cnn_like(1600, d=32, k=2, seed=4, sep=0.3)
    keep = (y == 0) | (np.arange(len(y)) % 6 == 0)  # class 1 becomes about 1 in 7
    x, y = x[keep], y[keep]
    tr = np.arange(len(y)) < len(y) // 2
    counts = np.bincount(y[tr])
    w = (len(y[tr]) / (2 * counts))[y[tr]]  # "balanced"
    plain = fit_probe(x[tr], y[tr])
    weighted = fit_probe(x[tr], y[tr], sample_weight=w)
    minority = ~tr & (y == 1)
    rec_plain = np.mean(plain.predict(x[minority]) == 1)
    rec_weighted = np.mean(weighted.predict(x[minority]) == 1)
    assert rec_weighted > rec_plain + 0.1, (rec_plain, rec_weighted)


def test_tiny_classes_skip_the_choice_but_fit():
    x, y = cnn_like(12, k=3, seed=2)
    y[:] = [0] * 5 + [1] * 6 + [2]  # class 2 has one vector: no stratified folds possible
    p = fit_probe(x, y)
    assert p.folds == 0 and p.inner_scores == {} and p.inner_accuracy is None
    assert p.predict_proba(x).shape == (12, 3)
    assert p.score(x, y) == 1.0  # 12 vectors in 64 dimensions: separable


def test_bad_input_is_a_clear_error():
    x, y = cnn_like(40, k=2)
    bad = x.copy()
    bad[3, 5] = np.nan
    with pytest.raises(DataError, match="NaN or Inf"):
        fit_probe(bad, y)
    with pytest.raises(DataError, match=r"classes without one: \[2, 3\]"):
        fit_probe(x, y, n_classes=4)  # classes 2 and 3 have no vectors: both named
    with pytest.raises(DataError, match="2 classes"):
        fit_probe(x, np.zeros(40, int))
    with pytest.raises(DataError, match="shape"):
        fit_probe(x[:, :, None], y)
    with pytest.raises(DataError, match="sample_weight"):
        fit_probe(x, y, sample_weight=np.ones(39))


def test_write_into_refuses_a_layer_of_the_wrong_shape():
    import keras
    x, y = cnn_like(60, d=16, k=3)
    probe = fit_probe(x, y)
    wrong = keras.Sequential([keras.Input((16,)), keras.layers.Dense(4, activation="softmax")])
    with pytest.raises(RunError, match="4 units|3 units"):
        probe.write_into(wrong.layers[-1])
    linear = keras.Sequential([keras.Input((16,)), keras.layers.Dense(3)])
    with pytest.raises(RunError, match="softmax"):
        probe.write_into(linear.layers[-1])


@pytest.fixture(scope="module")
def lite0_features():
    """Pooled Lite0 features (224 px) at the registry's taps, for the shared real datasets."""
    import keras

    import tuneflow
    from tuneflow.backbones import get_spec
    from tuneflow.data import load_data
    from tuneflow.features.predict import predict
    out = {}
    bb = tuneflow.build_backbone("efficientnet_lite0", weights="imagenet", input_size=224)
    taps = list(get_spec("efficientnet_lite0").taps)
    pooled = keras.Model(bb.input, [keras.layers.GlobalAveragePooling2D()(bb.get_layer(t).output)
                                    for t in taps])
    for name in ("brain_mri_yn", "ants_bees"):
        if not (SHARED / name).exists():
            continue
        b = load_data(SHARED / name, 224)
        feats = predict(pooled, [b.train.x, b.val.x], 32)
        n = len(b.train)
        out[name] = (b, {t: (np.asarray(f[:n]), np.asarray(f[n:])) for t, f in zip(taps, feats)})
    return out, taps


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED / "brain_mri_yn").exists(), reason="needs ../shared/datasets/brain_mri_yn")
def test_brain_mri_probe_beats_majority_and_sklearn(lite0_features):
    from sklearn.linear_model import LogisticRegression
    from tuneflow.runs.report import majority_rate
    feats, taps = lite0_features
    b, by_tap = feats["brain_mri_yn"]
    ftr, fva = by_tap[taps[-1]]  # the final features, as small_similar uses
    maj = majority_rate(b.val.y, len(b.classes))
    probe = fit_probe(ftr, b.train.y)
    ours = probe.score(fva, b.val.y)
    sk = LogisticRegression(max_iter=100).fit(ftr, b.train.y).score(fva, b.val.y)
    print(f"brain_mri_yn Lite0 224 final features: probe {ours:.4f} (C={probe.chosen_C:g}, "
          f"{probe.seconds:.2f} s), sklearn default {sk:.4f}, majority {maj:.4f}")
    assert abs(maj - 32 / 49) < 1e-9  # the split the issue measured (49 val images, 32 "yes")
    assert ours > maj
    assert ours >= sk


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED / "ants_bees").exists(), reason="needs ../shared/datasets/ants_bees")
def test_depth_probe_on_lite0_taps(lite0_features):
    feats, taps = lite0_features
    table = {}
    for name, (b, by_tap) in feats.items():
        for t in taps:
            ftr, fva = by_tap[t]
            p = fit_probe(ftr, b.train.y)
            table[name, t] = (p.score(fva, b.val.y), p.inner_accuracy)
            print(f"{name} {t}: val {table[name, t][0]:.4f}, inner {p.inner_accuracy:.4f}, C={p.chosen_C:g}")
    # Photographs of insects are ImageNet-like: the deepest features win, by val and by the
    # train-only inner estimate alike.
    assert max(taps, key=lambda t: table["ants_bees", t][0]) == taps[-1]
    assert max(taps, key=lambda t: table["ants_bees", t][1]) == taps[-1]
    assert table["ants_bees", taps[-1]][0] > 0.9
