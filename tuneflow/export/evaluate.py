"""Evaluation of the artifact: the report's numbers come from the exported float32 model a user loads."""
from __future__ import annotations

import csv
import logging
import os

import numpy as np

from ..backbones import save_backbone
from ..data import DataBundle, Split
from ..runs import names, report as rep
from ..runs.folder import RunDir
from ..runs.pictures import top_losses_grid
from ..training.assemble import Assembly
from ..training.plan import Plan
from ..training.stages import Outcome, val_metrics
from .artifact import write_artifact
from .predictor import Predictor, load
from .restore import artifact_models

log = logging.getLogger("tuneflow")



def predict_split(predictor: Predictor, split: Split, batch_size: int | None = None) -> np.ndarray:
    """Probabilities of the artifact on a split: its images read from their files (decoded, then
    resized by the model's own resize), or the arrays themselves for array data."""
    if split.files and len(split.files) == len(split):
        return predictor.predict_proba(split.files, batch_size, progress=len(split) >= 500)
    batch_size = batch_size or predictor.batch_size
    return np.concatenate([predictor.classify_prepared(split.x[i:i + batch_size].astype(np.float32))
                           for i in range(0, len(split), batch_size)] or
                          [np.zeros((0, len(predictor.classes)), np.float32)])


def write_predictions(run: RunDir, split: Split, probs: np.ndarray, classes: list[str]) -> None:
    """``val_predictions.csv``: path, true class, predicted class, its probability (and every class's)."""
    tmp = run / (names.PREDICTIONS + ".tmp")
    pred = probs.argmax(1)
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true_class", "predicted_class", "probability"] + [f"p_{c}" for c in classes])
        for i in range(len(split)):
            path = os.path.abspath(split.files[i]) if split.files else f"val[{i}]"
            w.writerow([path, classes[split.y[i]], classes[pred[i]], f"{probs[i, pred[i]]:.6f}"]
                       + [f"{p:.6f}" for p in probs[i]])
    os.replace(tmp, run / names.PREDICTIONS)


