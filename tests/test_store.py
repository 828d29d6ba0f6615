"""The memory-mapped image store (tuneflow.data.store): the same bundle as in memory, file-list
subsampling, partial and truncated stores, sharding across workers, streamed sources, bounded memory."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, SHARED, make_image_folder, truncated_jpeg
from tuneflow.data import DataError, ImageRows, load_data
from tuneflow.data.sources import load_folder


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
    truncated_jpeg(bad)
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
