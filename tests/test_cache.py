"""The feature cache (tuneflow.features.cache): reused for the same backbone, weights, size, tap and
data; a new entry when any of them changes; written as it goes, read back memory-mapped, and
trained on without being copied."""

import numpy as np
import pytest

from tuneflow.data import ImageRows

from conftest import fast_overrides as _fast
from tuneflow import finetune
from tuneflow.features import cache as fcache


def test_feature_cache_is_reused_and_invalidated(tmp_path, tiny_folder):
    ov = _fast("small_similar")
    finetune("small_similar", tiny_folder, tmp_path / "r1", overrides=ov, verbose=0, export=False)
    n = len(list(fcache.cache_root().glob("*.npy")))
    finetune("small_similar", tiny_folder, tmp_path / "r2", overrides=ov, verbose=0, export=False)
    assert len(list(fcache.cache_root().glob("*.npy"))) == n  # reused
    finetune("small_similar", tiny_folder, tmp_path / "r3", overrides={**ov, "input_size": 40}, verbose=0, export=False)
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


def test_feature_cache_written_as_it_goes_and_read_back_mapped(on_disk):
    from tuneflow.features import cache as fcache
    calls = []

    def fill(out):
        for i in range(0, len(out), 7):
            out[i:i + 7] = np.arange(i, min(len(out), i + 7))[:, None] * np.ones(5, np.float32)
            calls.append(i)
    feats, hit = fcache.cached_into("scale-test", (30, 5), np.float32, fill)
    assert not hit and isinstance(feats, np.memmap) and feats[29, 4] == 29
    again, hit = fcache.cached_into("scale-test", (30, 5), np.float32, fill)
    assert hit and len(calls) == 5 and np.array_equal(again, feats)
    path = fcache.cache_root() / "scale-test.npy"
    raw = bytearray(path.read_bytes())  # damage one byte on disk: the checksum finds it
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    _, hit = fcache.cached_into("scale-test", (30, 5), np.float32, fill)
    assert not hit and len(calls) == 10
    assert not list(fcache.cache_root().glob("*.part"))


def _plan(batch=8, sampling="shuffle", replicas=1, class_weights=None):
    from types import SimpleNamespace
    return SimpleNamespace(global_batch=batch, class_weights=class_weights, replicas=replicas,
                           recipe=SimpleNamespace(sampling=sampling))


@pytest.mark.parametrize("sampling", ["shuffle", "balanced"])
def test_heads_train_from_a_memory_mapped_cache_without_copying_it(tmp_path, monkeypatch, sampling):
    import keras
    from tuneflow.training.cached import cached_dataset
    from tuneflow.training.stages import call_direct
    rng = np.random.default_rng(0)
    n, d = 203, 16
    y = (np.arange(n) % 3).astype(np.int32)
    feats = rng.normal(size=(n, d)).astype(np.float32) + y[:, None]  # separable by class
    path = tmp_path / "f.npy"
    np.save(path, feats[None])
    mm = np.load(path, mmap_mode="r")[0]  # (N, d) view of a (1, N, d) cache, as stages uses it
    assert isinstance(mm, np.memmap)
    import tensorflow as tf

    def copied(*a, **k):
        raise AssertionError("the memory-mapped cache was copied into a tensor")
    monkeypatch.setattr(tf.data.Dataset, "from_tensor_slices", copied)
    ds, steps = cached_dataset(_plan(sampling=sampling), mm, y, seed=3)
    assert steps == 26
    rows = [(a.numpy(), b.numpy()) for a, b in ds]  # one epoch
    xs, ys = np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])
    assert len(rows) == steps and len(ys) == n
    if sampling == "shuffle":  # every row exactly once, with its own label
        order = np.argsort(xs[:, 0])
        np.testing.assert_array_equal(xs[order], feats[np.argsort(feats[:, 0])])
    np.testing.assert_array_equal(ys, np.array([y[np.flatnonzero((feats == r).all(1))[0]] for r in xs]))
    keras.utils.set_random_seed(0)
    head = keras.Sequential([keras.Input((d,)), keras.layers.Dense(3, activation="softmax")])
    head.compile("adam", "sparse_categorical_crossentropy")
    hist = head.fit(ds, epochs=4, verbose=0).history["loss"]
    assert hist[-1] < hist[0]
    np.testing.assert_allclose(call_direct(head, mm, chunk=50), np.asarray(head(feats)), rtol=1e-5, atol=1e-6)


def test_views_of_a_mapped_cache_are_read_with_pread_at_their_own_offsets(tmp_path):
    """A (V, N, ...) cache (a cached prefix's augmented views): each view becomes a map of its
    own at its true offset, read with pread (not paged into the process through the map), and
    the training batches read view e % V in epoch e, cast to float32."""
    from tuneflow.features.cache import rows_view, split_views
    from tuneflow.training.cached import cached_dataset
    rng = np.random.default_rng(1)
    views, n, d = 3, 37, 5
    acts = rng.normal(size=(views, n, d)).astype(np.float16)
    path = tmp_path / "acts.npy"
    np.save(path, acts)
    mm = np.load(path, mmap_mode="r")
    # a plain slice carries the file's offset, wrong for view 1: rows_view must not pread it
    assert not isinstance(rows_view(mm[1]), ImageRows)
    parts = split_views(mm)
    assert len(parts) == views
    for v, part in enumerate(parts):
        src = rows_view(part)
        assert isinstance(src, ImageRows)
        np.testing.assert_array_equal(src[np.array([0, 5, 36])], acts[v, [0, 5, 36]])
        np.testing.assert_array_equal(np.asarray(src), acts[v])
    y = (np.arange(n) % 2).astype(np.int32)
    ds, steps = cached_dataset(_plan(sampling="shuffle"), parts, y, seed=0, dtype=np.float32)
    for epoch in range(4):  # each epoch one view, every row once
        xs = np.concatenate([a.numpy() for a, _ in ds])
        assert xs.dtype == np.float32 and len(xs) == n
        want = acts[epoch % views].astype(np.float32)
        np.testing.assert_array_equal(xs[np.lexsort(xs.T)], want[np.lexsort(want.T)])
    # in RAM, the same function takes the plain arrays
    assert [p.shape for p in split_views(acts)] == [(n, d)] * views
