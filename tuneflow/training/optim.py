"""The optimizer and learning-rate schedule registries (their names are what recipes store and validate against)."""
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
