"""What a person reads after a run: plots, per-class metrics, a verdict and advice."""
from __future__ import annotations

import numpy as np


def per_class(y_true, y_pred, classes) -> tuple[dict, np.ndarray]:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    table = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                 "support": int(s[i])} for i, c in enumerate(classes)}
    return table, confusion_matrix(y_true, y_pred, labels=labels)


def verdict(rows: list[dict]) -> tuple[str, str]:
    """Under/over-fitting from the curves, and the advice that follows from it."""
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


def plot_confusion(cm, classes, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * n, 1.0 + 0.5 * n))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(report: dict) -> str:
    lines = [f"# tuneflow run: {report['recipe']}", "",
             f"- backbone: **{report['backbone']}** ({report['weights']}), input {report['input_size']} px",
             f"- data: {report['data']} — {report['num_train']} train / {report['num_val']} val images, "
             f"{len(report['classes'])} classes",
             f"- **val accuracy {report['val_accuracy']:.4f}**, val loss {report['val_loss']:.4f}",
             ]
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
              f"- verdict: **{report['verdict']}** — {report['advice']}", "", "## Stages", "",
              "| stage | train | epochs run | optimizer | lr | schedule | feature cache |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in report["stages"]:
        lines.append(f"| {s['name']} | {s['train']} | {s['epochs_run']} | {s['optimizer']} | "
                     f"{s['lr']:g} | {s['schedule']} | {s['cache']} |")
    lines += ["", "## Per class (validation)", "", "| class | precision | recall | F1 | support |",
              "| --- | --- | --- | --- | --- |"]
    for c, m in report["per_class"].items():
        lines.append(f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    if report.get("taps"):
        lines += ["", "## Depth probe", "", "| tap | val accuracy |", "| --- | --- |"]
        lines += [f"| {t} | {a:.4f} |" for t, a in report["taps"].items()]
    if report.get("skipped_files"):
        lines += ["", f"## Skipped files ({len(report['skipped_files'])})", ""]
        lines += [f"- {s}" for s in report["skipped_files"]]
    if report.get("leaks"):
        lines += ["", f"## Train/val leaks ({len(report['leaks'])})", ""]
        lines += [f"- {a} == {b} ({k})" for a, b, k in report["leaks"]]
    if report.get("nan"):
        lines += ["", "## Training stopped on NaN", "", report["nan"]]
    lines += ["", "![curves](curves.png)", "", "![confusion](confusion.png)", ""]
    return "\n".join(lines)
