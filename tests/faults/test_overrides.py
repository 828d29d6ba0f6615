"""Bad overrides, injected for real (files on disk, the CLI in a subprocess): each is one clear error
naming the key or the file, never a traceback and never a silently random backbone."""
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

import tuneflow.recipes as registry
from conftest import REPO, make_image_folder
from tuneflow.recipe import RecipeError


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _h5(path, with_weights=True):
    with h5py.File(path, "w") as f:
        if with_weights:
            f.create_dataset("layers/dense/vars/0", data=np.zeros((2, 2), np.float32))
    return path


@pytest.mark.parametrize("make, msg", [
    (lambda p: p / "missing.weights.h5", r"weights='.*missing.weights.h5': no such file or folder; use 'imagenet', None"),
    (lambda p: _write(p / "notes.weights.h5", b"these are not weights\n"),
     r"notes.weights.h5 is not a readable HDF5 weights file \(.*\); use 'imagenet'"),
    (lambda p: _write(p / "model.keras", b"PK\x03\x04zip"),
     r"is not a Keras weights file \(it does not end in .h5 or .hdf5\)"),
    (lambda p: (p / "run").mkdir() or p / "run", r"is a folder without backbone.weights.h5 \(not a tuneflow run folder\)"),
    (lambda p: _h5(p / "empty.weights.h5", with_weights=False), r"empty.weights.h5 holds no weights"),
    (lambda p: "", r"weights='' is empty"),
])
def test_weights_that_are_not_keras_weights_are_refused(tmp_path, make, msg):
    with pytest.raises(RecipeError, match=msg):
        registry.get("small_similar").override(weights=str(make(tmp_path)))


def test_real_weights_files_and_run_folders_are_accepted(tmp_path):
    f = _h5(tmp_path / "mine.weights.h5")
    assert registry.get("small_similar").override(weights=str(f)).weights == str(f)
    run = tmp_path / "old run"
    (run / "model").mkdir(parents=True)
    _h5(run / "model" / "backbone.weights.h5")
    assert registry.get("small_similar").override(weights=str(run)).weights == str(run)
    legacy = _h5(tmp_path / "resnet50_notop.h5")  # a keras.applications download
    assert registry.get("small_similar").override(f"weights={legacy}").weights == str(legacy)


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "tuneflow", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_reports_bad_numbers_and_weights_in_one_line(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4)
    (tmp_path / "notes.weights.h5").write_text("not weights")
    cases = [("head.lr=nan", "head.lr=nan is not a finite number; use a value in (0, 10]"),
             ("head.epochs=inf", "head.epochs='inf' is not a finite number; use an integer in [1, 100000]"),
             (f"weights={tmp_path / 'notes.weights.h5'}", "is not a readable HDF5 weights file")]
    for pair, msg in cases:
        r = _cli("finetune", "small_similar", "--data", str(data), "--out", str(tmp_path / "run"),
                 "--set", pair, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert f"tuneflow: error: " in r.stderr and msg in r.stderr, r.stderr
        assert "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("recipe, msg", [
    ("small_similar", "backbone='nope' is not valid; choose one of densenet121"),
    ("auto", "Unknown backbone 'nope'. Available: densenet121"),  # auto probes with it first
])
def test_an_unknown_backbone_is_one_line_for_a_recipe_and_for_auto(tmp_path, recipe, msg):
    data = make_image_folder(tmp_path / "data", per_class=4)
    r = _cli("finetune", recipe, "--data", str(data), "--out", str(tmp_path / "run"), "--set", "backbone=nope",
             cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "tuneflow: error: " in r.stderr and msg in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


# -- the feature-pass batch adapts to input size and to memory ---------------------------------

def test_feature_pass_batch_shrinks_with_input_size_and_free_memory(caplog):
    from tuneflow import build_backbone
    from tuneflow.features import extractor as ex
    m = build_backbone("efficientnet_lite0", weights=None, input_size=96)
    per = ex.activation_bytes(m)
    assert per > 0
    plenty = 10 ** 13
    assert ex.infer_batch(96, model=m, available=plenty) == 64
    assert ex.infer_batch(448, available=plenty) == 16      # 4x the pixels of 224 -> a quarter
    assert ex.infer_batch(2048, available=plenty) == 1
    with caplog.at_level("WARNING", logger="tuneflow"):
        assert ex.infer_batch(96, model=m, available=int(5.5 * per / ex.MEMORY_SHARE)) == 5
    assert "so the batch is 5" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="tuneflow"):
        assert ex.infer_batch(96, model=m, available=0) == 1
    assert "lower input_size" in caplog.text
    # without a model (a loaded artifact) the estimate is per pixel, so it shrinks too
    assert ex.infer_batch(224, available=int(3.5 * ex.LIVE_FACTOR * 4 * ex.FLOATS_PER_PIXEL * 224 * 224
                                             / ex.MEMORY_SHARE)) == 3


