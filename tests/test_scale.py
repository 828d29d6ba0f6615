"""Data at any size: the memory-mapped image store, file-list subsampling, sharding, packing, streamed caches."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, SHARED, make_image_folder
from tuneflow.data import DataError, ImageRows, load_data
from tuneflow.data.pack import is_packed, load_packed, pack
from tuneflow.data.sources import load_folder


@pytest.fixture
def on_disk(monkeypatch):
    """Every dataset goes to the memory-mapped store (threshold: 1 byte)."""
    monkeypatch.setenv("TUNEFLOW_INMEMORY_MAX_BYTES", "1")


def _load_both(monkeypatch, data, size, **kw):
    monkeypatch.setenv("TUNEFLOW_INMEMORY_MAX_BYTES", str(10**12))
    mem = load_data(data, size, **kw)
    monkeypatch.setenv("TUNEFLOW_INMEMORY_MAX_BYTES", "1")
    disk = load_data(data, size, **kw)
    return mem, disk


def _assert_same(mem, disk):
    assert isinstance(disk.train.x, ImageRows) and isinstance(mem.train.x, np.ndarray)
    assert mem.classes == disk.classes
    for name in ("train", "val"):
        a, b = getattr(mem, name), getattr(disk, name)
        assert a.files == b.files
        np.testing.assert_array_equal(a.y, b.y)
        np.testing.assert_array_equal(a.x, np.asarray(b.x))
    assert mem.fingerprint() == disk.fingerprint()
    assert mem.leaks == disk.leaks and mem.skipped == disk.skipped


def test_memmap_and_inmemory_paths_give_identical_bundles(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "d", per_class=12, size=24)
    Image.open(root / "a" / "a_x_000.png").save(root / "b" / "dup_of_a0.png")  # a train/val leak maybe
    mem, disk = _load_both(monkeypatch, root, 32)
    _assert_same(mem, disk)
    sub_mem, sub_disk = _load_both(monkeypatch, root, 32, fraction=0.5, seed=3)
    _assert_same(sub_mem, sub_disk)
    assert len(sub_disk.train) + len(sub_disk.val) < len(disk.train) + len(disk.val)
    # ImageRows behaves as the engine indexes it
    x = disk.train.x
    assert x.shape == mem.train.x.shape and x.dtype == np.uint8 and len(x) == len(mem.train.x)
    np.testing.assert_array_equal(x[2:5], mem.train.x[2:5])
    np.testing.assert_array_equal(x[[4, 0, 4]], mem.train.x[[4, 0, 4]])
    np.testing.assert_array_equal(x[::3][:2], mem.train.x[::3][:2])
    assert (x.min(), x.max()) == (mem.train.x.min(), mem.train.x.max())


def test_fraction_picks_files_before_decoding_the_same_images_as_subsampling_after(tmp_path, monkeypatch):
    from tuneflow.data import subsample
    root = make_image_folder(tmp_path / "d", per_class=20, size=16)
    before = load_data(root, 16, fraction=0.3, seed=5)
    after = subsample(load_folder(root, 16), 0.3, None, 5)
    for name in ("train", "val"):
        assert getattr(before, name).files == getattr(after, name).files
    # fewer files decoded: a file outside the pick may even be corrupt
    decoded = []
    import tuneflow.data.sources as src
    real = src.decode_image
    monkeypatch.setattr(src, "decode_image", lambda f, *a: decoded.append(f) or real(f, *a))
    load_data(root, 16, fraction=0.3, seed=5)
    assert len(decoded) == len(before.train) + len(before.val) < 40


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED / "ants_bees").exists(), reason="needs ../shared/datasets/ants_bees")
def test_memmap_and_inmemory_agree_on_real_data(monkeypatch):
    mem, disk = _load_both(monkeypatch, SHARED / "ants_bees", 64)
    _assert_same(mem, disk)


def test_store_is_reused_and_a_partial_store_is_never_read(tmp_path, monkeypatch, on_disk):
    import tuneflow.data.sources as src
    from tuneflow.data.store import store_root
    root = make_image_folder(tmp_path / "d", per_class=6, size=16)
    first = load_folder(root, 16)
    stores = sorted(store_root().glob("*.npy"))
    assert first.train.x.path in map(str, stores) and Path(first.train.x.path).with_suffix(".json").exists()
    assert not list(store_root().glob("*.part"))

    decoded = []
    real = src.decode_image
    monkeypatch.setattr(src, "decode_image", lambda f, *a: decoded.append(f) or real(f, *a))
    again = load_folder(root, 16)  # same files, sizes, mtimes: nothing decoded
    assert again.fingerprint() == first.fingerprint() and decoded == []
    # without its manifest (a run killed before the completion marker) the store is decoded again
    Path(first.train.x.path).with_suffix(".json").unlink()
    assert load_folder(root, 16).fingerprint() == first.fingerprint() and len(decoded) == 12
    # a changed file changes the key: a new store
    os.utime(root / "a" / "a_x_000.png", ns=(1, 1))
    assert load_folder(root, 16).train.x.path != first.train.x.path


def _truncated_jpeg(path: Path, size=40):
    """A JPEG whose header reads fine and whose data stops half way: fails only while decoding."""
    import io
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    path.write_bytes(data[:len(data) // 2])
    with Image.open(path) as im:  # the header alone is valid
        assert im.size == (size, size)


def test_a_source_that_ends_early_mid_store_leaves_no_partial_file(on_disk):
    """Chunks are written by a writer thread while the next decodes: a source that stops after
    600 of the 1,000 images it announced (3 chunks in) raises, naming where it stopped, and leaves
    neither a store nor a partial file; the next complete decode writes the store."""
    from tuneflow.data.store import decode_rows, store_root
    names = [f"img{i}" for i in range(1000)]
    decode = lambda i: np.full((8, 8, 3), i % 251, np.uint8)  # noqa: E731
    with pytest.raises(DataError, match="ended after 600 of the 1000 images"):
        decode_rows(iter(range(600)), names, 8, "squash", decode, key="ends-early")
    assert not list(store_root().glob("*.part")) and not list(store_root().glob("ends-early*"))
    x, ok, skipped = decode_rows(iter(range(1000)), names, 8, "squash", decode, key="ends-early")
    assert isinstance(x, ImageRows) and ok.all() and not skipped
    assert np.array_equal(x[[999, 0, 512, 256, 255]][:, 0, 0, 0], np.array([999, 0, 512, 256, 255]) % 251)


def test_corrupt_file_met_mid_decode_is_skipped_and_named(tmp_path, on_disk):
    root = make_image_folder(tmp_path / "d", per_class=10, size=16)
    bad = root / "a" / "a_x_004b.jpg"  # sorts into the middle of class a
    _truncated_jpeg(bad)
    bundle = load_folder(root, 16)
    assert isinstance(bundle.train.x, ImageRows)
    assert [s for s in bundle.skipped if s.startswith(str(bad))], bundle.skipped
    assert str(bad) not in bundle.train.files + bundle.val.files
    assert len(bundle.train) + len(bundle.val) == 20
    row = bundle.train.files.index(str(root / "a" / "a_x_005.png")) if str(root / "a" / "a_x_005.png") in \
        bundle.train.files else None
    if row is not None:  # the rows after the bad one hold their own pixels, not a neighbour's
        from tuneflow.data import decode_image
        np.testing.assert_array_equal(bundle.train.x[row], decode_image(root / "a" / "a_x_005.png", 16))


def _epochs(split, shard, epochs, batch=4, whole=False):
    from tuneflow.data.pipeline import train_dataset
    ds = train_dataset(split, batch, shard=shard, repeat=True, seed=7, whole_batches=whole)
    per_epoch = None
    out = []
    it = iter(ds)
    from tuneflow.data.pipeline import train_dataset as _  # noqa: F401
    n_batches = int(np.ceil(int(np.ceil(len(split) / shard[0])) / batch))
    for _e in range(epochs):
        labels = [next(it)[1].numpy() for _b in range(n_batches)]
        out.append(np.concatenate(labels))
        per_epoch = n_batches
    return out, per_epoch


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32])
def test_store_rows_in_any_order_read_as_numpy_would(tmp_path, dtype):
    """ImageRows reads every key numpy takes (int, slice, negative, repeats, unsorted, a view of a
    view) with the same result, including a run of 3,000 consecutive file rows scattered into a
    random order (more than the 1,024 buffers one preadv call takes)."""
    from tuneflow.data.store import ImageRows
    x = (np.random.default_rng(0).random((3000, 4, 3, 2)) * 100).astype(dtype)
    np.save(tmp_path / "a.npy", x)
    rows = ImageRows(np.load(tmp_path / "a.npy", mmap_mode="r"), None, str(tmp_path / "a.npy"))
    rng = np.random.default_rng(1)
    perm = rng.permutation(3000)
    assert np.array_equal(rows[perm], x[perm])
    for _ in range(30):
        idx = rng.integers(-3000, 3000, rng.integers(1, 200))
        assert np.array_equal(rows[idx], x[idx])
    assert np.array_equal(rows[[4, 4, 4, 3, 5, 6, 7, 2]], x[[4, 4, 4, 3, 5, 6, 7, 2]])
    assert np.array_equal(rows[7], x[7]) and np.array_equal(rows[-1], x[-1])
    assert np.array_equal(rows[10:2000:7], x[10:2000:7]) and np.array_equal(rows[100:1400], x[100:1400])
    sub = rows.take(perm[:500])
    assert np.array_equal(sub[np.arange(500)[::-1]], x[perm[:500]][::-1])


def test_a_store_truncated_under_a_reader_raises_naming_the_file(tmp_path):
    from tuneflow.data.store import ImageRows
    x = np.arange(100 * 12, dtype=np.uint8).reshape(100, 2, 2, 3)
    np.save(tmp_path / "a.npy", x)
    rows = ImageRows(np.load(tmp_path / "a.npy", mmap_mode="r"), None, str(tmp_path / "a.npy"))
    os.truncate(tmp_path / "a.npy", 128 + 50 * 12)  # header + 50 rows left
    assert np.array_equal(rows[[3, 1, 40]], x[[3, 1, 40]])
    with pytest.raises(OSError, match="a.npy: unexpected end of file"):
        rows[[2, 70, 5]]
    with pytest.raises(OSError, match="a.npy: unexpected end of file at byte 728"):
        rows[[51, 48, 49, 50]]  # one run across the end: two rows read, then nothing (128 + 50 x 12)


@pytest.mark.parametrize("n", [23, 21])
def test_shards_cover_every_index_once_per_epoch(n):
    from tuneflow.data import Split
    x = np.zeros((n, 8, 8, 3), np.uint8)
    split = Split(x, np.arange(n, dtype=np.int32))  # the label is the row number
    a, nb_a = _epochs(split, (2, 0), 3)
    b, nb_b = _epochs(split, (2, 1), 3)
    assert nb_a == nb_b  # same number of steps on every worker (collectives need it)
    for e in range(3):
        seen = np.concatenate([a[e], b[e]])
        assert set(seen) == set(range(n))
        extra = len(seen) - n
        assert extra <= 1  # at most one padded repeat, on a share one shorter than the other
        if n == 23:  # shares of 12 and 11 fill 3 batches of 4 each: exactly once
            assert extra == 0 and sorted(seen) == list(range(n))
    assert not np.array_equal(a[0], a[1])  # reshuffled every epoch
    with pytest.raises(ValueError, match="shard"):
        _epochs(split, (2, 2), 1)


@pytest.mark.slow
def test_two_worker_processes_read_disjoint_shares(tmp_path):
    """Two processes (as two MultiWorkerMirroredStrategy workers would be) each read their share."""
    code = textwrap.dedent("""
        import json, sys
        import numpy as np
        from tuneflow.data import Split
        from tuneflow.data.pipeline import train_dataset
        idx = int(sys.argv[1])
        split = Split(np.zeros((50, 8, 8, 3), np.uint8), np.arange(50, dtype=np.int32))
        ds = train_dataset(split, 5, shard=(2, idx), seed=11)
        print(json.dumps([int(v) for _, y in ds for v in y.numpy()]))
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], stdout=subprocess.PIPE, env=env, cwd=REPO)
             for i in range(2)]
    seen = [json.loads(p.communicate(timeout=300)[0].decode().strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(seen[0]) == len(seen[1]) == 25 and sorted(seen[0] + seen[1]) == list(range(50))


def test_eval_dataset_streams_store_rows(tmp_path, on_disk):
    from tuneflow.data.pipeline import eval_dataset
    bundle = load_folder(make_image_folder(tmp_path / "d", per_class=7, size=16), 16)
    xs, ys = zip(*[(a.numpy(), b.numpy()) for a, b in eval_dataset(bundle.train, 4)])
    np.testing.assert_array_equal(np.concatenate(xs), np.asarray(bundle.train.x, np.float32))
    np.testing.assert_array_equal(np.concatenate(ys), bundle.train.y)


@pytest.mark.parametrize("split", [False, True])
def test_pack_then_load_gives_the_folders_bundle(tmp_path, monkeypatch, split):
    root = make_image_folder(tmp_path / "d", per_class=9, size=20, split=split)
    bad = (root / "train" if split else root) / "b" / "b_zz.jpg"
    _truncated_jpeg(bad)
    shards = tmp_path / "shards"
    meta = pack(root, shards, shard_bytes=4000)  # several shards per split
    assert is_packed(shards) and not is_packed(root)
    assert len(meta["splits"]["train"]["shards"]) > 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
    for threshold in ("1", str(10**12)):  # into the store, and into RAM
        monkeypatch.setenv("TUNEFLOW_INMEMORY_MAX_BYTES", threshold)
        want = load_folder(root, 24)
        got = load_data(str(shards), 24)
        assert got.classes == want.classes and got.fingerprint() == want.fingerprint()
        for name in ("train", "val"):
            a, b = getattr(want, name), getattr(got, name)
            np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))
            assert a.files == b.files
        assert [s for s in got.skipped if s.startswith(str(bad))]
    sub = load_packed(shards, 24, classes=["a", "b"], fraction=0.5, seed=1)
    ref = load_data(root, 24, classes=["a", "b"], fraction=0.5, seed=1)
    assert sub.train.files == ref.train.files and sub.val.files == ref.val.files
    with pytest.raises(DataError, match="not an empty folder"):
        pack(root, shards)


