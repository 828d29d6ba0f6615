"""A run's time budget (``--budget 90s|10m|2h``) and quality presets (``--quality fast|balanced|best``).

The budget is a deadline the whole run keeps: the backbone probe gets a share of it, the run is
refused before its folder exists when what is left cannot pay for the feature pass, the export and
the evaluation at the speed this machine just showed, a training stage stops (its best weights
kept) when only the export's reserve is left, and a stage that cannot start in time is skipped.
Whatever stops, the run ends complete: exported, evaluated, loadable. The report's ``budget``
says what was planned, what each part took and what was cut.

Presets are recipe overrides (applied before the user's own, which win):

- ``fast``: no backbone probe (the cheapest candidate of a ``backbone=auto`` recipe) at the
  backbone's native input size;
- ``balanced``: the recipe as written;
- ``best``: the backbone probe given three times its time bound.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import keras

from ..errors import RecipeError
from ..recipe import Recipe

QUALITIES = ("fast", "balanced", "best")
MIN_SECONDS = 15.0  # below this no plan fits: TensorFlow's start, one model and an export take longer
PROBE_SHARE = 0.2  # the backbone probe's share of a budget
# Export and reload of the float32 artifact, measured at 10-19 s on 2 cores (Lite0/Lite1, 288 px):
# the reserve errs high.
EXPORT_SECONDS = 20.0
EVAL_IMAGES_PER_SECOND = 30.0  # the artifact's evaluation when nothing faster was measured (33 img/s seen)
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def parse_budget(text) -> float:
    """Seconds from ``90``, ``90s``, ``10m``, ``2h``, ``1h30m`` or ``2.5m``; a RecipeError otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        parts = re.findall(r"(\d+(?:\.\d+)?)(h|min|m|sec|s)?", s)
        if not s or "".join(a + b for a, b in parts) != s or (len(parts) > 1 and not all(u for _, u in parts)):
            raise RecipeError(f"--budget {text!r} is not a duration; write seconds or a number with a unit: "
                              "90s, 10m, 2h, 1h30m.")
        seconds = sum(float(n) * _UNITS[u or "s"] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise RecipeError(f"--budget {text!r} must be a positive duration (90s, 10m, 2h).")
    if seconds < MIN_SECONDS:
        raise RecipeError(f"--budget {text!r} ({seconds:g} s) is too small for any plan: starting TensorFlow, one "
                          f"feature pass and the export alone take longer; give at least {MIN_SECONDS:g}s.")
    return seconds


def quality_overrides(recipe: Recipe, quality: str | None) -> dict:
    """The preset's overrides for ``recipe`` ({} for balanced or None)."""
    if quality in (None, "balanced"):
        return {}
    if quality not in QUALITIES:
        raise RecipeError(f"--quality {quality!r} is not valid; choose one of {', '.join(QUALITIES)}.")
    if quality == "fast":
        out = {"input_size": 0}
        if recipe.backbone == "auto":
            out["backbone"] = recipe.backbone_candidates[0]
        return out
    return {"backbone_probe_seconds": 3 * recipe.backbone_probe_seconds}


@dataclass
class Deadline:
    """A run's budget: when it started, how long it may take, and what must be kept for the export."""

    seconds: float
    start: float = field(default_factory=time.time)
    reserve: float = EXPORT_SECONDS  # set from the data and the measured speed (see plan_reserve)
    notes: list = field(default_factory=list)  # what was cut, for the report
    parts: dict = field(default_factory=dict)  # part -> seconds it took
    plan: dict = field(default_factory=dict)  # the estimate the run was planned on

    def left(self) -> float:
        return self.seconds - (time.time() - self.start)

    def spent(self) -> float:
        return time.time() - self.start

    def probe_seconds(self, recipe_seconds: float) -> float:
        """The backbone probe's time bound under this budget."""
        return max(1.0, min(recipe_seconds, PROBE_SHARE * self.seconds))

    def plan_reserve(self, n_val: int, images_per_second: float | None) -> float:
        """Keep the export and the artifact's evaluation of ``n_val`` images for the end."""
        rate = images_per_second or EVAL_IMAGES_PER_SECOND
        self.reserve = EXPORT_SECONDS + n_val / max(rate, 1e-6)
        return self.reserve

    def check_feasible(self, images_to_compute: int, images_per_second: float | None, n_val: int) -> dict:
        """The plan's estimate; a RecipeError (before any run folder exists) when it cannot fit at
        the speed the backbone probe measured (without a measurement nothing is refused: the
        stages then stop at the deadline)."""
        rate = images_per_second or EVAL_IMAGES_PER_SECOND
        reserve = self.plan_reserve(n_val, images_per_second)
        features = images_to_compute / max(rate, 1e-6)
        need = self.spent() + features + reserve
        plan = {"budget_seconds": round(self.seconds, 1), "spent_before_training": round(self.spent(), 1),
                "feature_pass_estimate": round(features, 1), "export_and_evaluation_reserve": round(reserve, 1),
                "images_per_second": round(rate, 1), "measured": images_per_second is not None}
        if need > self.seconds and images_per_second is not None:  # refused on a measured speed only
            raise RecipeError(
                f"--budget {self.seconds:g}s is too small for this data on this machine: {self.spent():.0f} s went "
                f"to loading the data and choosing the backbone, the feature pass over {images_to_compute} images "
                f"needs about {features:.0f} s at the {rate:.0f} images/s just measured, and the export and evaluation about {reserve:.0f} s: about {math.ceil(need)} s in all. "
                  f"Give --budget {math.ceil(need * 1.2)}s or more, or --quality fast.")
        return plan

    def stage_can_start(self) -> bool:
        return self.left() > self.reserve

    def report(self) -> dict:
        return {"seconds": round(self.seconds, 1), "used_seconds": round(self.spent(), 1), "plan": self.plan,
                "reserve_seconds": round(self.reserve, 1), "parts": {k: round(v, 2) for k, v in self.parts.items()},
                "cut": list(self.notes)}


class DeadlineStop(keras.callbacks.Callback):
    """Stops a stage's ``fit`` after the current batch once only the deadline's reserve is left;
    the epoch hook then keeps the best validated weights as usual."""

    def __init__(self, deadline: Deadline, stage: str):
        super().__init__()
        self.deadline, self.stage, self.stopped_at, self._epoch = deadline, stage, None, 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        d = self.deadline
        if self.stopped_at is None and d.left() <= d.reserve:
            self.stopped_at = f"epoch {self._epoch + 1}, batch {batch + 1}"
            self.model.stop_training = True
            d.notes.append(f"stage {self.stage!r} stopped by the budget at {self.stopped_at}, "
                           f"{d.spent():.0f} s into {d.seconds:g} s")
