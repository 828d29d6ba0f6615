"""One registry per kind of thing, keyed by exactly the names a recipe may use: optimizers and
schedules (training.optim), heads and norms (training.heads). Every entry is built here, so adding
one adds its test."""
import keras
import numpy as np
import pytest

from tuneflow import recipe as vocab
from tuneflow.recipes import small_similar
from tuneflow.training import heads, optim


def test_the_registries_are_keyed_by_the_recipes_vocabulary():
    assert tuple(optim.OPTIMIZERS) == vocab.OPTIMIZERS
    assert tuple(optim.SCHEDULES) == vocab.SCHEDULES
    assert tuple(heads.HEADS) == vocab.HEADS
    assert set(heads.NORMS) == set(vocab.NORMS) - {"auto"}  # auto resolves to batch or instance


@pytest.mark.parametrize("name", vocab.OPTIMIZERS)
def test_every_optimizer_takes_a_step(name):
    st = small_similar.override(f"head.optimizer={name}").stages[0]
    opt = optim.make_optimizer(st, 0.1, steps_per_epoch=4)
    w = keras.Variable(np.ones(3, np.float32))
    opt.apply_gradients([(keras.ops.ones(3), w)])
    assert np.all(np.asarray(w) < 1.0), f"{name} did not move the weights against the gradient"


@pytest.mark.parametrize("name", vocab.SCHEDULES)
def test_every_schedule_stays_within_its_peak(name):
    st = small_similar.override(f"head.schedule={name}", "head.epochs=4").stages[0]
    sched = optim.make_schedule(st, 0.1, steps_per_epoch=5)
    lrs = [float(sched(i)) if callable(sched) else float(sched) for i in range(20)]
    assert all(0 <= lr <= 0.1 * (1 + 1e-6) for lr in lrs) and max(lrs) > 0


@pytest.mark.parametrize("head", vocab.HEADS)
@pytest.mark.parametrize("norm", sorted(heads.NORMS))
def test_every_head_and_norm_builds_with_its_own_layers(head, norm):
    r = small_similar.override(f"head={head}", "head_hidden=8", "dropout=0.1")
    model = heads.build_head((4, 4, 6), 3, r, norm)
    out = model(np.random.default_rng(0).normal(size=(2, 4, 4, 6)).astype(np.float32))
    assert out.shape == (2, 3) and np.allclose(np.asarray(out).sum(1), 1, atol=1e-5)
    names = [la.name for la in model.layers]
    assert names[-1] == "head_classifier" and "head_dropout" in names
    if head == "linear":
        assert not any(n.endswith("_norm") for n in names)
    else:
        want = type(heads.NORMS["layer" if head == "mlp" and norm == "instance" else norm]("x"))
        assert isinstance(model.get_layer("head_norm"), want)


@pytest.mark.parametrize("kind", sorted(heads.BN_REPLACEMENTS))
def test_every_bn_replacement_stands_in_for_batchnorm(kind):
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, name="c")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    m = heads.replace_batchnorm(keras.Model(inp, x), kind)
    assert not any(isinstance(la, keras.layers.BatchNormalization) for la in m.layers)
    assert type(m.get_layer("bn")) is type(heads.BN_REPLACEMENTS[kind]("x"))
