"""K-fold cross-validation (tuneflow.fit.kfold): a sub-run per fold, mean and spread, --no-export in every fold."""
import json

import numpy as np
import pytest

from conftest import fast_overrides as _fast, make_image_folder
from tuneflow import finetune


@pytest.mark.slow
def test_kfold_reports_mean_and_spread_and_the_run_holds_the_best_folds_model(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=6)
    res = finetune("small_similar", root, tmp_path / "r", verbose=0, overrides={**_fast("small_similar"), "folds": 2})
    accs = res.report["fold_val_accuracy"]
    assert len(accs) == 2 and res.report["val_accuracy_std"] == np.std(accs)
    assert res.report["fold_mean_val_accuracy"] == np.mean(accs)
    assert (tmp_path / "r" / "fold-2" / "report.md").exists()
    best = res.report["final_model"]
    assert best in ("fold-1", "fold-2") and res.report["val_accuracy"] == max(accs)
    for name in ("model.keras", "labels.json"):  # the best fold's artifact, adopted by the run
        assert (tmp_path / "r" / name).read_bytes() == (tmp_path / "r" / best / name).read_bytes()


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
