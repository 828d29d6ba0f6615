"""Compare run folders: one table (recipe, differing fields, metrics) and one figure of their val curves."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import RunError
from ..runs import names
from ..runs.folder import validation_curve

COLUMNS = ("run", "recipe", "backbone", "differs", "val_accuracy", "val_loss", "epochs", "wall_seconds", "status")
IGNORED = ("name", "description")  # shown in their own column, or free text


def compare(run_dirs, out="compare.png") -> list[dict]:
    """One row per run (recipe, backbone, the recipe fields that differ between the runs, val
    accuracy and loss, epochs run, wall time, status) and a figure overlaying their val_accuracy
    and val_loss curves, written to ``out`` (None: no figure).

    A run without ``report.json`` (pruned, killed or still running) is compared on its
    ``metrics.csv``: its val accuracy is the best epoch's, and its status says so.

    >>> rows = compare(["runs/a", "runs/b"], out="compare.png")   # doctest: +SKIP
    >>> print(format_table(rows))                                 # doctest: +SKIP
    """
    runs = [_load(Path(d)) for d in run_dirs]
    if not runs:
        raise RunError("compare needs at least one run folder.")
    flat = [_flatten(r["recipe"]) for r in runs]
    keys = sorted(set().union(*flat))
    differ = [k for k in keys if k not in IGNORED and len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    labels = _labels([r["path"] for r in runs])
    rows = []
    for label, r, f in zip(labels, runs, flat):
        report, metrics = r["report"], r["metrics"]
        best = max(metrics, key=lambda m: (m["val_accuracy"], -m["val_loss"]), default=None)
        acc = report.get("val_accuracy") if report else (best["val_accuracy"] if best else None)
        loss = report.get("val_loss") if report else (best["val_loss"] if best else None)
        rows.append({
            "run": label, "path": str(r["path"]),
            "recipe": (report or {}).get("recipe") or r["recipe"].get("name", "?"),
            "backbone": (report or {}).get("backbone") or r["recipe"].get("backbone", "?"),
            "differs": {k: f.get(k) for k in differ},
            "val_accuracy": acc, "val_loss": loss, "epochs": len(metrics),
            "wall_seconds": (report or {}).get("wall_seconds"),
            "status": r["status"] if report else f"{r['status']} (no report: best epoch shown)",
        })
    if out is not None:
        _plot(rows, runs, Path(out))
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table (differing fields as ``key=value``)."""
    def cell(row, c):
        v = row[c]
        if c == "differs":
            return ", ".join(f"{k}={_short(x)}" for k, x in v.items()) or "-"
        if isinstance(v, float):
            return f"{v:.1f}" if c == "wall_seconds" else f"{v:.4f}"
        return "-" if v is None else str(v)
    table = [list(COLUMNS)] + [[cell(r, c) for c in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in table)


def _load(path: Path) -> dict:
    if not path.is_dir():
        raise RunError(f"{path}: no such run folder.")
    recipe = _read_json(path / names.RECIPE)
    metrics = _metrics(path / names.METRICS)
    if recipe is None and not metrics:
        raise RunError(f"{path} is not a tuneflow run folder (no recipe.json or metrics.csv); "
                       "give folders that `tuneflow finetune` wrote.")
    run = _read_json(path / names.RUN) or {}
    return {"path": path, "recipe": recipe or {}, "report": _read_json(path / names.REPORT),
            "metrics": metrics, "status": run.get("status", "unknown")}


def _metrics(path: Path) -> list[dict]:
    """metrics.csv's validation curve with a running epoch index across stages (``step``)."""
    return [{"step": i, **r} for i, r in enumerate(validation_curve(path), start=1)]


def _flatten(recipe: dict) -> dict:
    """Top-level fields, and stage fields as ``STAGE.field`` (the ``--set`` spelling)."""
    flat = {k: v for k, v in recipe.items() if k != "stages"}
    for s in recipe.get("stages", ()):
        for k, v in s.items():
            if k != "name":
                flat[f"{s['name']}.{k}"] = v
    return flat


def _labels(paths: list[Path]) -> list[str]:
    """Folder names, with as many parent folders as it takes to tell them apart."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def _plot(rows, runs, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for row, r in zip(rows, runs):
        m = r["metrics"]
        if not m:
            continue
        steps = [x["step"] for x in m]
        line, = ax_acc.plot(steps, [x["val_accuracy"] for x in m], label=row["run"])
        ax_loss.plot(steps, [x["val_loss"] for x in m], c=line.get_color())
        for i in range(1, len(m)):  # a stage boundary: the same colour, dotted
            if m[i]["stage"] != m[i - 1]["stage"]:
                for ax in (ax_acc, ax_loss):
                    ax.axvline(m[i]["step"] - 0.5, c=line.get_color(), ls=":", lw=0.8)
    ax_acc.set(title="val accuracy", xlabel="epoch (all stages)", ylabel="val accuracy")
    ax_loss.set(title="val loss", xlabel="epoch (all stages)", ylabel="val loss (NLL)")
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RunError(f"{path} cannot be read ({exc}); the run folder is damaged.") from None


def _short(v) -> str:
    if isinstance(v, float) and math.isfinite(v):
        return f"{v:.3g}"
    if isinstance(v, list):
        return ",".join(map(str, v)) or "()"
    return str(v)