def evaluate(plan: Plan, bundle: DataBundle, run: RunDir, asm: Assembly, outcome: Outcome,
             export: bool = True) -> dict:
    """Export the artifact, load it back from disk, and measure it on the validation (and test)
    images; the fast path's own accuracy is kept beside it when the two differ.

    ``export=False`` (a search trial) measures training's own path instead, writes no ``model/``
    and no test accuracy: on cached features the export, reload and image pass take ~29 of a
    trial's ~36 s on ants_bees, for an artifact nobody loads (the search's best recipe is trained
    again by ``tuneflow finetune``, which exports)."""
    import time
    r = plan.recipe
    predictor = timing = None
    if export:
        t0 = time.time()
        write_artifact(artifact_models(plan, asm), run.path)
        save_backbone(asm.backbone, run.path, plan.spec.name)
        t1 = time.time()
        predictor = load(run.path)
        t2 = time.time()
        probs = predict_split(predictor, bundle.val)
        t3 = time.time()
        timing = {"export": round(t1 - t0, 2), "load": round(t2 - t1, 2), "evaluate": round(t3 - t2, 2)}
        log.info("artifact: exported in %.1f s, loaded in %.1f s, %d validation images in %.1f s",
                 t1 - t0, t2 - t1, len(probs), t3 - t2)
    else:
        probs = outcome.fast_probs
        log.info("no artifact exported: val accuracy measured by %s", outcome.fast_path)
    m = val_metrics(probs, bundle.val.y)
    write_predictions(run, bundle.val, probs, plan.classes)
    fast = val_metrics(outcome.fast_probs, bundle.val.y) if export and outcome.fast_probs is not None else None
    disagree = int(np.sum(outcome.fast_probs.argmax(1) != probs.argmax(1))) if fast is not None else 0
    if fast is not None and disagree:
        log.info("the exported float32 model gives val accuracy %.4f; training's fast path (%s) "
                 "measured %.4f (%d of %d predictions differ)", m["val_accuracy"], outcome.fast_path,
                 fast["val_accuracy"], disagree, len(probs))
    y_pred = probs.argmax(1)
    table, cm = rep.per_class(bundle.val.y, y_pred, plan.classes)
    rows = run.metrics_rows()
    baseline = rep.majority_baseline(bundle.val.y, y_pred, plan.classes)
    verdict, advice = rep.verdict(rows, baseline)
    health = rep.stage_health(rows, outcome.stages)
    diverged = rep.divergence_advice(health, outcome.model_from, r.name, bundle.source or "DATA")
    if diverged:
        log.warning(diverged)
        advice = f"{advice} {diverged}"
    test_acc = None
    if predictor is not None and bundle.test is not None and len(bundle.test):
        test_acc = float(np.mean(predict_split(predictor, bundle.test).argmax(1) == bundle.test.y))
    if rows:
        rep.plot_curves(rows, run / names.CURVES, f"{r.name} · {plan.spec.name}")
    rep.write_confusion(cm, plan.classes, run.path)
    if bundle.val.files and export:  # the validation images the model is most wrong about, to look at
        # (not for a search trial, export=False: nobody opens a trial's pictures)
        try:
            top_losses_grid(run.path)
        except Exception as exc:  # noqa: BLE001 - a picture must not fail a finished run
            log.warning("top_losses.png not written: %s", exc)
    stats = outcome.extractor_stats
    return {
        "recipe": r.name, "backbone": plan.spec.name, "weights": str(r.weights),
        "from_scratch": plan.from_scratch,
        "input_size": plan.size, "resize": r.resize, "tap": asm.tap, "data": bundle.source,
        "classes": plan.classes, "num_train": len(bundle.train), "num_val": len(bundle.val),
        "num_test": len(bundle.test) if bundle.test is not None else 0,
        "val_accuracy": m["val_accuracy"], "val_loss": m["val_loss"], "test_accuracy": test_acc,
        "artifact_seconds": timing,
        "evaluated": ("model/ (float32 SavedModel, loaded from the run folder) on the validation images "
                      + ("read from their files" if bundle.val.files else "given as arrays")) if export
        else f"no artifact (--no-export): training's path, {outcome.fast_path}",
        "fast_path": None if fast is None else {
            "how": outcome.fast_path, "precision": plan.precision, "val_accuracy": fast["val_accuracy"],
            "val_loss": fast["val_loss"], "predictions_differing": disagree},
        "majority_rate": baseline["majority_rate"], "baseline": baseline,
        "per_class": table,
        # 1000 classes would put a million numbers in the JSON: the full matrix is confusion.csv
        "confusion_matrix": cm.tolist() if len(plan.classes) <= 50 else "confusion.csv",
        "train_counts": bundle.counts("train"), "class_weight": r.class_weight,
        "stages": outcome.stages, "epochs": len(rows), "cached_stages": sum(1 for s in outcome.stages if s["cache"]),
        "strategy": type(plan.strategy).__name__, "replicas": plan.replicas, "per_replica_batch": r.batch_size,
        "global_batch": plan.global_batch, "lr_scale": plan.global_batch / r.batch_size if r.scale_lr else 1.0,
        "precision": plan.precision, "norm": plan.norm, "verdict": verdict, "advice": advice,
        "images_per_second": (outcome.train_images / outcome.train_seconds) if outcome.train_seconds else 0.0,
        "feature_engine": ", ".join(sorted({e for _, _, e in stats})) if stats else None,
        "feature_images_per_second": (sum(n for n, _, _ in stats) / max(sum(t for _, t, _ in stats), 1e-9))
        if stats else None,
        "skipped_files": bundle.skipped, "ignored_files": list(getattr(bundle, "ignored", []) or []),
        "leaks": bundle.leaks, "nan": outcome.nan_note,
        "adapted": getattr(r, "adapted", None) or None,
        "selected_by": "best val_accuracy checkpoint across stages",
        "model_from": outcome.model_from, "stage_health": health,
    }
