"""What a person reads after a run: plots, per-class metrics, baselines, a verdict and advice."""
from __future__ import annotations

import csv
import math
import os
import shlex
from pathlib import Path

import numpy as np

ALPHA = 0.05  # one-sided significance level for "better than the majority class"
TOP_CONFUSED = 20  # classes shown in confusion.png when there are more (the CSV has them all)


def per_class(y_true, y_pred, classes) -> tuple[dict, np.ndarray]:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    table = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                 "support": int(s[i])} for i, c in enumerate(classes)}
    return table, confusion_matrix(y_true, y_pred, labels=labels)


def majority_rate(y_val, n_classes: int | None = None) -> float:
    """Accuracy of always answering the most frequent validation class: the bar to beat."""
    y = np.asarray(y_val).astype(np.int64).ravel()
    if not len(y):
        return float("nan")
    return float(np.bincount(y, minlength=n_classes or 0).max() / len(y))


def majority_baseline(y_true, y_pred, classes, alpha: float = ALPHA) -> dict:
    """How the model compares with always answering the majority validation class.

    A model beats it when a one-sided exact binomial test rejects "each validation image is
    right with probability = the majority rate" at ``alpha`` (caret's "Acc > NIR" test; R's
    ``confusionMatrix``). On tiny validation sets a raw "accuracy > majority" would call one
    lucky image a win: with 49 images at a majority rate of 0.653, 38 correct (0.776) are
    needed, not 33. ``needed_correct`` is that smallest count (None when even all-correct
    would not be significant: too few validation images to tell).

    Keys: ``majority_rate``, ``majority_class``, ``num_val``, ``val_correct``, ``p_value``,
    ``alpha``, ``needed_correct``, ``beats_majority``, ``predicted_classes`` (how many classes
    the model predicts at all), ``only_answer`` (the class it always answers, when it collapsed
    onto one; else None), ``val_classes`` (classes present in validation), ``num_classes``.
    """
    from scipy.stats import binom

    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(y_pred).astype(np.int64).ravel()
    n = len(y)
    counts = np.bincount(y, minlength=len(classes))
    rate = majority_rate(y, len(classes))
    correct = int((y == p).sum())
    if n == 0:
        return {"majority_rate": rate, "majority_class": None, "num_val": 0, "val_correct": 0,
                "p_value": 1.0, "alpha": alpha, "needed_correct": None, "beats_majority": False,
                "predicted_classes": 0, "only_answer": None, "val_classes": 0, "num_classes": len(classes)}
    # P(X >= k) for X ~ Binomial(n, rate), for every k = 0..n: sf(k - 1).
    tail = binom.sf(np.arange(n + 1) - 1, n, rate)
    ok = np.nonzero(tail < alpha)[0]
    return {"majority_rate": rate, "majority_class": str(classes[int(counts.argmax())]), "num_val": n,
            "val_correct": correct, "p_value": float(tail[correct]), "alpha": alpha,
            "needed_correct": int(ok[0]) if len(ok) else None,
            "beats_majority": bool(tail[correct] < alpha),
            "predicted_classes": int(len(np.unique(p))),
            "only_answer": str(classes[int(p[0])]) if len(np.unique(p)) == 1 else None,
            "val_classes": int((counts > 0).sum()), "num_classes": len(classes)}


