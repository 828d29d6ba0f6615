"""Pixel preprocessing as a Keras layer, so that it travels inside every saved model.

A tuneflow model takes RGB pixel values in 0..255 (float or uint8). The layer
applies the family's own normalisation; nobody downstream (serving, export,
a notebook) has to know whether the backbone wants caffe, torch or Lite0 scaling.
"""
from __future__ import annotations

import keras
from keras import ops

# Per-channel statistics, in RGB order, on the 0..255 scale.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # VGG / ResNet: RGB->BGR, subtract mean, no scaling
TORCH_MEAN = (0.485, 0.456, 0.406)  # DenseNet: /255, then ImageNet mean/std
TORCH_STD = (0.229, 0.224, 0.225)
MODES = ("caffe", "torch", "lite0", "none")


@keras.saving.register_keras_serializable(package="tuneflow")
class Preprocess(keras.layers.Layer):
    """Map RGB 0..255 pixels to what a backbone family was trained on.

    ``mode``: ``caffe`` (VGG16, ResNet50), ``torch`` (DenseNet121), ``lite0``
    ((x - 127) / 128, EfficientNet-Lite) or ``none``.
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"Unknown preprocessing mode {mode!r}; choose one of {', '.join(MODES)}.")
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1)  # RGB -> BGR
            return x - ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype=self.compute_dtype)
        if self.mode == "torch":
            mean = ops.convert_to_tensor(TORCH_MEAN, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(TORCH_STD, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        if self.mode == "lite0":
            return (x - 127.0) / 128.0
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
