"""Each workbench command on the project's own data/digits, as a user runs it (recipe defaults:
ImageNet Lite0 at 288 px), through the CLI: lr-find, doctor, search and compare."""
import csv
import json
import subprocess
import sys

import pytest

from conftest import REPO
from tuneflow.cli import main

DIGITS = REPO / "data" / "digits"

# data/digits is committed (data/make_digits.py remakes it): absent is a broken checkout, a failure.
pytestmark = pytest.mark.slow


def test_lr_find_and_doctor_run_on_digits(tmp_path, capsys):
    assert main(["lr-find", "small_similar", "--data", str(DIGITS), "--set", "head_solver=sgd",
                 "--out", str(tmp_path / "lrf"), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert {"suggested_lr", "rule", "steep", "min"} <= set(found) and found["rule"] == "valley"
    assert not found.get("inconclusive"), found  # ten well-separated classes: the loss falls clearly
    assert 1e-5 < found["suggested_lr"] < 1.0
    assert (tmp_path / "lrf" / "lr_find.png").stat().st_size > 10_000

    assert main(["doctor", "--data", str(DIGITS), "--out", str(tmp_path / "doc"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    status = {c["name"]: c["status"] for c in result["checks"]}
    assert "fail" not in status.values(), result["checks"]
    assert status["model.overfit_one_batch"] == "ok"
    assert (tmp_path / "doc" / "doctor.md").exists()


def test_search_then_compare_its_trials_on_digits(tmp_path, capsys):
    out = tmp_path / "search"
    p = subprocess.run([sys.executable, "-m", "tuneflow", "search", "small_similar", "--data", str(DIGITS),
                        "--trials", "2", "--sampler", "random", "--out", str(out), "--set", "head_solver=sgd",
                        "--set", "head.epochs=8", "--classes", "0,1,2,3,4"], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(out / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"], rows
    assert all(float(r["val_accuracy"]) > 0.5 for r in rows), rows  # 5 classes: chance is 0.2
    for r in rows:  # each trial trained on the class subset only
        assert json.loads((out / r["run"] / "report.json").read_text())["classes"] == ["0", "1", "2", "3", "4"]
    assert (out / "search.png").exists() and (out / "best_recipe.json").exists()
    assert json.loads((out / "best_recipe.json").read_text())["classes"] in ([], None)  # trains on every class
    runs = [str(out / r["run"]) for r in rows]
    assert main(["compare", *runs, "--out", str(tmp_path / "compare.png")]) == 0
    table = capsys.readouterr().out
    assert "head.lr=" in table and (tmp_path / "compare.png").stat().st_size > 10_000