def chance_advice(b: dict, train_accuracy: float | None = None) -> str:
    """Why a model is no better than the majority class, and what to try next."""
    n, c, rate, n_classes = b["num_val"], b["val_correct"], b["majority_rate"], b["num_classes"]
    why = (f"Val accuracy {c / n:.4f} ({c}/{n}) does not beat always answering "
           f"'{b['majority_class']}' ({rate:.4f}) beyond luck (one-sided binomial test, "
           f"p = {b['p_value']:.2f} >= {b['alpha']:g}")
    why += (f"; at least {b['needed_correct']}/{n} correct are needed)." if b["needed_correct"] is not None
            else f"; with {n} validation images no accuracy would be significant).")
    tips = []
    if b.get("val_classes", 2) < 2:
        tips.append(f"validation holds only '{b['majority_class']}': give every class validation images")
    elif b["only_answer"] is not None:
        tips.append(f"the model answers '{b['only_answer']}' for every image: its head did not learn")
    if train_accuracy is not None and train_accuracy - c / n > 0.1:
        tips.append(f"train accuracy is {train_accuracy:.4f}: the head memorises the training images "
                    "(raise L2 or dropout, or use fewer features)")
    if b["needed_correct"] is None or n < 30:
        tips.append(f"add validation images or use --set folds=5 ({n} images cannot tell a model from chance)")
    # Imbalanced: the majority class holds 25% more than an even share (0.625 of two classes).
    if b.get("val_classes", 2) >= 2 and rate > 1.25 / n_classes:
        tips.append(f"the classes are imbalanced ({rate:.0%} of validation is '{b['majority_class']}'): "
                    "try --set class_weight=balanced")
    tips += ["features from another depth (recipe small_different, or --set taps=auto) or another "
             "recipe (`tuneflow suggest DATA` names one)",
             "more training images per class"]
    return why + " Try: " + "; ".join(tips) + "."


def verdict(rows: list[dict], baseline: dict | None = None) -> tuple[str, str]:
    """Under/over-fitting from the curves, and the advice that follows from it.

    With ``baseline`` (from :func:`majority_baseline` on the validation predictions), a model
    that does not beat the majority class is "no better than chance", whatever its curves say.
    """
    if baseline is not None and baseline["num_val"] and not baseline["beats_majority"]:
        train_acc = float(rows[-1]["accuracy"]) if rows and rows[-1].get("accuracy") not in ("", None) else None
        return "no better than chance", chance_advice(baseline, train_acc)
    if not rows:
        return "unknown", "No epochs ran."
    last = rows[-1]
    tr, va = float(last["accuracy"]), float(last["val_accuracy"])
    vl = [float(r["val_loss"]) for r in rows if r["val_loss"] not in ("", None)]
    rising = len(vl) >= 4 and vl[-1] > min(vl) * 1.1 and int(np.argmin(vl)) < len(vl) - 2
    if tr < 0.7 and va < 0.7:
        return "under-fitting", ("Train and validation accuracy are both low: give the model more "
                                 "capacity (unfreeze more blocks, head=mlp), train longer or raise the "
                                 "LR, and lower dropout/L2.")
    if tr - va > 0.1 or rising:
        return "over-fitting", ("Train accuracy is well above validation accuracy (or validation loss "
                                "is rising): add data or augmentation (augment=medium|heavy), raise "
                                "dropout or L2, keep early stopping on, or freeze more blocks.")
    return "good fit", "Train and validation agree; to go further, try a bigger backbone or fine-tune more blocks."


# A stage "diverged" when an epoch's training loss rose above both 3x and 1 nat more than the
# lowest loss of the stage's epochs before it (large_different fine-tuning 203 brain MRIs at lr
# 1e-3: 1.05 -> 148.7 in one epoch; a healthy stage's loss falls or wobbles by tens of percent).
DIVERGED_RATIO, DIVERGED_MARGIN = 3.0, 1.0


def stage_health(rows: list[dict], stages: list[dict]) -> list[dict]:
    """Per stage that ran (metrics.csv rows, ``stage`` its index): its best val accuracy, its
    training loss at the first and last epoch and at its worst, and whether it diverged."""
    out = []
    for i, st in enumerate(stages):
        mine = [r for r in rows if str(r.get("stage")) == str(i)]
        if not mine:
            continue
        losses = [float(r["loss"]) for r in mine if r.get("loss") not in ("", None)]
        accs = [float(r["val_accuracy"]) for r in mine if r.get("val_accuracy") not in ("", None)]
        h = {"stage": st["name"], "index": i, "epochs": len(mine),
             "best_val_accuracy": max(accs) if accs else None,
             "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
             "max_loss": max(losses) if losses else None, "diverged": False}
        low = math.inf
        for epoch, v in enumerate(losses, 1):
            if v > DIVERGED_RATIO * low and v > low + DIVERGED_MARGIN:  # never at epoch 1: low is inf
                h["diverged"], h["diverged_at_epoch"], h["lowest_before"] = True, epoch, low
                break
            low = min(low, v)
        out.append(h)
    return out


