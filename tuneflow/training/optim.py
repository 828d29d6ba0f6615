"""The optimizer and learning-rate schedule registries: each name a recipe may use
(:data:`tuneflow.recipe.OPTIMIZERS`, :data:`tuneflow.recipe.SCHEDULES`) -> how it is built."""
from __future__ import annotations

import keras

from ..recipe import Stage

OPTIMIZERS = {
    "sgd": lambda lr, s: keras.optimizers.SGD(lr),
    "momentum": lambda lr, s: keras.optimizers.SGD(lr, momentum=s.momentum),
    "nesterov": lambda lr, s: keras.optimizers.SGD(lr, momentum=s.momentum, nesterov=True),
    "adagrad": lambda lr, s: keras.optimizers.Adagrad(lr),
    "rmsprop": lambda lr, s: keras.optimizers.RMSprop(lr),
    "adadelta": lambda lr, s: keras.optimizers.Adadelta(lr),
    "adam": lambda lr, s: keras.optimizers.Adam(lr, beta_1=0.9, beta_2=0.999),
    "adamw": lambda lr, s: keras.optimizers.AdamW(lr, weight_decay=s.weight_decay or 1e-4),
}


def _total(stage: Stage, steps_per_epoch: int) -> int:
    return max(1, stage.epochs * steps_per_epoch)


def _warmup_cosine(stage, lr, steps):
    warm = int(stage.warmup_epochs * steps)
    return keras.optimizers.schedules.CosineDecay(lr / 100.0, decay_steps=max(1, _total(stage, steps) - warm),
                                                  warmup_target=lr, warmup_steps=warm)


def _cos(a, b, frac):
    """From ``a`` to ``b`` along half a cosine as ``frac`` goes 0 -> 1 (clipped)."""
    frac = keras.ops.clip(frac, 0.0, 1.0)
    return b + (a - b) * (1.0 + keras.ops.cos(frac * 3.141592653589793)) / 2.0


@keras.saving.register_keras_serializable(package="tuneflow")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """fastai's one-cycle LR (``fit_one_cycle``, Smith 2018): cosine up from ``peak / div`` to
    ``peak`` over the first ``pct_start`` of the steps, then cosine down to ``peak / div_final``.

    The range test's suggestion (``tuneflow lr-find``, fastai's "valley") is a peak LR for this
    schedule: the LR is high only in the middle of the stage, when the weights are already past
    the first steps and before the last ones settle. (fastai also cycles the momentum, 0.95 ->
    0.85 -> 0.95; Keras optimizers take a fixed ``beta_1``, so the momentum stays at its value.)"""

    def __init__(self, peak: float, total_steps: int, pct_start: float = 0.25, div: float = 25.0,
                 div_final: float = 1e5):
        if not 0.0 <= float(pct_start) <= 1.0:
            raise ValueError(f"OneCycle: pct_start={pct_start!r} must lie in [0, 1] (the fraction of the steps "
                             "spent rising to the peak).")
        if float(div) <= 0 or float(div_final) <= 0 or float(peak) <= 0:
            raise ValueError(f"OneCycle: peak={peak!r}, div={div!r} and div_final={div_final!r} must be positive.")
        self.peak, self.total_steps = float(peak), int(max(1, total_steps))
        self.pct_start, self.div, self.div_final = float(pct_start), float(div), float(div_final)

    def __call__(self, step):
        ops = keras.ops
        step = ops.cast(step, "float32")
        # A rise shorter than one step is no rise: the schedule starts at the peak and anneals over
        # every step (a 1-step stage runs at the peak; fastai's would run at peak / div).
        up = self.pct_start * self.total_steps
        up = up if up >= 1.0 else 0.0
        down = max(1.0, self.total_steps - up)
        start, peak, end = self.peak / self.div, self.peak, self.peak / self.div_final
        if up == 0.0:
            return _cos(peak, end, step / down)
        return ops.where(step < up, _cos(start, peak, step / up), _cos(peak, end, (step - up) / down))

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "pct_start": self.pct_start,
                "div": self.div, "div_final": self.div_final}


# name -> (stage, peak lr, steps per epoch) -> a float or a LearningRateSchedule over optimizer steps
SCHEDULES = {
    "constant": lambda s, lr, n: lr,
    "plateau": lambda s, lr, n: lr,  # ReduceLROnPlateau lowers it (see the stage runner's callbacks)
    "step": lambda s, lr, n: keras.optimizers.schedules.PiecewiseConstantDecay(  # x0.1 at 50% and 75%
        [int(_total(s, n) * 0.5), int(_total(s, n) * 0.75)], [lr, lr * 0.1, lr * 0.01]),
    "exponential": lambda s, lr, n: keras.optimizers.schedules.ExponentialDecay(  # x0.1 over the stage
        lr, decay_steps=_total(s, n), decay_rate=0.1),
    "inverse_time": lambda s, lr, n: keras.optimizers.schedules.InverseTimeDecay(  # lr/10 at the end
        lr, decay_steps=_total(s, n), decay_rate=9.0),
    "cosine": lambda s, lr, n: keras.optimizers.schedules.CosineDecay(lr, decay_steps=_total(s, n)),
    "warmup_cosine": _warmup_cosine,  # linear warm-up from lr/100 over warmup_epochs, then cosine
    # fastai's fit_one_cycle: lr/25 -> lr (cosine, over warmup_epochs, else the first 25% of the
    # stage) -> lr/1e5 (cosine)
    "one_cycle": lambda s, lr, n: OneCycle(lr, _total(s, n), pct_start=min(1.0, s.rise_epochs / s.epochs)),
}


def make_schedule(stage: Stage, lr: float, steps_per_epoch: int):
    """A float or a ``LearningRateSchedule`` over optimizer steps."""
    if stage.schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {stage.schedule!r}.")
    return SCHEDULES[stage.schedule](stage, lr, steps_per_epoch)


def make_optimizer(stage: Stage, lr: float, steps_per_epoch: int, clipnorm: float = 0.0):
    opt = OPTIMIZERS[stage.optimizer](make_schedule(stage, lr, steps_per_epoch), stage)
    if clipnorm:
        opt.global_clipnorm = float(clipnorm)
    if stage.weight_decay and stage.optimizer != "adamw":
        opt.weight_decay = float(stage.weight_decay)
    return opt


def current_lr(optimizer) -> float:
    lr = optimizer.learning_rate
    if isinstance(optimizer._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        lr = optimizer._learning_rate(optimizer.iterations)
    return float(keras.ops.convert_to_numpy(lr))
