"""The streamed feature pass (tuneflow.features.extractor): features written as they are computed, from
the store, in a checksummed file; NaN batches refused, a killed pass leaves nothing, peak memory flat."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, make_image_folder


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


RSS_PASS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tuneflow.features.predict as dist
    from tuneflow.data.store import ImageRows
    from tuneflow.features import cache as fcache
    from tuneflow.features.extractor import FeatureExtractor
    sys.path.insert(0, "tests")
    from test_extractor import _tiny_feature_model

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


@pytest.mark.slow
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