def divergence_advice(health: list[dict], model_from: dict | None, recipe: str, data: str = "DATA") -> str:
    """What to do about the stages that diverged ("" when none did)."""
    notes = []
    for h in health:
        if not h["diverged"]:
            continue
        kept = model_from is not None and model_from["index"] == h["index"]
        notes.append(
            f"Stage '{h['stage']}' diverged (training loss {h['lowest_before']:.3g}, then "
            f"{h['max_loss']:.3g} by epoch {h['diverged_at_epoch']})" + ("" if kept else (
                f" and its weights were not kept (the model is from stage '{model_from['stage']}')"
                if model_from else " and its weights were not kept")) +
            f"; lower its learning rate (--set {h['stage']}.lr=...), or measure one with "
            f"`tuneflow lr-find {recipe} --data {shlex.quote(str(data))} --stage {h['index']}` "
            "(with the run's other --set options).")
    return " ".join(notes)


def nan_diagnosis(recipe, lr: float, x_range: tuple[float, float]) -> str:
    hints = []
    if lr >= 1e-2:
        hints.append(f"the learning rate {lr:g} is high: try 10x lower")
    if max(recipe.l1, recipe.l2) >= 1.0:
        hints.append(f"the L1/L2 penalty ({max(recipe.l1, recipe.l2):g}) times the learning rate "
                     "overshoots: typical values are 1e-5..1e-3")
    if not recipe.clipnorm:
        hints.append("no gradient clipping: try --set clipnorm=10")
    if x_range[1] > 255.5 or x_range[0] < -0.5:
        hints.append(f"inputs range {x_range[0]:.3g}..{x_range[1]:.3g}, outside 0..255 pixels")
    if recipe.precision in ("mixed_float16",):
        hints.append("float16 can overflow: try --set precision=float32")
    return "; ".join(hints) or "check the data for corrupt images and the labels for bad values"


