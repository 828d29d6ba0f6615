"""Fine-tuning at the cost of what trains: the frozen prefix's activations cached, the trainable top run alone.

A fine-tuning stage that trains the top blocks (``top:2``) still runs the whole backbone forward
on every step, although everything below those blocks is frozen and computes the same function
each epoch. Here the stage instead:

1. finds the *boundary*: the last tensor below the first trainable layer from which the rest of
   the model can be computed alone (a block's output; EfficientNet's residual adds make most
   other cuts impossible);
2. runs the frozen prefix once over ``views`` augmented copies of each training image (one view
   per epoch: the augmentation a normal epoch would draw, drawn ahead) and once over the
   validation images, through the feature engine and cache of the head stage (OpenVINO on a
   CPU, checksummed, keyed by weights, boundary, size, views and data);
3. trains ``keras.Model(boundary, model.output)``, the top of the same model (the same layer
   objects and weights), on those activations; checkpoints, early stopping and the exported
   artifact see the full model as usual.

``prefix_cache="auto"`` uses it when the boundary lies at a quarter of the input's resolution or
below (stage 3 of the backbone onwards, i.e. most of the forward pass is saved) and the cached
activations fit in a quarter of the available memory; ``on`` insists (an error says why it
cannot), ``off`` trains end to end. The trade: augmentation is limited to ``views`` draws per
image (one per epoch when views = epochs, the default, so each epoch still sees new views).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import keras
import numpy as np

from ..errors import RecipeError
from ..features.extractor import available_memory
from .cached import cached_features

log = logging.getLogger("tuneflow")

MAX_VIEWS = 8  # augmented views cached per image when prefix_views=0 (= the stage's epochs, capped)
MIN_REDUCTION = 4  # auto: the boundary's resolution is at most input / 4
MEMORY_SHARE = 0.25  # auto: the cached activations take at most this share of available memory
SCAN = 64  # layers looked at below the first trainable one when searching for a boundary


@dataclass
class PrefixSplit:
    boundary: str  # the layer whose output the cache holds
    prefix: keras.Model  # pixels -> boundary activations (frozen)
    top: keras.Model  # boundary activations -> the model's outputs (holds every trainable layer)
    shape: tuple  # one image's boundary activations


def find_split(model: keras.Model, backbone: keras.Model) -> PrefixSplit | None:
    """The split below the first trainable backbone layer, or None when there is none (nothing
    frozen, everything frozen, or no tensor that cuts the graph)."""
    layers = backbone.layers
    first = next((i for i, layer in enumerate(layers) if layer.trainable and layer.weights), None)
    if first is None or first <= 1:
        return None
    for j in range(first - 1, max(0, first - 1 - SCAN), -1):
        layer = layers[j]
        if isinstance(layer, keras.layers.InputLayer):
            break
        try:
            out = layer.output
        except (AttributeError, ValueError):  # used more than once: not a cut
            continue
        if isinstance(out, (list, tuple)):
            continue
        try:
            top = keras.Model(out, model.output, name="trainable_top")
        except ValueError:  # the rest of the graph needs more than this tensor
            continue
        if len(top.trainable_weights) != len(model.trainable_weights):
            continue  # a trainable layer would be left in the prefix
        prefix = keras.Model(backbone.input, out, name="frozen_prefix")
        if not prefix.weights:  # only preprocessing below: nothing to save
            return None
        return PrefixSplit(layer.name, prefix, top, tuple(int(d) for d in out.shape[1:]))
    return None


def views_for(recipe, stage) -> int:
    return int(recipe.prefix_views) if recipe.prefix_views else max(1, min(stage.epochs, MAX_VIEWS))


def cache_bytes(split: PrefixSplit, n_train: int, n_val: int, views: int) -> int:
    return (views * n_train + n_val) * int(np.prod(split.shape)) * 2  # float16


def choose(plan, asm, stage, n_train: int, n_val: int) -> PrefixSplit | None:
    """The split this stage trains through, or None to train end to end (with the reason logged)."""
    mode = plan.recipe.prefix_cache
    if mode == "off":
        return None

    def no(reason):
        if mode == "on":
            raise RecipeError(f"prefix_cache=on, but stage {stage.name!r} cannot use it: {reason}. "
                              "Use --set prefix_cache=auto (or off) to train it end to end.")
        log.info("stage %s trains end to end (prefix cache not used: %s)", stage.name, reason)
        return None

    if plan.replicas > 1:
        return no("several replicas (the cache is per process)")
    if not plan.recipe.feature_cache:
        return no("feature_cache=False")
    split = find_split(asm.model, asm.backbone)
    if split is None:
        return no("no frozen prefix that cuts the model in two")
    size = int(asm.backbone.input.shape[1])
    reduction = size / max(1, split.shape[0])
    if mode == "auto" and reduction < MIN_REDUCTION:
        return no(f"the first trainable layer is early (boundary {split.boundary} at 1/{reduction:.0f} "
                  "of the input's resolution): little would be saved")
    need = cache_bytes(split, n_train, n_val, views_for(plan.recipe, stage))
    budget = MEMORY_SHARE * available_memory()
    if mode == "auto" and need > budget:
        return no(f"its activations would take {need / 2**30:.1f} GB, over {budget / 2**30:.1f} GB")
    return split


def activations(plan, bundle, split: PrefixSplit, stage, extractor_cls):
    """(train (views, N, *shape) float16, val (N, *shape) float16), through the feature cache."""
    views = views_for(plan.recipe, stage)
    sub = replace(plan, recipe=replace(plan.recipe, cache_views=views))
    extractor = extractor_cls(split.prefix, plan.recipe.feature_engine)
    ftr, fva = cached_features(sub, bundle, extractor, f"prefix:{split.boundary}")
    return ftr, fva  # memory maps above 64 MB stay maps (np.asarray would hide the file)