def test_pack_cli(tmp_path):
    from tuneflow.cli import main
    root = make_image_folder(tmp_path / "d", per_class=4, size=16, classes=("a", "b", "c"))
    assert main(["pack", str(root), "--out", str(tmp_path / "s"), "--classes", "a,c"]) == 0
    assert load_data(str(tmp_path / "s"), 16).classes == ["a", "c"]
    assert main(["pack", str(root), "--out", str(tmp_path / "s")]) == 2  # refuses a non-empty folder


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


RSS_PROBE = textwrap.dedent("""
    import json, sys
    from tuneflow.data.sources import load_folder

    def rss():
        f = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
        return {k: int(f[k].split()[0]) for k in ("RssAnon", "RssFile", "VmHWM")}  # kB

    small = load_folder(sys.argv[1], 96)
    a = rss()
    big = load_folder(sys.argv[2], 96)
    big.fingerprint()
    b = rss()
    print(json.dumps({"small": a, "big": b, "n": [len(small.train) + len(small.val), len(big.train) + len(big.val)]}))
""")

RSS_BOUND_KB = 12_000  # RssAnon growth allowed going from 120 to 1,200 images (their pixels: 33 MB)


@pytest.mark.slow
def test_rss_growth_over_a_10x_larger_dataset_stays_bounded(tmp_path):
    small = make_image_folder(tmp_path / "small", per_class=60, size=24)
    big = make_image_folder(tmp_path / "big", per_class=600, size=24, seed=1)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TUNEFLOW_HOME": str(tmp_path / "home")}
    grown = {}
    for mode, threshold in (("disk", "1"), ("memory", str(10**12))):
        out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(small), str(big)], capture_output=True,
                             env={**env, "TUNEFLOW_INMEMORY_MAX_BYTES": threshold}, cwd=REPO, timeout=600)
        assert out.returncode == 0, out.stderr.decode()[-2000:]
        r = json.loads(out.stdout.decode().strip().splitlines()[-1])
        assert r["n"] == [120, 1200]
        grown[mode] = r["big"]["RssAnon"] - r["small"]["RssAnon"]
    print("RssAnon growth, kB:", grown)
    assert grown["disk"] < RSS_BOUND_KB, grown
    assert grown["memory"] > 1200 * 96 * 96 * 3 / 1024 * 0.9, grown  # the probe sees pixels held in RAM