def test_available_memory_takes_the_least_of_the_machine_and_its_cgroup(tmp_path):
    from tuneflow.features.extractor import available_memory
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal: 24000000 kB\nMemAvailable: 20000000 kB\n")
    assert available_memory(tmp_path) == 20000000 * 1024
    cg = tmp_path / "sys/fs/cgroup"
    cg.mkdir(parents=True)
    (cg / "memory.max").write_text("max\n")            # no limit: the machine's figure holds
    (cg / "memory.current").write_text("1000\n")
    assert available_memory(tmp_path) == 20000000 * 1024
    (cg / "memory.max").write_text(str(2 << 30))       # a 2 GB container with 0.5 GB in use
    (cg / "memory.current").write_text(str(1 << 29))
    assert available_memory(tmp_path) == (2 << 30) - (1 << 29)
    (cg / "memory.current").write_text(str(3 << 30))   # over its limit: nothing left, never negative
    assert available_memory(tmp_path) == 0
    real = available_memory()
    assert 0 < real <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_the_activation_estimate_bounds_the_memory_a_forward_pass_takes():
    """In a fresh process: the peak RSS growth of a real forward pass (VmHWM after clear_refs) stays
    under the estimate, so a batch sized by it fits."""
    code = r'''
import numpy as np, keras
from tuneflow import build_backbone
from tuneflow.features.extractor import activation_bytes
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
for name in ("efficientnet_lite0", "resnet50"):
    b = build_backbone(name, weights=None, input_size=160)
    m = keras.Model(b.input, keras.layers.GlobalAveragePooling2D()(b.output))
    x = np.random.default_rng(0).integers(0, 255, (16, 160, 160, 3)).astype(np.float32)
    m.predict(x[:1], verbose=0)
    m.predict(x[:2], batch_size=2, verbose=0)  # a second shape: Keras retraces once, batch-generic
    # (the retrace is not an activation: measured, it broke the bound under load)
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    m.predict(x, batch_size=16, verbose=0)
    print(name, (status("VmHWM") - base) / 16, activation_bytes(m))
'''
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["efficientnet_lite0"], ["resnet50"])]
    assert len(rows) == 2, out.stdout
    for name, measured, estimate in rows:
        assert float(measured) <= float(estimate), (name, measured, estimate)


def test_feature_extractor_uses_the_memory_batch_and_gives_the_same_features(monkeypatch):
    import keras
    from tuneflow import build_backbone
    from tuneflow.features import extractor as ex
    b = build_backbone("efficientnet_lite0", weights=None, input_size=64)
    pooled = keras.Model(b.input, keras.layers.GlobalAveragePooling2D()(b.output))
    x = np.random.default_rng(1).integers(0, 255, (10, 64, 64, 3)).astype(np.uint8)
    roomy = ex.FeatureExtractor(pooled, "tensorflow")
    assert roomy.batch_size == 64
    monkeypatch.setattr(ex, "available_memory", lambda: int(3.5 * ex.activation_bytes(pooled) / ex.MEMORY_SHARE))
    tight = ex.FeatureExtractor(pooled, "tensorflow")
    assert tight.batch_size == 3
    np.testing.assert_allclose(tight.run(x), roomy.run(x), atol=1e-5)
