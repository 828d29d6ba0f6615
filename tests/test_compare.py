"""tuneflow compare: one table and one figure from real run folders."""
import json
import shutil

import pytest

from conftest import make_image_folder
from tuneflow import finetune
from tuneflow.cli import main
from tuneflow.errors import RunError
from tuneflow.workbench.compare import compare

# The head trained over epochs (curves to compare), not by L-BFGS; no artifact (compare reads the
# report and metrics.csv).
FAST = {"input_size": 32, "backbone": "efficientnet_lite0", "precision": "float32", "head__epochs": 3, "head_solver": "sgd"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    data = make_image_folder(root / "data", per_class=20)
    a = finetune("small_similar", data, root / "a", overrides={**FAST, "head__lr": 1e-3}, verbose=0,
                 export=False).run_dir
    b = finetune("small_similar", data, root / "b", overrides={**FAST, "head__lr": 3e-2, "dropout": 0.5},
                 verbose=0, export=False).run_dir
    return root, a, b


def test_compare_prints_one_table_and_writes_the_curves(runs, capsys):
    root, a, b = runs
    png = root / "cmp.png"
    assert main(["compare", str(a), str(b), "--out", str(png)]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["run", "recipe", "backbone", "differs"]
    for run, lr, dropout in ((a, "0.001", "0.2"), (b, "0.03", "0.5")):
        line = next(x for x in lines if x.startswith(run.name + " "))
        report = json.loads((run / "report.json").read_text())
        assert f"dropout={dropout}, head.lr={lr}" in line and "small_similar" in line
        assert f"{report['val_accuracy']:.4f}" in line and f"{report['val_loss']:.4f}" in line
        assert "input_size" not in line  # equal in both runs: not a difference
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_compare_json_and_a_run_without_report(runs, capsys):
    root, a, b = runs
    partial = root / "partial"  # what a pruned or killed trial leaves: no report.json
    if not partial.exists():
        shutil.copytree(b, partial)
        (partial / "report.json").unlink()
    assert main(["compare", str(a), str(partial), "--out", str(root / "c2.png"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in rows] == ["a", "partial"]
    assert rows[0]["epochs"] == 3 and rows[0]["wall_seconds"] > 0
    assert rows[1]["wall_seconds"] is None and "no report" in rows[1]["status"]
    assert rows[1]["val_accuracy"] == max(r["val_accuracy"] for r in _metrics(partial))


def test_compare_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(RunError, match="not a tuneflow run folder"):
        compare([tmp_path / "x"], out=None)
    assert main(["compare", str(tmp_path / "missing")]) == 2


def _metrics(run):
    import csv
    with open(run / "metrics.csv", newline="") as f:
        return [{"val_accuracy": float(r["val_accuracy"])} for r in csv.DictReader(f)]