@pytest.mark.slow
def test_tfds_split_streams_into_the_store_and_is_reused(tmp_path):
    """A prepared TFDS dataset (built offline) goes to the store chunk by chunk; a second load in a
    new process reads the store and its labels, not the dataset."""
    from test_data import TINY_TFDS_BUILDER
    (tmp_path / "tinypkg").mkdir()
    (tmp_path / "tinypkg" / "__init__.py").write_text("")
    (tmp_path / "tinypkg" / "shapes.py").write_text(TINY_TFDS_BUILDER)
    code = textwrap.dedent("""
        import logging, tinypkg.shapes
        logging.basicConfig(level=logging.INFO)
        from tuneflow.data import ImageRows, load_data
        b = load_data('tfds:tuneflow_tiny_shapes', 16)
        assert isinstance(b.train.x, ImageRows), type(b.train.x)
        print('LOADED', b.classes, len(b.train), len(b.val), int(b.val.x[b.val.y == 1].min()), b.fingerprint())
    """)
    env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"), PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}",
               TUNEFLOW_INMEMORY_MAX_BYTES="1", TUNEFLOW_HOME=str(tmp_path / "home"))
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    lines = [next((ln for ln in r.stdout.splitlines() if ln.startswith("LOADED")), r.stdout + r.stderr[-3000:])
             for r in runs]
    assert lines[0].startswith("LOADED ['dark', 'light'] 16 6 220") and lines[0] == lines[1], lines
    assert "decoded images: reusing" in runs[1].stderr and "reusing" not in runs[0].stderr


