"""Pixel preprocessing inside every model, made of standard Keras operations only.

A tuneflow model takes RGB pixel values in 0..255 (float or uint8) and applies its
family's own normalisation itself: nobody downstream (serving, export, a notebook) has
to know whether the backbone wants caffe, torch or Lite scaling. The operations are
stock Keras (``ops.flip`` and a ``Rescaling`` layer), so a saved model loads with plain
``keras.models.load_model``, in a process that never imported tuneflow.
"""
from __future__ import annotations

import keras
from keras import ops

# Per-channel statistics, in RGB order, on the 0..255 scale.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # VGG / ResNet: RGB->BGR, subtract mean, no scaling
TORCH_MEAN = (0.485, 0.456, 0.406)  # DenseNet: /255, then ImageNet mean/std
TORCH_STD = (0.229, 0.224, 0.225)
MODES = ("caffe", "torch", "lite0", "none")


def scale_offset(mode: str) -> tuple[list[float], list[float]]:
    """``y = x * scale + offset`` per channel (after the RGB->BGR flip for caffe)."""
    if mode == "caffe":
        return [1.0, 1.0, 1.0], [-m for m in CAFFE_MEAN_BGR]
    if mode == "torch":
        return ([1.0 / (255.0 * s) for s in TORCH_STD], [-m / s for m, s in zip(TORCH_MEAN, TORCH_STD)])
    if mode == "lite0":  # (x - 127) / 128
        return [1.0 / 128.0] * 3, [-127.0 / 128.0] * 3
    return [1.0] * 3, [0.0] * 3


class Preprocess:
    """Map RGB 0..255 pixels to what a backbone family was trained on, in float32.

    ``mode``: ``caffe`` (VGG16, ResNet50), ``torch`` (DenseNet121), ``lite0``
    ((x - 127) / 128, EfficientNet-Lite) or ``none``. Called on a Keras tensor, it adds the
    operations to the graph; the ``Rescaling`` layer carries ``name`` (the caffe flip comes
    just before it).

    >>> x = keras.Input((8, 8, 3)); y = Preprocess("lite0", name="preprocess")(x)
    """

    def __init__(self, mode: str, name: str = "preprocess"):
        if mode not in MODES:
            raise ValueError(f"Unknown preprocessing mode {mode!r}; choose one of {', '.join(MODES)}.")
        self.mode, self.name = mode, name

    def __call__(self, x):
        x = ops.cast(x, "float32")
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1)  # RGB -> BGR
        scale, offset = scale_offset(self.mode)
        return keras.layers.Rescaling(scale, offset, dtype="float32", name=self.name)(x)


@keras.saving.register_keras_serializable(package="tuneflow", name="Preprocess")
class LegacyPreprocess(keras.layers.Layer):
    """The custom layer of tuneflow <= 0.1 run folders, kept so their ``model.keras`` still loads."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1)
        scale, offset = scale_offset(self.mode)
        return x * ops.convert_to_tensor(scale, self.compute_dtype) + ops.convert_to_tensor(offset, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
