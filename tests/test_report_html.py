"""report.html (tuneflow.runs.html) of k-fold runs and searches, from the files they leave; errors for folders that hold no report."""
import csv
import json

import numpy as np
import pytest

from tuneflow.errors import RunError
from tuneflow.runs.html import HTML_FILE, write_report_html


def _png(path, colour):
    from PIL import Image
    Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(path)


def _report(acc, folds=None):
    r = {"recipe": "small_similar", "backbone": "efficientnet_lite0", "weights": "imagenet", "classes": ["a", "b"],
         "data": "data/x", "val_accuracy": acc, "val_loss": 0.3, "majority_rate": 0.5, "num_val": 10,
         "num_train": 30, "verdict": "good fit", "advice": "fine",
         "baseline": {"num_val": 10, "val_correct": int(acc * 10), "majority_class": "a", "p_value": 0.01,
                      "beats_majority": True, "needed_correct": 8},
         "per_class": {"a": {"precision": 1.0, "recall": 0.8, "f1": 0.89, "support": 5},
                       "b": {"precision": 0.83, "recall": 1.0, "f1": 0.91, "support": 5}},
         "confusion_matrix": [[4, 1], [0, 5]], "stages": [], "input_size": 64, "resize": "crop"}
    if folds:
        r.update(folds=len(folds), fold_val_accuracy=folds, fold_mean_val_accuracy=float(np.mean(folds)),
                 val_accuracy_std=float(np.std(folds)), fold_mean_majority_rate=0.5, final_model="fold-2",
                 final_model_note="The run's model is fold 2's.")
    return r


def test_kfold_report_shows_the_folds_side_by_side(tmp_path):
    run = tmp_path / "kf"
    run.mkdir()
    (run / "report.json").write_text(json.dumps(_report(0.9, folds=[0.8, 0.9, 0.7])))
    for i, colour in enumerate((10, 120, 240), 1):
        (run / f"fold-{i}").mkdir()
        (run / f"fold-{i}" / "report.json").write_text(json.dumps(_report([0.8, 0.9, 0.7][i - 1])))
        _png(run / f"fold-{i}" / "curves.png", colour)
        _png(run / f"fold-{i}" / "confusion.png", colour)
    text = write_report_html(run).read_text()
    assert "3-fold cross-validation</b>: val accuracy 0.8000 ± 0.0816" in text
    for i, a in enumerate(("0.8000", "0.9000", "0.7000"), 1):
        assert f"fold {i}: val accuracy {a}" in text
    assert "fold 2: val accuracy 0.9000 (the model)" in text
    assert text.count("data:image/png;base64,") == 6  # every fold's curves and confusion, inlined
    assert "(curves.png is missing)" in text  # the run's own pictures were not written here: said so
    assert "http://" not in text and "https://" not in text


def test_search_report_has_the_trials_best_first_and_the_plot(tmp_path):
    s = tmp_path / "search"
    s.mkdir()
    with open(s / "trials.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", "number", "state", "head.lr", "val_accuracy", "val_loss", "epochs", "seconds", "run"])
        w.writerow([0, 0, "COMPLETE", 0.01, 0.75, 0.6, 3, 4.1, "trials/0000"])
        w.writerow([0, 1, "PRUNED", 1.0, "", "", 1, 1.0, "trials/0001"])
        w.writerow([0, 2, "COMPLETE", 0.003, 0.875, 0.4, 3, 4.0, "trials/0002"])
    _png(s / "search.png", 90)
    (s / "best_recipe.json").write_text('{"name": "small_similar", "head": {"lr": 0.003}}')
    text = write_report_html(s).read_text()
    assert "3 trials, 2 complete" in text and "Best trial 2: val accuracy 0.8750" in text
    rows = text.split("<tbody>")[1]
    assert rows.index("0.875") < rows.index("0.75") < rows.index("PRUNED")  # best first, pruned last
    assert text.count("data:image/png;base64,") == 1 and '"lr": 0.003' in text


def test_a_folder_without_a_report_is_named_in_the_error(tmp_path):
    with pytest.raises(RunError, match="has no readable report.json: the run did not finish"):
        write_report_html(tmp_path)
    assert not (tmp_path / HTML_FILE).exists()
    with pytest.raises(RunError, match="is not a folder"):
        write_report_html(tmp_path / "missing")