def _tiny_feature_model(size=16, dims=64, seed=0):
    """A small convolutional feature model: pooled vectors of ``dims`` floats."""
    import keras
    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(keras.layers.Rescaling(1 / 255)(inp))
    out = keras.layers.Dense(dims)(keras.layers.GlobalAveragePooling2D()(h))
    return keras.Model(inp, out)


def _store(path: Path, n: int, size=16, seed=0) -> Path:
    """An on-disk image store (an .npy of uint8 rows) without decoding files."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    arr[:] = np.random.default_rng(seed).integers(0, 256, arr.shape, dtype=np.uint8)
    arr.flush()
    return path


def _engines():
    from tuneflow.features.infer import openvino_available
    return ["tensorflow"] + (["openvino"] if openvino_available() else [])


@pytest.mark.parametrize("engine", _engines())
def test_streamed_feature_pass_gives_the_in_ram_features_in_a_checksummed_npy(tmp_path, on_disk, engine):
    import hashlib
    from tuneflow.data.store import ImageRows
    from tuneflow.features import cache as fcache
    from tuneflow.features.extractor import FeatureExtractor
    x = ImageRows(np.load(_store(tmp_path / "imgs.npy", 37), mmap_mode="r"), path=str(tmp_path / "imgs.npy"))
    train, val = x.take(np.arange(0, 29)), x.take(np.arange(29, 37))
    ex = FeatureExtractor(_tiny_feature_model(), engine, batch_size=5)  # batches straddle train and val
    ref = ex.run(np.asarray(x))  # the whole pass in RAM, as before
    got = {}

    def fill_train(out_tr):
        def fill_val(out_va):
            ex.compute_into([out_tr, out_va], [train, val])
        got["val"] = fcache.cached_into(f"stream-val-{engine}", (1, 8, 64), np.float32, fill_val)[0]
    ftr, hit = fcache.cached_into(f"stream-train-{engine}", (1, 29, 64), np.float32, fill_train)
    assert not hit and isinstance(ftr, np.memmap) and isinstance(got["val"], np.memmap)
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(np.concatenate([ftr[0], got["val"][0]]), ref, atol=1e-5 * scale, rtol=1e-5)
    assert ex.stats[-1][0] == 37 and ex.used.startswith(engine)
    np.testing.assert_allclose(ex.compute([train, val])[0], ref, atol=1e-5 * scale, rtol=1e-5)  # in RAM
    for key, n in ((f"stream-train-{engine}", 29), (f"stream-val-{engine}", 8)):
        path = fcache.cache_root() / f"{key}.npy"
        assert np.load(path).shape == (1, n, 64)  # a plain .npy anyone can read
        assert path.with_suffix(".sha256").read_text() == hashlib.sha256(path.read_bytes()).hexdigest()
    again, hit = fcache.cached_into(f"stream-train-{engine}", (1, 29, 64), np.float32, fill_train)
    assert hit and np.array_equal(again, ftr)
    # views: (views, N, ...) written view by view
    three = np.empty((3, 29, 64), np.float16)
    ex.compute_into(three, train, lambda b: b[:, ::-1], views=3)
    np.testing.assert_allclose(three[0], ref[:29], atol=2e-3 * scale, rtol=2e-3)
    np.testing.assert_allclose(three[2], ex.run(np.asarray(train)[:, ::-1]), atol=2e-3 * scale, rtol=2e-3)


def test_a_nan_batch_is_refused_before_it_is_written(tmp_path, on_disk):
    import keras
    from tuneflow.errors import TuneflowError
    from tuneflow.features import cache as fcache
    from tuneflow.features.extractor import FeatureExtractor
    inp = keras.Input((4, 4, 3))
    out = keras.layers.GlobalAveragePooling2D()(keras.layers.Lambda(lambda t: t / (t - 7.0))(inp))
    ex = FeatureExtractor(keras.Model(inp, out), "tensorflow", batch_size=4)
    x = np.zeros((10, 4, 4, 3), np.uint8)
    x[6] = 7  # 0/0 in image 6 (second batch)
    with pytest.raises(TuneflowError, match="first at index 6"):
        fcache.cached_into("nan-pass", (1, 10, 3), np.float32, lambda o: ex.compute_into(o, x))
    assert not fcache.exists("nan-pass") and not list(fcache.cache_root().glob("nan-pass*"))


KILL_PROBE = textwrap.dedent("""
    import sys, time
    import numpy as np
    from tuneflow.features import cache as fcache

    def fill(out):
        out[:50] = 1.0
        print("HALF", flush=True)
        time.sleep(60)
        out[50:] = 2.0
    fcache.cached_into("killed-pass", (100, 8), np.float32, fill)
