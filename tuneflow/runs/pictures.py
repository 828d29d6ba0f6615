"""Pictures of a run a person would rather look at than read: image grids, the top losses."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from ..data import decode_image
from ..errors import RunError


def image_grid(images, captions, path: Path, title: str = "", cols: int = 4) -> Path:
    """A PNG grid of RGB uint8 images (None: a blank tile) with a caption above each."""
    fig = grid_figure(images, captions, title, cols)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return path


def grid_figure(images, captions, title: str = "", cols: int = 4):
    """The figure of :func:`image_grid`. Constrained layout places the title above the first
    row's captions (``tight_layout`` ignores a suptitle, which then touched them)."""
    from matplotlib.figure import Figure
    n = len(images)
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(2.6 * cols, 2.9 * rows + 0.4), dpi=90, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, im, cap in zip(axes, images, captions):
        if im is not None:
            ax.imshow(np.clip(np.asarray(im, np.float32), 0, 255).astype(np.uint8))
        ax.set_title(cap, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def top_losses(predictions_csv, n: int = 16) -> list[dict]:
    """The ``n`` rows of a ``val_predictions.csv`` with the highest loss, highest first, each with
    ``p_true`` (the probability given to the true class) and ``loss`` (-ln p_true)."""
    f = Path(predictions_csv)
    try:
        with f.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise RunError(f"Cannot read {f} ({exc}); top losses need a finished run's val_predictions.csv.") from None
    if not rows:
        raise RunError(f"{f} lists no validation images; nothing to show.")
    for row in rows:
        try:
            row["p_true"] = float(row[f"p_{row['true_class']}"])
        except (KeyError, ValueError):
            raise RunError(f"{f}: no probability column p_{row.get('true_class')} for the row of "
                           f"{row.get('path')!r}; the file is not tuneflow's val_predictions.csv.") from None
        row["loss"] = -math.log(max(row["p_true"], 1e-12))
    rows.sort(key=lambda r: -r["loss"])
    return rows[:n]


def top_losses_grid(run_dir, n: int = 16, size: int = 160) -> Path:
    """``top_losses.png`` in ``run_dir``: the ``n`` validation images with the highest loss
    (-ln p(true class)) from ``val_predictions.csv``, captioned true / predicted and probabilities.

    >>> top_losses_grid("runs/small_similar-20261122-233128")   # doctest: +SKIP
    PosixPath('runs/small_similar-20261122-233128/top_losses.png')
    """
    run_dir = Path(run_dir)
    images, captions = [], []
    rows = top_losses(run_dir / "val_predictions.csv", n)
    for row in rows:
        try:
            images.append(decode_image(row["path"], size))
        except Exception:  # noqa: BLE001 - a moved or array-backed image: a blank tile, its name still shown
            images.append(None)
        loss = row["loss"]
        name = Path(row["path"]).name
        name = name if len(name) <= 26 else name[:12] + "…" + name[-13:]  # keep the extension in view
        captions.append(f"{name}\ntrue {row['true_class']} ({row['p_true']:.2f}) "
                        f"pred {row['predicted_class']} ({float(row['probability']):.2f})\nloss {loss:.2f}")
    return image_grid(images, captions, run_dir / "top_losses.png",
                      f"Top losses: the {len(images)} validation images the model is most wrong about")
