"""Heads and normalisation (tuneflow.training.heads): the head and norm a recipe names are the layers
the model holds, and they train; BatchNorm swapped out of the backbone on request."""
import csv

import keras
import numpy as np
import pytest

import tuneflow.recipes as registry
from conftest import fast_overrides as _fast
from tuneflow import build_backbone, finetune
from tuneflow.runs.checkpoints import restore_model
from tuneflow.training.heads import build_head, choose_norm


def test_norm_auto_follows_the_per_replica_batch():
    assert choose_norm("auto", 32) == "batch" and choose_norm("auto", 10) == "batch"
    assert choose_norm("auto", 9) == "instance" and choose_norm("auto", 4) == "instance"
    assert choose_norm("group", 32) == "group" and choose_norm("batch", 2) == "batch"


# (head, norm) -> the head's hidden layer, its normalisation layer's Keras class and groups
# ("channels": instance norm, one group per channel, which Keras resolves from groups=-1 when built).
EXPECTED = {("conv", "instance"): ("head_conv", keras.layers.GroupNormalization, "channels"),
            ("mlp", "batch"): ("head_dense", keras.layers.BatchNormalization, None),
            ("conv", "group"): ("head_conv", keras.layers.GroupNormalization, 8)}


@pytest.mark.parametrize("head, norm", list(EXPECTED))
def test_heads_and_norms_train(tmp_path, tiny_folder, head, norm):
    """The model holds the head and norm asked for, and they trained: the hidden layer's weights
    left their (seeded) initial values, the norm's scale or BatchNorm's moving statistics moved,
    the loss went down. On ImageNet Lite0 features at 64 px (a 2x2 map): a random Lite0's pooled
    features at 32 px are ~1e-14, which a norm's epsilon flattens to zero, and at 32 px the map is
    1x1, where instance norm outputs zeros: either way its scale would get no gradient."""
    ov = {**_fast("small_similar"), "weights": "imagenet", "input_size": 64, "head": head, "norm": norm,
          "spatial_dropout": 0.1,
          "dropout": 0.0,
          "head__epochs": 4, "head__lr": 1e-2, "head__schedule": "constant", "head__patience": 0}
    res = finetune("small_similar", tiny_folder, tmp_path / "r", verbose=0, overrides=ov, export=False)
    assert res.report["norm"] == norm
    hidden, norm_class, groups = EXPECTED[(head, norm)]
    head_model = res.model.get_layer("head")
    names = [layer.name for layer in head_model.layers]
    assert hidden in names and "head_norm" in names, names
    norm_layer = head_model.get_layer("head_norm")
    assert type(norm_layer) is norm_class
    if groups is not None:
        assert norm_layer.groups == (norm_layer.gamma.shape[0] if groups == "channels" else groups)
    assert ("head_spatial_dropout" in names) == (head == "conv")  # spatial dropout only on a feature map
    # The same seeded head, untrained: what assembly built before training.
    recipe = registry.get("small_similar").override(**ov)
    keras.utils.set_random_seed(recipe.seed)
    fresh = build_head(tuple(head_model.input.shape[1:]), 2, recipe, norm)
    before, after = fresh.get_layer(hidden).kernel.numpy(), head_model.get_layer(hidden).kernel.numpy()
    assert before.shape == after.shape
    assert not np.allclose(before, after), "the head's hidden layer did not train"
    if norm == "batch":
        assert not np.allclose(norm_layer.moving_mean.numpy(), 0.0), "BatchNorm's statistics never moved"
    else:
        assert not np.allclose(norm_layer.gamma.numpy(), 1.0), "the norm's scale did not train"
    losses = [float(r["loss"]) for r in csv.DictReader(open(res.run_dir / "metrics.csv"))]
    assert len(losses) == 4 and losses[-1] < losses[0], losses


@pytest.mark.slow
def test_replace_backbone_bn_with_instance_norm(tmp_path, tiny_folder):
    """Every backbone BatchNorm becomes an instance norm (one group per channel), those in the
    fine-tuned blocks train, and the model saved as .keras loads and predicts as the trained one.
    At 64 px: at 32 px the top block's map is 1x1, where an instance norm outputs zeros (no gradient)."""
    res = finetune("large_different", tiny_folder, tmp_path / "r", verbose=0, export=False,
                   overrides={**_fast("large_different"), "replace_backbone_bn": "instance", "input_size": 64,
                              "finetune__train": "top:1"})
    layers = res.model.layers
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in layers)
    n_bn = sum(isinstance(layer, keras.layers.BatchNormalization)
               for layer in build_backbone("efficientnet_lite0", weights=None, input_size=64).layers)
    replaced = [layer for layer in layers if isinstance(layer, keras.layers.GroupNormalization)]
    assert len(replaced) == n_bn > 0
    assert all(layer.groups == layer.gamma.shape[0] for layer in replaced)  # one group per channel
    x = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3)).astype(np.uint8)
    res.model.save(tmp_path / "model.keras")  # what export writes (MaskTolerantGroupNormalization included)
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), res.model.predict(x, verbose=0), atol=1e-5)
    # Replacements start at gamma=1, beta=0; the top block's (top_bn) trains in the fine-tuning
    # stage (its last checkpoint: the model kept may be the head stage's best).
    restore_model(res.model, res.run_dir / "checkpoints" / "last")
    top = res.model.get_layer("top_bn")
    assert isinstance(top, keras.layers.GroupNormalization)
    assert not np.allclose(top.gamma.numpy(), 1.0) or not np.allclose(top.beta.numpy(), 0.0)