""")


def test_a_killed_feature_pass_leaves_no_cache_file_and_its_leftover_is_removed(tmp_path, monkeypatch):
    import signal
    from tuneflow.features import cache as fcache
    home = tmp_path / "home"
    env = {**os.environ, "TUNEFLOW_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_PROBE], stdout=subprocess.PIPE, env=env, cwd=REPO)
    try:
        assert proc.stdout.readline().decode().strip() == "HALF"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    monkeypatch.setenv("TUNEFLOW_HOME", str(home))
    root = fcache.cache_root()
    assert not fcache.exists("killed-pass") and not (root / "killed-pass.sha256").exists()
    assert len(list(root.glob("killed-pass-*.npy.part"))) == 1  # what the killed pass left
    feats, hit = fcache.cached_into("killed-pass", (100, 8), np.float32, lambda o: o.__setitem__(slice(0, 100), 3.0))
    assert not hit and (np.asarray(feats) == 3.0).all()
    assert not list(root.glob("*.part"))  # the dead writer's leftover was removed


def _plan(batch=8, sampling="shuffle", replicas=1, class_weights=None):
    from types import SimpleNamespace
    return SimpleNamespace(global_batch=batch, class_weights=class_weights, replicas=replicas,
                           recipe=SimpleNamespace(sampling=sampling))


@pytest.mark.parametrize("sampling", ["shuffle", "balanced"])
def test_heads_train_from_a_memory_mapped_cache_without_copying_it(tmp_path, monkeypatch, sampling):
    import keras
    from tuneflow.training.stages import cached_dataset, call_direct
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


RSS_PASS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tuneflow.training.distribute as dist
    from tuneflow.data.store import ImageRows
    from tuneflow.features import cache as fcache
    from tuneflow.features.extractor import FeatureExtractor
    sys.path.insert(0, "tests")
    from test_scale import _tiny_feature_model

    dist.STREAM_OUTPUT_BYTES = 1 << 20  # TensorFlow engine: 1 MB of outputs a predict call
    engine, mode = sys.argv[3], sys.argv[4]

    def hwm():
        return int(dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)["VmHWM"].split()[0])

    ex = FeatureExtractor(_tiny_feature_model(dims=2048), engine, batch_size=64)
    peaks = []
    for i, path in enumerate(sys.argv[1:3]):
        x = ImageRows(np.load(path, mmap_mode="r"), path=path)
        if mode == "streamed":
            fcache.cached_into(f"rss-{i}", (1, len(x), 2048), np.float32, lambda o: ex.compute_into(o, x))
        else:  # everything in RAM: what the test must be able to tell apart
            ex.compute(x)
        peaks.append(hwm())
    print(json.dumps({"hwm_kb": peaks}))
""")

