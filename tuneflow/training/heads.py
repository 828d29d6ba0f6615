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


def replacement_norm(kind: str, name: str):
    if kind == "instance":
        return MaskTolerantGroupNormalization(groups=-1, name=name)
    if kind == "group":
        return MaskTolerantGroupNormalization(groups=8, name=name)
    return MaskTolerantLayerNormalization(name=name)


def norm_layer(kind: str, name: str):
    L = keras.layers
    if kind == "batch":
        return L.BatchNormalization(name=name)
    if kind == "instance":
        return L.GroupNormalization(groups=-1, name=name)  # Keras 3's InstanceNormalization
    if kind == "group":
        return L.GroupNormalization(groups=8, name=name)
    if kind == "layer":
        return L.LayerNormalization(name=name)
    raise ValueError(f"Unknown norm {kind!r}.")


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
    layers = [keras.Input(feature_shape)]
    if recipe.head == "conv":
        layers += [L.Conv2D(recipe.head_hidden, 1, use_bias=False, kernel_regularizer=reg,
                            kernel_initializer="he_normal", name=f"{name}_conv"),
                   norm_layer(norm, f"{name}_norm"), L.ReLU(name=f"{name}_relu")]
        if recipe.spatial_dropout:
            layers.append(L.SpatialDropout2D(recipe.spatial_dropout, name=f"{name}_spatial_dropout"))
    layers.append(L.GlobalAveragePooling2D(name=f"{name}_pool"))
    if recipe.head == "mlp":
        layers += [L.Dense(recipe.head_hidden, use_bias=False, kernel_regularizer=reg,
                           kernel_initializer="he_normal", name=f"{name}_dense"),
                   norm_layer("layer" if norm == "instance" else norm, f"{name}_norm"),
                   L.ReLU(name=f"{name}_relu")]
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
            return replacement_norm(kind, layer.name)
        return layer.__class__.from_config(layer.get_config())

    new = keras.models.clone_model(model, clone_function=clone)
    for old_layer, new_layer in zip(model.layers, new.layers):
        if not isinstance(old_layer, keras.layers.BatchNormalization) and old_layer.weights:
            new_layer.set_weights(old_layer.get_weights())
    return new
