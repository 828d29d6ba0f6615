"""The environment around tuneflow: `make` with paths holding spaces and quotes, and a console free
of CUDA lines on machines without an NVIDIA GPU."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, make_image_folder, random_lite0_weights
from tuneflow.tf_import import has_nvidia_device, is_noise

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _fake_bin(folder: Path) -> Path:
    """A bin folder whose `tuneflow` writes the argv it received as JSON: what the shell passed."""
    folder.mkdir(parents=True)
    script = folder / "tuneflow"
    script.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      "json.dump(sys.argv[1:], open(os.environ['ARGV_JSON'], 'w'))\n")
    script.chmod(0o755)
    (folder / "installed").touch()  # newer than setup.cfg: make does not reinstall
    return folder


@needs_make
def test_make_finetune_passes_paths_with_spaces_and_quotes_as_single_arguments(tmp_path):
    bindir = _fake_bin(tmp_path / "bin dir's")
    stamp = _fake_bin(tmp_path / "stamp") / "installed"  # a make target: make cannot have spaces there
    data, out = tmp_path / "my photos" / "it's here", tmp_path / "runs dir" / "x"
    recipe = tmp_path / "my recipes" / "best recipe.json"
    argv_json = tmp_path / "argv.json"
    subprocess.run(["make", "-s", "-C", str(REPO), "finetune", f"BIN={bindir}", f"STAMP={stamp}",
                    f"DATA={data}", f"OUT={out}", f"RECIPE={recipe}",
                    "ARGS=--set batch_size=8 --set 'classes=a,b'"],
                   env=dict(os.environ, ARGV_JSON=str(argv_json)), check=True, timeout=60)
    assert json.loads(argv_json.read_text()) == [
        "finetune", str(recipe), "--data", str(data), "--out", str(out),
        "--set", "batch_size=8", "--set", "classes=a,b"]
    subprocess.run(["make", "-s", "-C", str(REPO), "finetune", f"BIN={bindir}", f"STAMP={stamp}"],
                   env=dict(os.environ, ARGV_JSON=str(argv_json)), check=True, timeout=60)
    assert json.loads(argv_json.read_text()) == ["finetune", "small_similar", "--data", "data/digits"]


@needs_make
@pytest.mark.slow
def test_make_finetune_trains_on_a_folder_whose_name_has_spaces(tmp_path):
    data = make_image_folder(tmp_path / "my images (v2)", per_class=6)
    out = tmp_path / "run folder"
    stamp = _fake_bin(tmp_path / "stamp dir") / "installed"
    bindir = Path(sys.executable).parent
    r = subprocess.run(["make", "-s", "-C", str(REPO), "finetune", f"BIN={bindir}", f"STAMP={stamp}",
                        f"DATA={data}", f"OUT={out}",
                        f"ARGS=--set weights={random_lite0_weights()} --set backbone=efficientnet_lite0 --set input_size=32 --set head.epochs=1 "
                        "--set feature_engine=tensorflow"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert "val_accuracy" in report and str(data) in (out / "recipe.json").read_text() + json.dumps(report)


@pytest.mark.skipif(has_nvidia_device(), reason="this machine has an NVIDIA GPU: CUDA lines are real news")
def test_no_cuda_lines_on_a_machine_without_a_gpu():
    exe = Path(sys.executable).parent / "tuneflow"
    cmd = [str(exe), "recipes"] if exe.exists() else [sys.executable, "-m", "tuneflow", "recipes"]
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "TF_CPP_MIN_LOG_LEVEL")}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "small_similar" in r.stdout, r.stderr
    cuda = [ln for ln in r.stderr.splitlines() if re.search(r"cuda|cuInit", ln, re.I)]
    assert cuda == [], r.stderr
    assert "absl::InitializeLog" not in r.stderr


def test_only_noise_is_dropped():
    banner = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    cuinit = ("E0000 00:00:1795524650.613043    8035 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
              "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n")
    stub = "I0000 00:00:1795524643.340019    8035 cudart_stub.cc:31] Could not find cuda drivers on your machine\n"
    onednn = "I0000 00:00:1795524643.339691    8035 port.cc:153] oneDNN custom operations are on.\n"
    other_error = "E0000 00:00:1795524650.613043    8035 env.cc:1] disk full writing /tmp/x\n"
    for line in (banner, cuinit, stub):
        assert is_noise(line, level=0)
    assert is_noise(onednn, level=2) and not is_noise(onednn, level=0)  # TF_CPP_MIN_LOG_LEVEL honoured
    assert not is_noise(other_error, level=2)
    assert not is_noise("UserWarning: something a user must see\n", level=3)
