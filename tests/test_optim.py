"""Optimizers and LR schedules (tuneflow.training.optim): every registered pair builds, one-cycle's shape."""
import re

import keras
import numpy as np
import pytest


@pytest.mark.parametrize("opt", ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "adamw"])
@pytest.mark.parametrize("schedule", ["constant", "step", "exponential", "inverse_time", "cosine", "warmup_cosine", "one_cycle", "plateau"])
def test_optimizer_and_schedule_registry(opt, schedule):
    from tuneflow.training.optim import current_lr, make_optimizer
    from tuneflow.recipe import Stage
    stage = Stage("s", epochs=4, optimizer=opt, lr=0.1, schedule=schedule, warmup_epochs=1)
    o = make_optimizer(stage, 0.1, steps_per_epoch=10, clipnorm=5.0)
    assert o.global_clipnorm == 5.0
    lr0 = current_lr(o)
    assert 0 < lr0 <= 0.1 + 1e-6
    if schedule == "warmup_cosine":
        assert lr0 == pytest.approx(0.001)
    if schedule == "one_cycle":
        assert lr0 == pytest.approx(0.1 / 25, rel=1e-5)


def test_one_cycle_rises_to_the_peak_then_anneals():
    """fastai's shape: lr/25 at the start, the peak at 25% of the steps, lr/1e5 at the end, and
    monotone on each side; it survives a save/load round trip (resumable checkpoints)."""
    from tuneflow.training.optim import OneCycle, make_schedule
    from tuneflow.recipe import Stage
    sched = make_schedule(Stage("s", epochs=4, lr=0.01, schedule="one_cycle"), 0.01, steps_per_epoch=25)
    assert isinstance(sched, OneCycle) and sched.total_steps == 100
    lrs = np.array([float(sched(i)) for i in range(101)])
    assert lrs[0] == pytest.approx(0.01 / 25, rel=1e-5) and lrs.max() == pytest.approx(0.01, rel=1e-5) and lrs.argmax() == 25
    assert lrs[100] == pytest.approx(0.01 / 1e5, rel=1e-3)
    assert (np.diff(lrs[:26]) > 0).all() and (np.diff(lrs[25:]) < 0).all()
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(sched))
    assert [float(again(i)) for i in (0, 25, 60)] == pytest.approx([lrs[0], lrs[25], lrs[60]], rel=1e-5)


def test_one_cycle_edges_warmup_and_a_resumed_optimizer():
    from tuneflow.training.optim import OneCycle, current_lr, make_optimizer, make_schedule
    from tuneflow.recipe import Stage
    assert float(OneCycle(0.01, 1)(0)) == pytest.approx(0.01, rel=1e-5)  # a 1-step stage runs at the peak
    flat = OneCycle(0.01, 100, pct_start=0.0)  # no rise: starts at the peak and anneals
    assert float(flat(0)) == pytest.approx(0.01, rel=1e-5) and float(flat(100)) == pytest.approx(1e-7, rel=1e-3)
    for bad, msg in (({"pct_start": 1.5}, "pct_start=1.5 must lie in [0, 1]"), ({"div": 0}, "must be positive")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            OneCycle(0.01, 100, **bad)
    # warmup_epochs sets the rise: 2 of 4 epochs -> the peak at step 20 of 40 (the default 25% would be step 10)
    sched = make_schedule(Stage("s", epochs=4, lr=0.01, schedule="one_cycle", warmup_epochs=2), 0.01, 10)
    lrs = [float(sched(i)) for i in range(41)]
    assert int(np.argmax(lrs)) == 20 and sched.pct_start == 0.5
    # A resumed stage rebuilds its optimizer and restores `iterations`: the LR is the schedule's at that step.
    st = Stage("s", epochs=4, optimizer="adam", lr=0.01, schedule="one_cycle")
    opt = make_optimizer(st, 0.01, steps_per_epoch=10)
    opt.build([keras.Variable(np.zeros(2, np.float32))])
    opt.iterations.assign(17)
    assert current_lr(opt) == pytest.approx(float(OneCycle(0.01, 40)(17)), rel=1e-5)