PASS_BOUND_KB = 16_000  # VmHWM growth allowed from 400 to 4,000 images (their 2048-d features: 31 MB)


@pytest.mark.slow
@pytest.mark.parametrize("engine", _engines())
def test_feature_pass_over_a_10x_larger_store_keeps_peak_rss_flat(tmp_path, engine):
    small, big = _store(tmp_path / "small.npy", 400), _store(tmp_path / "big.npy", 4000, seed=1)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TUNEFLOW_HOME": str(tmp_path / "home"),
           "TUNEFLOW_INMEMORY_MAX_BYTES": "1"}
    grown = {}
    for mode in ("streamed", "in_ram"):
        out = subprocess.run([sys.executable, "-c", RSS_PASS, str(small), str(big), engine, mode],
                             capture_output=True, env=env, cwd=REPO, timeout=300)
        assert out.returncode == 0, out.stderr.decode()[-3000:]
        peaks = json.loads(out.stdout.decode().strip().splitlines()[-1])["hwm_kb"]
        grown[mode] = peaks[1] - peaks[0]
    print(engine, "VmHWM growth, kB:", grown)
    assert grown["streamed"] < PASS_BOUND_KB, grown
    assert grown["in_ram"] > 4000 * 2048 * 4 / 1024 * 0.9, grown  # the probe sees features held in RAM


