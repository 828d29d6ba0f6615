"""The model card the service's page shows (``/v1/info``'s ``card``): what the run measured, read from its folder."""
from __future__ import annotations

import csv
import json
from pathlib import Path

CURVE_KEYS = ("stage", "epoch", "loss", "accuracy", "val_loss", "val_accuracy")


def run_folder(run) -> Path | None:
    """The run folder of what ``tuneflow serve`` was given (a run folder or its ``model/``)."""
    p = Path(run)
    for folder in (p, p.parent):
        if (folder / "report.json").is_file():
            return folder
    return None


def model_card(run) -> dict | None:
    """Validation accuracy against the majority rate, verdict, per-class table, confusion matrix,
    curves (one row an epoch) and the recipe of a finished run; None when there is no report."""
    folder = run_folder(run)
    if folder is None:
        return None
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        recipe = json.loads((folder / "recipe.json").read_text())
    except (OSError, ValueError):
        recipe = None
    curves = []
    try:
        with open(folder / "metrics.csv", newline="") as f:
            for row in csv.DictReader(f):
                curves.append({k: _number(row.get(k)) for k in CURVE_KEYS})
    except OSError:
        pass
    if isinstance(recipe, dict) and isinstance(recipe.get("weights"), str):
        recipe["weights"] = _name(recipe["weights"])
    b = report.get("baseline") or {}
    cm = report.get("confusion_matrix")
    return {"val_accuracy": report.get("val_accuracy"), "val_loss": report.get("val_loss"),
            "majority_rate": report.get("majority_rate"), "majority_class": b.get("majority_class"),
            "beats_majority": b.get("beats_majority"), "p_value": b.get("p_value"),
            "num_train": report.get("num_train"), "num_val": report.get("num_val"),
            "verdict": report.get("verdict"), "advice": report.get("advice"), "weights": _name(report.get("weights")),
            "folds": report.get("folds"), "fold_mean_val_accuracy": report.get("fold_mean_val_accuracy"),
            "per_class": report.get("per_class"), "classes": report.get("classes"),
            "confusion_matrix": cm if isinstance(cm, list) else None, "curves": curves, "recipe": recipe}


def _name(weights):
    """A weights file's name without its folder (where files lie on disk is not the client's
    business, as in the rest of /v1/info); "imagenet" or None as they are."""
    return Path(weights).name if isinstance(weights, str) and ("/" in weights or "\\" in weights) else weights


def _number(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v if v not in ("", None) else None
    return int(f) if f.is_integer() and "." not in str(v) and "e" not in str(v).lower() else f
