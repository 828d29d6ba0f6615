"""K-fold cross-validation: one resumable sub-run per fold; the best fold's artifact becomes the run's model."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time

import numpy as np

from ..data import DataBundle, kfold
from ..runs import names, report as rep
from ..runs.folder import RunDir
from ..training.plan import Plan
from .one_run import train_and_evaluate

log = logging.getLogger("tuneflow")

# What the best fold leaves in the run folder itself, so the run is used like any other.
FINAL_FILES = (names.SAVEDMODEL, names.KERAS, names.LABELS, names.PREDICTIONS, names.BACKBONE_WEIGHTS,
               names.BACKBONE_JSON, names.CONFUSION, names.CONFUSION_CSV, names.CURVES, names.TOP_LOSSES)


def _finished_report(folder) -> dict | None:
    try:
        info = json.loads((folder / names.RUN).read_text())
        if info.get("status") == "finished":
            return json.loads((folder / names.REPORT).read_text())
    except (OSError, ValueError):
        pass
    return None


def cross_validate(plan: Plan, bundle: DataBundle, run: RunDir, verbose, resume: bool, export: bool = True) -> dict:
    """Train ``folds`` sub-runs (``fold-1`` ...) whose validation sets partition train+val. A resumed
    K-fold run keeps finished folds and resumes the interrupted one from its checkpoints.
    ``export=False`` (``--no-export``, a search trial): no fold writes an artifact."""
    r = plan.recipe
    folds = []
    for i, fold in enumerate(kfold(bundle, r.folds, r.seed)):
        path = run / f"fold-{i + 1}"
        done = _finished_report(path) if resume else None
        if done is not None:
            log.info("fold %d: finished earlier (val accuracy %.4f)", i + 1, done["val_accuracy"])
            folds.append(done)
            continue
        again = resume and (path / names.RUN).exists()
        with RunDir.open(path, r.name, overwrite=not again, resume=again) as sub:
            sub.start(r.to_dict(), fold.fingerprint(), force=False)
            sub.write_json(names.LABELS, {str(j): c for j, c in enumerate(bundle.classes)})
            sub.status("running", recipe=r.name, fold=i + 1)
            fold_plan = Plan.make(r, fold, plan.strategy, plan.precision)
            t0 = time.time()
            report, _ = train_and_evaluate(fold_plan, fold, sub, verbose, again, export=export)
            report["wall_seconds"] = round(time.time() - t0, 2)
            sub.write_json(names.REPORT, report)
            sub.write_text(names.REPORT_MD, rep.markdown(report))
            sub.status("finished", val_accuracy=report["val_accuracy"])
        folds.append(report)
    accs = np.array([f["val_accuracy"] for f in folds])
    losses = np.array([f["val_loss"] for f in folds])
    best = int(max(range(len(folds)), key=lambda j: (accs[j], -losses[j])))
    _adopt(run, run / f"fold-{best + 1}")
    final = folds[best]
    return {**final,
            "folds": r.folds, "fold_mean_val_accuracy": float(accs.mean()), "val_accuracy_std": float(accs.std()),
            "fold_mean_val_loss": float(losses.mean()), "val_loss_std": float(losses.std()),
            "fold_val_accuracy": accs.tolist(), "final_model": f"fold-{best + 1}",
            "fold_mean_majority_rate": float(np.mean([f["majority_rate"] for f in folds])),
            "final_model_note": (f"The run's model is fold {best + 1}'s (the best of {r.folds} by val accuracy); "
                                 "val_accuracy is that fold's held-out accuracy, which as the best of "
                                 f"{r.folds} is optimistic: quote fold_mean_val_accuracy "
                                 f"({accs.mean():.4f} ± {accs.std():.4f}) as the estimate.")}


def _adopt(run: RunDir, fold_dir) -> None:
    """Copy the best fold's artifact and pictures into the run folder (each replaced atomically)."""
    for name in FINAL_FILES:
        src, dst = fold_dir / name, run / name
        if not src.exists():
            continue
        tmp = run / f".{name}.adopt"
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        if src.is_dir():
            shutil.copytree(src, tmp)
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(tmp, dst)
        else:
            shutil.copy2(src, tmp)
            os.replace(tmp, dst)
