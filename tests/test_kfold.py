"""K-fold cross-validation (tuneflow.fit.kfold): a sub-run per fold, mean and spread, --no-export in every fold."""
import json

from conftest import fast_overrides as _fast, make_image_folder
from tuneflow import finetune


def test_kfold_reports_mean_and_spread(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=6)
    res = finetune("small_similar", root, tmp_path / "r", verbose=0, overrides={**_fast("small_similar"), "folds": 3})
    assert len(res.report["fold_val_accuracy"]) == 3 and "val_accuracy_std" in res.report
    assert (tmp_path / "r" / "fold-3" / "report.md").exists()


def test_no_export_reaches_every_fold(tmp_path):
    """--no-export (what search trials run) with folds: no fold and not the run writes model/;
    every fold reports training's own path."""
    root = make_image_folder(tmp_path / "d", per_class=6)
    res = finetune("small_similar", root, tmp_path / "r", verbose=0, export=False,
                   overrides={**_fast("small_similar"), "folds": 2})
    assert len(res.report["fold_val_accuracy"]) == 2
    for folder in (tmp_path / "r", tmp_path / "r" / "fold-1", tmp_path / "r" / "fold-2"):
        assert not (folder / "model").exists() and not (folder / "model.keras").exists()
    for i in (1, 2):
        rep = json.loads((tmp_path / "r" / f"fold-{i}" / "report.json").read_text())
        assert rep["evaluated"].startswith("no artifact") and rep["artifact_seconds"] is None
