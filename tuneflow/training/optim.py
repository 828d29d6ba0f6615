"""Optimizer and learning-rate schedule registries (names are what recipes store)."""
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


def make_schedule(stage: Stage, lr: float, steps_per_epoch: int):
    """A float or a ``LearningRateSchedule`` over optimizer steps."""
    total = max(1, stage.epochs * steps_per_epoch)
    S = keras.optimizers.schedules
    if stage.schedule in ("constant", "plateau"):
        return lr  # plateau: ReduceLROnPlateau lowers it (see callbacks)
    if stage.schedule == "step":  # x0.1 at 50% and 75% of training
        bounds = [int(total * 0.5), int(total * 0.75)]
        return S.PiecewiseConstantDecay(bounds, [lr, lr * 0.1, lr * 0.01])
    if stage.schedule == "exponential":  # x0.1 over the whole stage
        return S.ExponentialDecay(lr, decay_steps=total, decay_rate=0.1)
    if stage.schedule == "inverse_time":  # lr / (1 + k t), lr/10 at the end
        return S.InverseTimeDecay(lr, decay_steps=total, decay_rate=9.0)
    if stage.schedule == "cosine":
        return S.CosineDecay(lr, decay_steps=total)
    if stage.schedule == "warmup_cosine":
        warm = int(stage.warmup_epochs * steps_per_epoch)
        return S.CosineDecay(lr / 100.0, decay_steps=max(1, total - warm), warmup_target=lr,
                             warmup_steps=warm)
    raise ValueError(f"Unknown schedule {stage.schedule!r}.")


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