SHARD_WORKER = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import tuneflow.training.stages as stages
    from tuneflow import finetune
    from tuneflow.data import Split
    from tuneflow.recipe import Recipe

    data, out, dump, weights = sys.argv[1:5]
    reads, shards = [], []

    class Recorder:  # the training images as the engine's input pipeline reads them
        def __init__(self, x):
            self.x, self.shape, self.dtype = x, x.shape, x.dtype
        def __len__(self):
            return len(self.x)
        def __getitem__(self, i):
            reads.append(np.atleast_1d(i).tolist())
            return self.x[i]

    real = stages.train_dataset
    def train_dataset(split, *a, **k):
        shards.append(k.get("shard"))
        return real(Split(Recorder(split.x), split.y, split.files), *a, **k)
    stages.train_dataset = train_dataset

    ov = dict(input_size=32, backbone="efficientnet_lite0", weights=weights, batch_size=4, precision="float32", strategy="multiworker",
              head__epochs=1, finetune__epochs=2, head__patience=0, finetune__patience=0)
    if "prefix_cache" in Recipe.__dataclass_fields__:
        ov["prefix_cache"] = "off"  # the fine-tuning stage reads images, not cached activations
    res = finetune("large_similar", data, out, overrides=ov, verbose=0)
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    with open(f"{dump}/reads{index}.json", "w") as f:
        json.dump({"reads": reads, "shards": shards, "train_counts": res.report["train_counts"]}, f)
