"""The search space: the default one derived from a recipe, one read from a file, and one
narrowed around a round's best trials (``tuneflow search --space``, ``--narrow``)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..backbones import BACKBONES, FreezeSpec, get_spec
from ..errors import RecipeError, RunError
from ..extras import optional
from ..imageops import RESIZE_MODES
from ..recipe import RANGES, Recipe

PRESETS = ("default", "lr", "regularization")
# The backbones whose ImageNet weights ship with tuneflow's dependencies (the EfficientNet-Lites):
# the ones a search may switch to without a download.
OFFLINE_BACKBONES = tuple(n for n, s in BACKBONES.items() if not s.weights_file)
CACHE_VIEWS = (1, 2, 4)  # augmented views per image in the feature cache
# The L-BFGS head's C ranges (head_c_range): stronger L2, the default 1e-3..10, weaker L2.
C_RANGES = ("0.0001,0.1", "0.001,10.0", "0.1,1000.0")
DEFAULT_C_RANGE = "0.001,10.0"  # what head_c_range=() means (training.probe.DEFAULT_GRID's ends)
GRID_POINTS = 3  # values per numeric range for --sampler grid: low, middle (on its scale), high
TOP_FRACTION = 0.25  # --narrow keeps the range of the best quarter of a round's trials ...
WIDEN = 0.10  # ... widened by 10% of the old range's width on each side


def default_space(recipe: Recipe, preset: str = "default", fixed=()) -> dict:
    """The search space for ``recipe``, derived from what each of its stages trains.

    - A stage whose linear head is fitted by L-BFGS (``head_solver``; no learning rate, epochs or
      batches): the choices that change its result: the backbone (those whose ImageNet weights
      work offline, when the recipe uses ImageNet weights), the input size (32 px either side of
      the recipe's, and the backbone's default), the resize mode, the cached augmented views, the
      head kind (``mlp`` trains the head by the stage's optimizer instead) and the range of C
      (inverse L2 strength) its cross-validation chooses from (``head_c_range``).
    - A stage trained by its optimizer (an SGD head, a fine-tuning stage): its learning rate over
      two decades around the recipe's (log), its schedule, its epochs (half to twice the
      recipe's) and, for ``top:N`` stages, the unfrozen depth (N/2, N, 2N blocks); then the new
      layers' L2 (log), dropout and label smoothing (linear), weight decay where the stage has
      one, and the batch size.

    Presets: ``default`` (all of it), ``lr`` (the learning rates), ``regularization`` (C's
    range, augmented views, L2, dropout, label smoothing, weight decay). Keys in ``fixed`` (what
    ``--set`` pins) are left out. A space left empty is a RecipeError naming the recipe.

    >>> from tuneflow.recipes import small_similar
    >>> default_space(small_similar)["resize"]
    {'type': 'categorical', 'choices': ['crop', 'squash']}
    >>> default_space(small_similar.override("head_solver=sgd"))["head.lr"]
    {'type': 'float', 'low': 0.0001, 'high': 0.01, 'log': True}
    """
    if preset not in PRESETS:
        raise RecipeError(f"Unknown search space preset {preset!r}; choose one of {', '.join(PRESETS)}, "
                          "or give a JSON file.")
    solved = [s for s in recipe.stages if _solved_in_closed_form(recipe, s)]
    trained = [s for s in recipe.stages if s not in solved]
    space: dict = {}
    if solved and preset == "default":
        spec = get_spec(recipe.size_backbone)
        if recipe.weights == "imagenet":  # a weights file or run folder fits one backbone only
            space["backbone"] = {"choices": [recipe.backbone] + [n for n in OFFLINE_BACKBONES if n != recipe.backbone]}
        size = recipe.pixels
        sizes = {recipe.input_size, size - 32, size + 32} | ({spec.default_size} if recipe.input_size else set())
        space["input_size"] = {"choices": sorted(v for v in sizes if v == 0 or (RANGES["input_size"].holds(v)
                                                                                  and v >= spec.min_size))}
        space["resize"] = {"choices": [recipe.resize] + [m for m in RESIZE_MODES if m != recipe.resize]}
        space["cache_views"] = {"choices": sorted({recipe.cache_views, *CACHE_VIEWS})}
        space["head"] = {"choices": ["linear", "mlp"]}  # conv: its cache holds whole feature maps
    if solved and preset in ("default", "regularization"):
        own = fmt(recipe.head_c_range) if recipe.head_c_range else None
        space["head_c_range"] = {"choices": list(dict.fromkeys([own, *C_RANGES] if own else C_RANGES))}
        if preset == "regularization":
            space["cache_views"] = {"choices": sorted({recipe.cache_views, *CACHE_VIEWS})}
    for s in trained:
        if preset in ("default", "lr"):
            space[f"{s.name}.lr"] = {"low": sig(s.lr / 10), "high": sig(min(s.lr * 10, 1.0)), "log": True}
        if preset == "default":
            space[f"{s.name}.schedule"] = {"choices": list(dict.fromkeys([s.schedule, "one_cycle", "cosine"]))}
            low = max(1, math.ceil(s.epochs / 2), math.ceil(s.warmup_epochs))
            space[f"{s.name}.epochs"] = {"low": low, "high": max(low + 1, 2 * s.epochs)}
            depths = _depths(recipe, s)
            if depths:
                space[f"{s.name}.train"] = {"choices": depths}
    if trained and preset in ("default", "regularization"):
        space["l2"] = {"low": 1e-6, "high": 1e-2, "log": True}
        space["dropout"] = {"low": 0.0, "high": 0.5}
        space["label_smoothing"] = {"low": 0.0, "high": 0.2}
        for s in trained:
            if s.weight_decay > 0:
                space[f"{s.name}.weight_decay"] = {"low": sig(s.weight_decay / 10), "high": sig(s.weight_decay * 10),
                                                   "log": True}
    if trained and preset == "default":
        space["batch_size"] = {"choices": sorted({16, 32, 64, recipe.batch_size})}
    pinned = {_canonical(recipe, k) for k in fixed}
    dropped = sorted(k for k in space if k in pinned)
    space = {k: v for k, v in space.items() if k not in pinned}
    if not space:
        if dropped:
            what = (f"--set fixes every key it would search ({', '.join(dropped)}); --set fewer of them, "
                    "or give --space a JSON file of the fields to search")
        elif solved and not trained:
            what = (f"its head is fitted by L-BFGS (head_solver={recipe.head_solver}), which has no learning "
                    "rate; use --space default (backbone, input size, views, head, C range), --set "
                    "head_solver=sgd, or a JSON file of the fields to search")
        else:
            what = "use --space default, or give --space a JSON file of the fields to search"
        raise RecipeError(f"Nothing to search in recipe {recipe.name} with --space {preset}: {what}.")
    return {k: normalize_entry(k, v, "default search space") for k, v in space.items()}


def _solved_in_closed_form(recipe: Recipe, stage) -> bool:
    """True where the recipe fits the stage's linear head on cached features by L-BFGS, so its
    optimizer fields do not apply (``Recipe.head_solver``: "auto" means exactly these stages)."""
    applies = recipe.head == "linear" and recipe.feature_cache and stage.train == "frozen"
    return applies and recipe.head_solver in ("lbfgs", "auto")  # a trained backbone stage always runs epochs


def _depths(recipe: Recipe, stage) -> list[str]:
    """Unfrozen depths around a ``top:N`` stage's: N/2, N and 2N blocks (at most all of them)."""
    try:
        fs = FreezeSpec.parse(stage.train)
    except ValueError:
        return []
    if fs.kind != "top" or fs.n < 1:
        return []
    blocks = len(get_spec(recipe.size_backbone).block_names)
    return [f"top:{n}" for n in sorted({max(1, fs.n // 2), fs.n, min(blocks, 2 * fs.n)})]


def _canonical(recipe: Recipe, key: str) -> str:
    """An override's key as the space names it: ``stages.0.lr`` -> ``head.lr``."""
    key = key.replace("__", ".")
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "stages" and parts[1].isdigit() and int(parts[1]) < len(recipe.stages):
        return f"{recipe.stages[int(parts[1])].name}.{parts[2]}"
    return key


def own_point(recipe: Recipe, space: dict) -> dict:
    """The recipe's own value of each key of ``space`` that lies in it (a search's first trial:
    the defaults, where the space allows them); ``head_c_range=()`` is its default range.

    >>> from tuneflow.recipes import small_similar
    >>> own_point(small_similar, default_space(small_similar))["head_c_range"]
    '0.001,10.0'
    """
    point = {}
    for key, s in space.items():
        if "." in key:
            stage, name = key.split(".", 1)
            found = [st for st in recipe.stages if st.name == stage]
            if not found or not hasattr(found[0], name):
                continue
            value = getattr(found[0], name)
        elif key == "head_c_range" and not recipe.head_c_range:
            value = DEFAULT_C_RANGE
        else:
            value = getattr(recipe, key, None)
        if isinstance(value, tuple):
            value = fmt(value)
        if s["type"] == "categorical":
            if value in s["choices"]:
                point[key] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and s["low"] <= value <= s["high"]:
            point[key] = int(value) if s["type"] == "int" else float(value)
    return point


def load_space(spec, recipe: Recipe, fixed=()) -> dict:
    """A space from a preset name, a JSON file, or a dict, checked against ``recipe``; a preset
    leaves out the keys in ``fixed`` (those ``--set`` pins).

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
            spec = default_space(recipe, text, fixed)
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