def plot_curves(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = np.arange(1, len(rows) + 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, ax in (("loss", a), ("accuracy", b)):
        ax.plot(ep, [float(r[key]) for r in rows], label=f"train {key}")
        ax.plot(ep, [float(r[f"val_{key}"]) for r in rows], label=f"val {key}")
        ax.set_xlabel("epoch (all stages)")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    stages = [r["stage"] for r in rows]
    for i in range(1, len(stages)):
        if stages[i] != stages[i - 1]:
            for ax in (a, b):
                ax.axvline(i + 0.5, color="grey", ls="--", lw=0.8)
    a.legend()
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def most_confused(cm, top: int = TOP_CONFUSED) -> np.ndarray:
    """Indices (ascending) of the ``top`` classes with the most off-diagonal counts, as true
    class plus as predicted class: the rows and columns worth looking at."""
    cm = np.asarray(cm)
    n = len(cm)
    if n <= top:
        return np.arange(n)
    off = cm.sum(0) + cm.sum(1) - 2 * np.diag(cm)
    # stable sort: among equal masses the earlier class wins, so the choice is deterministic
    return np.sort(np.argsort(-off, kind="stable")[:top])


def plot_confusion(cm, classes, path, top: int = TOP_CONFUSED):
    """confusion.png: the whole matrix up to ``top`` classes; beyond that, the ``top`` most
    confused classes plus an "(other)" row and column holding everything else, so memory and
    time stay bounded (the full matrix belongs in confusion.csv, see :func:`write_confusion`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cm = np.asarray(cm)
    n = len(classes)
    keep = most_confused(cm, top)
    labels = [_short(classes[i]) for i in keep]
    shown = cm[np.ix_(keep, keep)].astype(np.int64)
    # Colours scaled to the classes shown: the "(other)" sums (hundreds of classes each) would
    # otherwise wash the confusions out; they saturate instead, and their counts are printed.
    hi = max(int(shown.max()), 1) if shown.size else 1
    title = None
    if len(keep) < n:
        rest = np.setdiff1d(np.arange(n), keep)
        other_col = cm[np.ix_(keep, rest)].sum(1)  # shown true class, predicted as a hidden one
        other_row = cm[np.ix_(rest, keep)].sum(0)  # hidden true class, predicted as a shown one
        shown = np.block([[shown, other_col[:, None]],
                          [other_row[None, :], np.full((1, 1), -1)]])  # -1: not drawn
        labels.append("(other)")
        title = f"{len(keep)} most-confused of {n} classes (all: confusion.csv)"
    m = len(labels)
    masked = np.ma.masked_less(shown, 0)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * m, 1.0 + 0.5 * m))
    try:
        ax.imshow(masked, cmap="Blues", vmin=0, vmax=hi)
        ax.set_xticks(range(m), labels, rotation=45, ha="right")
        ax.set_yticks(range(m), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if title:
            ax.set_title(title, fontsize=9)
        for i in range(m):
            for j in range(m):
                if shown[i, j] >= 0:
                    ax.text(j, i, int(shown[i, j]), ha="center", va="center",
                            color="white" if shown[i, j] > hi / 2 else "black", fontsize=8)
        fig.tight_layout()
        _atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    finally:
        plt.close(fig)


def write_confusion(cm, classes, run_dir, top: int = TOP_CONFUSED) -> tuple[Path, Path]:
    """Write ``confusion.csv`` (the full matrix: rows true, columns predicted, with class names)
    and ``confusion.png`` (at most ``top`` classes, see :func:`plot_confusion`) into ``run_dir``.

    >>> write_confusion(cm, bundle.classes, run.path)   # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    cm = np.asarray(cm)
    if cm.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion matrix of shape {cm.shape} for {len(classes)} classes; "
                         "it must be (classes, classes).")
    csv_path, png_path = run_dir / "confusion.csv", run_dir / "confusion.png"

    def rows(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["true \\ predicted", *map(str, classes)])
            for c, row in zip(classes, cm):
                w.writerow([str(c), *(int(v) for v in row)])

    _atomic(csv_path, rows)
    plot_confusion(cm, classes, png_path, top)
    return png_path, csv_path


def _short(name, width: int = 24) -> str:
    name = str(name)
    return name if len(name) <= width else name[:width - 1] + "…"


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename onto ``path``: a reader never sees half a file, and a failed
    write leaves no temporary file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def markdown(report: dict) -> str:
    lines = [f"# tuneflow run: {report['recipe']}", "",
             f"- backbone: **{report['backbone']}** ({report['weights']}), input {report['input_size']} px",
             f"- data: {report['data']} — {report['num_train']} train / {report['num_val']} val images, "
             f"{len(report['classes'])} classes",
             f"- **val accuracy {report['val_accuracy']:.4f}**, val loss {report['val_loss']:.4f}"
             + _baseline_note(report),
             ]
    if report.get("evaluated"):
        lines.append(f"- measured on: {report['evaluated']}; per-image results in val_predictions.csv")
    fast = report.get("fast_path")
    if fast:
        same = "the same predictions" if not fast.get("predictions_differing") else (
            f"{fast['predictions_differing']} predictions differ")
        lines.append(f"- training's fast path ({fast['how']}, {fast['precision']}): val accuracy "
                     f"{fast['val_accuracy']:.4f} ({same})")
    if report.get("folds"):
        lines.append(f"- {report['folds']}-fold cross-validation: val accuracy "
                     f"{report['fold_mean_val_accuracy']:.4f} ± {report['val_accuracy_std']:.4f} "
                     f"(folds: {', '.join(f'{a:.4f}' for a in report['fold_val_accuracy'])}); "
                     + report.get("final_model_note", ""))
    if report.get("adapted"):
        lines.append(f"- recipe adapted to the backbone: {report['adapted']}")
    if report.get("test_accuracy") is not None:
        lines.append(f"- test accuracy {report['test_accuracy']:.4f} (test split used once, at the end)")
    speed = []
    if report["images_per_second"]:
        speed.append(f"{report['images_per_second']:.1f} images/s training the backbone")
    if report.get("feature_images_per_second"):
        speed.append(f"{report['feature_images_per_second']:.1f} images/s filling the feature cache"
                     f" ({report.get('feature_engine')})")
    lines += [f"- wall time {report['wall_seconds']:.1f} s" + (f", {', '.join(speed)}" if speed else ""),
              f"- strategy {report['strategy']} ({report['replicas']} replicas), global batch "
              f"{report['global_batch']}, precision {report['precision']}, norm {report['norm']}",
              f"- verdict: **{report['verdict']}** — {report['advice']}"]
    mf = report.get("model_from")
    if mf:
        lines.append(f"- model: the best validated weights, from stage '{mf['stage']}' "
                     + ("(its end)" if mf["epoch"] == "end" else f"(epoch {mf['epoch']})"))
    lines += ["", "## Stages", "",
              "| stage | train | epochs run | optimizer | lr | schedule | feature cache | best val accuracy | training loss (first -> last, max) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    health = {h["stage"]: h for h in report.get("stage_health") or []}
    for s in report["stages"]:
        h = health.get(s["name"])
        acc = f"{h['best_val_accuracy']:.4f}" if h and h["best_val_accuracy"] is not None else ""
        loss = (f"{h['first_loss']:.3g} -> {h['last_loss']:.3g}, max {h['max_loss']:.3g}"
                + (" **diverged**" if h["diverged"] else "")) if h and h["first_loss"] is not None else ""
        lines.append(f"| {s['name']} | {s['train']} | {s['epochs_run']} | {s['optimizer']} | "
                     f"{s['lr']:g} | {s['schedule']} | {s['cache']} | {acc} | {loss} |")
    lines += ["", "## Per class (validation)", "", "| class | precision | recall | F1 | support |",
              "| --- | --- | --- | --- | --- |"]
    for c, m in report["per_class"].items():
        lines.append(f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    if report.get("taps"):
        lines += ["", "## Depth probe (chosen by cross-validation on the training images)", "",
                  "| tap | cross-validated accuracy (train) | val accuracy |", "| --- | --- | --- |"]
        for t, s in report["taps"].items():
            s = s if isinstance(s, dict) else {"inner": float("nan"), "val": s}
            lines.append(f"| {t}{' (kept)' if t == report.get('tap') else ''} | {s['inner']:.4f} | {s['val']:.4f} |")
    choice = report.get("backbone_choice") or {}
    if choice:
        lines += ["", "## Backbone (backbone=auto)", "", str(choice.get("reason", "")) + "."]
        if choice.get("probes"):
            lines += ["", "| candidate | cross-validated accuracy (train) | seconds | images/s |",
                      "| --- | --- | --- | --- |"]
            lines += [f"| {n}{' (kept)' if n == choice.get('backbone') else ''} | {p['accuracy']:.4f} | "
                      f"{p['seconds']:.1f} | {p['images_per_second']:.1f} |" for n, p in choice["probes"].items()]
    if report.get("skipped_files"):
        lines += ["", f"## Skipped files ({len(report['skipped_files'])})", ""]
        lines += [f"- {s}" for s in report["skipped_files"]]
    if report.get("ignored_files"):
        lines += ["", f"## Ignored files, not images ({len(report['ignored_files'])})", ""]
        lines += [f"- {s}" for s in report["ignored_files"][:100]]
    if report.get("leaks"):
        lines += ["", f"## Train/val leaks ({len(report['leaks'])})", ""]
        lines += [f"- {a} == {b} ({k})" for a, b, k in report["leaks"]]
    if report.get("nan"):
        lines += ["", "## Training stopped on NaN", "", report["nan"]]
    lines += ["", "![curves](curves.png)", "", "![confusion](confusion.png)", ""]
    return "\n".join(lines)


def _baseline_note(report: dict) -> str:
    """", majority-class rate 0.6531 ('yes', 32/49); ..." for the val accuracy line."""
    rate = report.get("majority_rate")
    if rate is None:
        return ""
    b = report.get("baseline") or {}
    if not b.get("num_val"):
        return f"; majority-class rate {rate:.4f}"
    note = (f"; majority-class rate {rate:.4f} ('{b['majority_class']}', "
            f"{round(rate * b['num_val'])}/{b['num_val']})")
    if b.get("beats_majority"):
        return note + f", beaten (binomial p = {b['p_value']:.2g})"
    need = (f"{b['needed_correct']}/{b['num_val']} correct needed" if b.get("needed_correct") is not None
            else "too few images to beat it")
    return note + f", **not beaten** (binomial p = {b['p_value']:.2f}; {need})"
