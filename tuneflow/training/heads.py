"""New layers on top of a backbone: the head, and the choice of normalisation."""
from __future__ import annotations

import logging

import keras

log = logging.getLogger("tuneflow")


def choose_norm(norm: str, per_replica_batch: int) -> str:
    """``auto``: BatchNorm for per-replica batches of 10 or more, InstanceNorm below.

    BN estimates statistics from the batch; with a handful of examples per replica
    those estimates are noise, while instance norm uses each example alone.
    """
    if norm != "auto":
        return norm
    chosen = "batch" if per_replica_batch >= 10 else "instance"
    log.info("norm=auto: per-replica batch %d -> %s normalisation", per_replica_batch, chosen)
    return chosen


@keras.saving.register_keras_serializable(package="tuneflow")
class MaskTolerantGroupNormalization(keras.layers.GroupNormalization):
    """GroupNormalization that accepts (and ignores) ``mask``, so it can stand in for BN in a clone."""

    def call(self, inputs, mask=None):
        return super().call(inputs)


@keras.saving.register_keras_serializable(package="tuneflow")
class MaskTolerantLayerNormalization(keras.layers.LayerNormalization):
    def call(self, inputs, mask=None):
        return super().call(inputs)


# Each head and norm a recipe may name (tuneflow.recipe.HEADS, .NORMS; "auto" resolves by
# choose_norm) -> how its layers are built; tests/test_heads.py builds and trains every entry.
NORMS = {
    "batch": lambda name: keras.layers.BatchNormalization(name=name),
    "instance": lambda name: keras.layers.GroupNormalization(groups=-1, name=name),  # Keras 3's InstanceNormalization
    "group": lambda name: keras.layers.GroupNormalization(groups=8, name=name),
    "layer": lambda name: keras.layers.LayerNormalization(name=name),
}
# replace_backbone_bn=KIND: what stands in for each of the backbone's BatchNormalization layers.
BN_REPLACEMENTS = {
    "instance": lambda name: MaskTolerantGroupNormalization(groups=-1, name=name),
    "group": lambda name: MaskTolerantGroupNormalization(groups=8, name=name),
    "layer": lambda name: MaskTolerantLayerNormalization(name=name),
}


def norm_layer(kind: str, name: str):
    if kind not in NORMS:
        raise ValueError(f"Unknown norm {kind!r}; one of {', '.join(NORMS)}.")
    return NORMS[kind](name)


def _linear(feature_shape, recipe, norm, name, reg) -> list:
    return [keras.layers.GlobalAveragePooling2D(name=f"{name}_pool")]


def _mlp(feature_shape, recipe, norm, name, reg) -> list:
    L = keras.layers
    return [L.GlobalAveragePooling2D(name=f"{name}_pool"),
            L.Dense(recipe.head_hidden, use_bias=False, kernel_regularizer=reg, kernel_initializer="he_normal",
                    name=f"{name}_dense"),
            norm_layer("layer" if norm == "instance" else norm, f"{name}_norm"),  # one vector: no instance to norm
            L.ReLU(name=f"{name}_relu")]


def _conv(feature_shape, recipe, norm, name, reg) -> list:
    L = keras.layers
    layers = [L.Conv2D(recipe.head_hidden, 1, use_bias=False, kernel_regularizer=reg,
                       kernel_initializer="he_normal", name=f"{name}_conv"),
              norm_layer(norm, f"{name}_norm"), L.ReLU(name=f"{name}_relu")]
    if recipe.spatial_dropout:
        layers.append(L.SpatialDropout2D(recipe.spatial_dropout, name=f"{name}_spatial_dropout"))
    return layers + [L.GlobalAveragePooling2D(name=f"{name}_pool")]


# head name -> the layers between the backbone's feature map and the dropout + classifier
HEADS = {
    "linear": _linear,  # global average pooling, then the classifier
    "mlp": _mlp,  # pooling, Dense(head_hidden) + norm + ReLU
    "conv": _conv,  # 1x1 Conv(head_hidden) + norm + ReLU (+ SpatialDropout) at the tap, then pooling
}


def build_head(feature_shape, n_classes: int, recipe, norm: str, name: str = "head",
               classifier_penalty: bool = True) -> keras.Model:
    """A Sequential head taking the backbone's feature map (H, W, C) -> class probabilities.

    ``classifier_penalty=False``: no l1/l2 on the classifier, for a classifier fitted by L-BFGS
    (:mod:`.probe`). Its L2 was chosen by cross-validation on standardised features and the
    standardisation is folded into its weights, so they are large where a feature varies little
    (x100-x1000); a Keras penalty on those raw weights measured them in the wrong units: with
    ``l2=1e-4`` it was ~90 of the fine-tuning loss (against ~0.3 of cross-entropy), and its
    gradient dominated any global-norm clipping of the fine-tuning stages."""
    L = keras.layers
    reg = keras.regularizers.L1L2(recipe.l1, recipe.l2) if (recipe.l1 or recipe.l2) else None
    layers = [keras.Input(feature_shape)] + HEADS[recipe.head](feature_shape, recipe, norm, name, reg)
    if recipe.dropout:
        layers.append(L.Dropout(recipe.dropout, name=f"{name}_dropout"))
    # float32 output even under mixed precision: softmax and the loss need the range.
    layers.append(L.Dense(n_classes, activation="softmax", kernel_regularizer=reg if classifier_penalty else None,
                          dtype="float32", name=f"{name}_classifier"))
    return keras.Sequential(layers, name=name)


def replace_batchnorm(model: keras.Model, kind: str) -> keras.Model:
    """Clone ``model`` with each BatchNormalization swapped for ``kind`` normalisation (opt-in)."""
    def clone(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            return BN_REPLACEMENTS[kind](layer.name)
        return layer.__class__.from_config(layer.get_config())

    new = keras.models.clone_model(model, clone_function=clone)
    for old_layer, new_layer in zip(model.layers, new.layers):
        if not isinstance(old_layer, keras.layers.BatchNormalization) and old_layer.weights:
            new_layer.set_weights(old_layer.get_weights())
    return new
