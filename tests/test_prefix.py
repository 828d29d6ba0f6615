"""Fine-tuning through the cached frozen prefix: the split is exact, a step on cached activations is
the step the whole model would take, recipes use it where it pays and say why where it does not."""
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import make_image_folder
from tuneflow import build_backbone
from tuneflow.backbones import apply_freeze, get_spec
from tuneflow.recipe import RecipeError
from tuneflow.training import prefix


def _model(train: str, size: int = 64, name: str = "efficientnet_lite0"):
    keras.utils.set_random_seed(0)
    bb = build_backbone(name, weights=None, input_size=size)
    head = keras.Sequential([keras.Input(bb.output.shape[1:]), keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(3, activation="softmax")])
    model = keras.Model(bb.input, head(bb.output))
    apply_freeze(bb, get_spec(name), train, freeze_bn=True)
    return bb, model


@pytest.mark.parametrize("name, boundary", [("efficientnet_lite0", "block6d_add"), ("efficientnet_lite1", "block6e_add")])
def test_large_similars_top_2_cuts_each_lite_at_its_last_stage_6_block(name, boundary):
    """large_similar's `top:2` (stage 7 and the head) on Lite1, its default backbone, and on Lite0:
    the cut is the last block of stage 6 (Lite1 has one block more per stage than Lite0)."""
    bb, model = _model("top:2", 64, name)
    split = prefix.find_split(model, bb)
    assert split is not None and split.boundary == boundary


def test_the_split_is_exact_and_a_step_on_cached_activations_is_the_whole_models_step():
    bb, model = _model("top:2")
    split = prefix.find_split(model, bb)
    assert split is not None
    assert len(split.top.trainable_weights) == len(model.trainable_weights) > 0
    assert not split.prefix.trainable_weights or all(not w.trainable for w in split.prefix.weights)
    assert split.shape[0] <= 64 // 4  # a late boundary: most of the forward pass is in the prefix
    x = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    acts = split.prefix(x)
    np.testing.assert_allclose(split.top(acts), model(x), atol=1e-5)
    loss = keras.losses.SparseCategoricalCrossentropy()
    grads = []
    for m, inp in ((model, x), (split.top, acts)):
        with tf.GradientTape() as tape:
            value = loss(y, m(inp, training=True))
        grads.append({v.path: g for v, g in zip(m.trainable_weights, tape.gradient(value, m.trainable_weights))})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        np.testing.assert_allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_validation_through_the_top_is_its_traced_call_and_does_not_keep_it_alive():
    """call_direct (every epoch's validation) runs the top through one traced graph: the same
    probabilities as the model's own call, later weights seen, and the cached graph dies with the
    model. (Called eagerly, large_different's top on 600 rows held 10.7 GB; traced, 1.6 GB.)"""
    import gc
    import weakref

    from tuneflow.training.stages import _DIRECT_FNS, call_direct
    bb, model = _model("top:2")
    split = prefix.find_split(model, bb)
    acts = np.asarray(split.prefix(np.random.default_rng(1).integers(0, 255, (37, 64, 64, 3)).astype(np.float32)),
                      np.float16)  # the cache's dtype
    np.testing.assert_allclose(call_direct(split.top, acts, chunk=16), split.top(acts), atol=1e-5)
    w = split.top.trainable_weights[-1]
    w.assign(w + 0.5)
    np.testing.assert_allclose(call_direct(split.top, acts, chunk=16), split.top(acts), atol=1e-5)
    assert split.top in _DIRECT_FNS
    ref = weakref.ref(split.top)
    del split, model, bb, w
    gc.collect()
    assert ref() is None


def test_no_split_when_nothing_or_everything_is_frozen():
    bb, model = _model("all")
    assert prefix.find_split(model, bb) is None
    bb, model = _model("frozen")
    assert prefix.find_split(model, bb) is None



def test_prefix_cache_on_refuses_a_stage_that_cannot_use_it_and_says_why(tmp_path, caplog):
    from tuneflow.fit.finetune import finetune
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=8, size=40)
    with pytest.raises(RecipeError, match=r"prefix_cache=on, but stage 'head' cannot use it: no frozen prefix that cuts the model in two\. Use --set prefix_cache=auto"):
        finetune("large_similar", str(data), tmp_path / "run", verbose=0,
                 overrides=["weights=None", "input_size=64", "head.epochs=1", "finetune.epochs=1",
                            "prefix_cache=on"])


@pytest.mark.slow
def test_a_recipe_fine_tunes_through_the_prefix_cache_and_its_artifact_is_the_whole_model(tmp_path, caplog):
    from conftest import random_lite0_weights
    from tuneflow.fit.finetune import finetune
    data = make_image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=12, size=48)
    common = ["backbone=efficientnet_lite0", f"weights={random_lite0_weights()}", "input_size=64", "head.epochs=2", "finetune.epochs=2",
              "augment=none"]
    with caplog.at_level("INFO", logger="tuneflow"):
        res = finetune("large_similar", str(data), tmp_path / "on", verbose=0, overrides=common)
    assert "frozen prefix cached at" in caplog.text
    stages = res.report["stages"]
    assert stages[1].get("prefix_cache"), stages
    rows = (tmp_path / "on" / "metrics.csv").read_text().splitlines()
    assert sum(1 for r in rows[1:] if r.startswith("1,")) == 2  # both fine-tuning epochs recorded
    # the artifact is the whole model: its report figure is measured on the files, and agrees with
    # the training's fast path (float32 here)
    assert res.report["val_accuracy"] == pytest.approx(res.report["fast_path"]["val_accuracy"], abs=0.1)
    caplog.clear()
    with caplog.at_level("INFO", logger="tuneflow"):
        off = finetune("large_similar", str(data), tmp_path / "off", verbose=0,
                       overrides=common + ["prefix_cache=off"])
    assert "frozen prefix cached at" not in caplog.text
    assert not off.report["stages"][1].get("prefix_cache")
