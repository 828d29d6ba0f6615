"""The search space: the default one derived from a recipe, one read from a file, and one
narrowed around a round's best trials (``tuneflow search --space``, ``--narrow``)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import RecipeError, RunError
from ..extras import optional
from ..recipe import Recipe

PRESETS = ("default", "lr", "regularization")
GRID_POINTS = 3  # values per numeric range for --sampler grid: low, middle (on its scale), high
TOP_FRACTION = 0.25  # --narrow keeps the range of the best quarter of a round's trials ...
WIDEN = 0.10  # ... widened by 10% of the old range's width on each side


def default_space(recipe: Recipe, preset: str = "default") -> dict:
    """The search space for ``recipe``: each stage's learning rate over two decades around its
    default (log), L2 on a log scale, dropout and label smoothing linear, batch size categorical.
    Stages whose linear head is fitted by L-BFGS (``head_solver``) have no learning rate, and a
    recipe made only of such stages has nothing here to search: that is an error saying so.

    >>> from tuneflow.recipes import small_similar
    >>> default_space(small_similar.override("head_solver=sgd"))["head.lr"]  # doctest: +SKIP
    {'type': 'float', 'low': 0.0001, 'high': 0.01, 'log': True}
    """
    if preset not in PRESETS:
        raise RecipeError(f"Unknown search space preset {preset!r}; choose one of {', '.join(PRESETS)}, "
                          "or give a JSON file.")
    trained = [s for s in recipe.stages if not _solved_in_closed_form(recipe, s)]
    if not trained:
        raise RecipeError(
            f"{recipe.name} fits its linear head by L-BFGS (head_solver={recipe.head_solver}): it has no "
            "learning rate, dropout, L2 or batch size to search, and chooses its L2 strength itself. Search "
            "with --set head_solver=sgd (the stage's optimizer and epochs), or give --space over fields that "
            "apply (input_size, resize, head, ...).")
    space: dict = {}
    if preset in ("default", "lr"):
        for s in trained:
            space[f"{s.name}.lr"] = {"type": "float", "low": sig(s.lr / 10), "high": sig(min(s.lr * 10, 1.0)),
                                     "log": True}
    if preset in ("default", "regularization"):
        space["l2"] = {"type": "float", "low": 1e-6, "high": 1e-2, "log": True}
        space["dropout"] = {"type": "float", "low": 0.0, "high": 0.5}
        space["label_smoothing"] = {"type": "float", "low": 0.0, "high": 0.2}
        for s in trained:
            if s.weight_decay > 0:
                space[f"{s.name}.weight_decay"] = {"type": "float", "low": sig(s.weight_decay / 10),
                                                   "high": sig(s.weight_decay * 10), "log": True}
    if preset == "default":
        space["batch_size"] = {"type": "categorical", "choices": sorted({16, 32, 64, recipe.batch_size})}
    return {k: normalize_entry(k, v, "default search space") for k, v in space.items()}


def _solved_in_closed_form(recipe: Recipe, stage) -> bool:
    """True where the recipe fits the stage's linear head on cached features by L-BFGS, so its
    optimizer fields do not apply (``Recipe.head_solver``: "auto" means exactly these stages)."""
    solver = getattr(recipe, "head_solver", "sgd")  # recipes from before head_solver train by epochs
    applies = recipe.head == "linear" and recipe.feature_cache and stage.train == "frozen"
    return applies and solver in ("lbfgs", "auto")  # a trained backbone stage always runs epochs


def load_space(spec, recipe: Recipe) -> dict:
    """A space from a preset name, a JSON file, or a dict, checked against ``recipe``.

    The JSON maps recipe keys (as for ``--set``) to ranges or choices::

        {"head.lr": {"low": 1e-4, "high": 1e-1, "log": true},
         "dropout": {"low": 0.0, "high": 0.5},
         "head.epochs": {"low": 10, "high": 60},
         "batch_size": [16, 32, 64]}

    A list means categorical; integer ends (no ``log``) an integer range, otherwise floats.
    """
    where = "search space"
    if spec is None:
        spec = "default"
    if isinstance(spec, (str, Path)):
        text = str(spec)
        if text in PRESETS:
            spec = default_space(recipe, text)
        else:
            where = f"search space file {text}"
            try:
                spec = json.loads(Path(text).read_text())
            except FileNotFoundError:
                raise RecipeError(f"--space {text!r} is neither a preset ({', '.join(PRESETS)}) nor an "
                                  "existing JSON file.") from None
            except (OSError, ValueError) as exc:
                raise RecipeError(f"Cannot read the {where}: {exc}.") from None
    if not isinstance(spec, dict) or not spec:
        raise RecipeError(f"The {where} must be a non-empty JSON object of key -> range; got {spec!r}.")
    space = {}
    for key, entry in spec.items():
        space[key] = normalize_entry(key, entry, where)
        for value in _probe_values(space[key]):
            try:
                recipe.override(f"{key}={fmt(value)}")
            except RecipeError as exc:
                raise RecipeError(f"{where}: {key} = {value!r} does not fit recipe {recipe.name}: {exc}") from None
    return space


def narrow_space(space: dict, trials: list[tuple[dict, float]], top: float = TOP_FRACTION,
                 widen: float = WIDEN) -> dict:
    """Each numeric range narrowed to the min..max of the best ``top`` share of ``trials``
    (``(params, val_accuracy)`` of completed trials; at least 2 kept), on the log scale for log
    ranges, widened by ``widen`` x the old width each side and kept inside the old range.
    Categorical choices shrink to those the best trials used.

    >>> narrow_space({"x": {"type": "float", "low": 1e-4, "high": 1.0, "log": True}},
    ...              [({"x": 1e-3}, 0.9), ({"x": 1e-2}, 0.8), ({"x": 0.5}, 0.1), ({"x": 0.9}, 0.1)])["x"]
    {'type': 'float', 'low': 0.00039810717055349735, 'high': 0.025118864315095794, 'log': True}
    """
    if not trials:
        raise RunError("Cannot narrow the search space: no trial of the previous round completed. "
                       "Run more trials, or search without --narrow.")
    ranked = sorted(trials, key=lambda t: -t[1])
    best = ranked[:min(len(ranked), max(2, math.ceil(top * len(ranked))))]
    out = {}
    for key, s in space.items():
        values = [p[key] for p, _ in best if key in p]
        if not values:
            out[key] = dict(s)
        elif s["type"] == "categorical":
            out[key] = {"type": "categorical", "choices": [c for c in s["choices"] if c in values]}
        else:
            to, back = (math.log10, lambda v: 10 ** v) if s.get("log") else (float, float)
            lo0, hi0 = to(s["low"]), to(s["high"])
            pad = widen * (hi0 - lo0)
            lo = max(lo0, min(to(v) for v in values) - pad)
            hi = min(hi0, max(to(v) for v in values) + pad)
            new = dict(s, low=back(lo), high=back(hi))
            if s["type"] == "int":
                new["low"] = max(s["low"], math.floor(new["low"]))
                new["high"] = min(s["high"], math.ceil(new["high"]))
                if new["low"] == new["high"]:
                    new["low"], new["high"] = max(s["low"], new["low"] - 1), min(s["high"], new["high"] + 1)
            else:  # exact ends: a range is never pushed outside the old one by rounding
                new["low"], new["high"] = max(s["low"], new["low"]), min(s["high"], new["high"])
            out[key] = new
    return out


def normalize_entry(key: str, entry, where: str) -> dict:
    if isinstance(entry, list):
        entry = {"choices": entry}
    if not isinstance(entry, dict):
        raise RecipeError(f"{where}: {key}: expected {{\"low\": .., \"high\": ..}} or a list of choices; got {entry!r}.")
    allowed = {"type", "low", "high", "log", "step", "choices"}
    if set(entry) - allowed:
        raise RecipeError(f"{where}: {key}: unknown fields {sorted(set(entry) - allowed)}; use {sorted(allowed)}.")
    if "choices" in entry:
        choices = entry["choices"]
        if not isinstance(choices, list) or not choices:
            raise RecipeError(f"{where}: {key}: choices must be a non-empty list; got {choices!r}.")
        return {"type": "categorical", "choices": list(choices)}
    if "low" not in entry or "high" not in entry:
        raise RecipeError(f"{where}: {key}: a range needs low and high (or give choices); got {entry!r}.")
    lo, hi, logscale = entry["low"], entry["high"], bool(entry.get("log", False))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or not lo < hi:
        raise RecipeError(f"{where}: {key}: low < high, both numbers; got low={lo!r}, high={hi!r}.")
    if logscale and lo <= 0:
        raise RecipeError(f"{where}: {key}: a log range needs low > 0; got {lo!r}.")
    kind = entry.get("type") or ("int" if isinstance(lo, int) and isinstance(hi, int) and not logscale else "float")
    if kind not in ("int", "float"):
        raise RecipeError(f"{where}: {key}: type {kind!r}; use int, float, or give choices.")
    out = {"type": kind, "low": int(lo) if kind == "int" else float(lo), "high": int(hi) if kind == "int" else float(hi),
           "log": logscale}
    if "step" in entry:
        out["step"] = entry["step"]
    return out


def _probe_values(s: dict) -> list:
    return list(s["choices"]) if s["type"] == "categorical" else [s["low"], s["high"]]


def distribution(s: dict):
    d = optional("optuna.distributions", "tuneflow search")
    if s["type"] == "categorical":
        return d.CategoricalDistribution(s["choices"])
    if s["type"] == "int":
        return d.IntDistribution(s["low"], s["high"], log=s.get("log", False), step=s.get("step", 1))
    return d.FloatDistribution(s["low"], s["high"], log=s.get("log", False), step=s.get("step"))


def grid_points(space: dict) -> dict:
    grid = {}
    for k, s in space.items():
        if s["type"] == "categorical":
            grid[k] = list(s["choices"])
            continue
        lo, hi = s["low"], s["high"]
        if s.get("log"):
            pts = [lo * (hi / lo) ** (i / (GRID_POINTS - 1)) for i in range(GRID_POINTS)]
        else:
            pts = [lo + (hi - lo) * i / (GRID_POINTS - 1) for i in range(GRID_POINTS)]
        pts[0], pts[-1] = lo, hi  # exact ends, inside the distribution
        grid[k] = sorted({round(p) for p in pts}) if s["type"] == "int" else pts
    return grid


def fmt(v) -> str:
    if isinstance(v, float):
        return repr(v)  # round-trips exactly
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def short_value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def sig(x: float) -> float:
    return float(f"{x:.3g}")

def finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
