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