""")


@pytest.mark.slow
def test_two_workers_each_read_their_own_share_of_the_training_images(tmp_path):
    """A real two-process MultiWorkerMirroredStrategy run: in the fine-tuning stage each worker's
    input pipeline reads only its own images, and together they read every image once an epoch."""
    from test_distribute import _free_ports, _worker_command, _workers
    _, out, cmd = _worker_command(tmp_path, SHARD_WORKER)
    codes, logs = _workers(cmd, _free_ports(2), tmp_path)
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    got = [json.loads((tmp_path / f"reads{i}.json").read_text()) for i in range(2)]
    n = sum(got[0]["train_counts"].values())
    assert [g["shards"] for g in got] == [[[2, 0]], [[2, 1]]]
    # One batch of indices a read; a worker's share here is one batch an epoch, and both workers
    # draw the same epoch order, so their k-th reads come from the same epoch (Keras's first read
    # builds the model, then one a training epoch).
    reads = [g["reads"] for g in got]
    assert len(reads[0]) == len(reads[1]) >= 2 and len(reads[0][0]) == (n + 1) // 2
    for a, b in zip(*reads):
        assert set(a) | set(b) == set(range(n)), (a, b)  # every training image, once ...
        assert len(a) + len(b) <= n + 1, (a, b)  # ... but for at most one padded repeat (odd n)
    assert len(reads[0]) >= 3  # the two epochs were read (after the build's read)


def test_a_recipe_runs_from_the_store_and_a_memory_mapped_cache(tmp_path, on_disk, caplog):
    """small_similar with everything on disk: images in the store, features written as they are
    computed and read back mapped, and the linear head (too big for L-BFGS under this limit)
    trained by its optimizer from the mapped cache."""
    import logging

    from conftest import random_lite0_weights
    from tuneflow import finetune
    from tuneflow.features import cache as fcache
    data = make_image_folder(tmp_path / "d", per_class=10, size=24)
    ov = {"input_size": 32, "backbone": "efficientnet_lite0", "weights": random_lite0_weights(), "batch_size": 8, "precision": "float32",
          "head__epochs": 2}
    before = set(fcache.cache_root().glob("*.npy")) if fcache.cache_root().exists() else set()
    with caplog.at_level(logging.INFO, logger="tuneflow"):
        res = finetune("small_similar", data, tmp_path / "r", overrides=ov, verbose=0)
    assert "memory-mapped" in caplog.text and "trained by the stage's optimizer instead" in caplog.text
    assert res.report["stages"][0]["optimizer"] != "lbfgs"
    rows = (tmp_path / "r" / "metrics.csv").read_text().strip().splitlines()[1:]
    assert len(rows) == 2  # two optimizer epochs, not one L-BFGS row
    new = set(fcache.cache_root().glob("*.npy")) - before
    assert len(new) == 2 and all(isinstance(np.load(p, mmap_mode="r"), np.memmap) for p in new)
    assert 0.0 <= res.report["val_accuracy"] <= 1.0


def test_views_of_a_mapped_cache_are_read_with_pread_at_their_own_offsets(tmp_path):
    """A (V, N, ...) cache (a cached prefix's augmented views): each view becomes a map of its
    own at its true offset, read with pread (not paged into the process through the map), and
    the training batches read view e % V in epoch e, cast to float32."""
    from tuneflow.features.cache import rows_view, split_views
    from tuneflow.training.stages import cached_dataset
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
