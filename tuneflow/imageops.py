"""The one resize/crop of tuneflow: a Keras ``Resizing`` layer used by training, evaluation, export and serving.

Decoding (PIL, EXIF orientation, colour modes) is the only step outside the model. Every
decoded image, whatever its size, becomes the model's ``size x size`` input through
:func:`resizing_layer`: the data pipeline applies it to uint8 images before caching them, and the
exported model carries the very same layer, followed by rounding to whole grey levels, in its
graph (:func:`model_input`), so a model fed raw images by anyone's loader sees exactly the pixels
training saw.
"""
from __future__ import annotations

import functools

import numpy as np

RESIZE_MODES = ("crop", "squash")


def resizing_layer(size: int, mode: str = "crop", name: str = "resize"):
    """``crop``: the centre square, scaled to ``size`` (the backbones' own ImageNet evaluation,
    aspect ratio kept); ``squash``: the whole image stretched to ``size x size``. Bilinear with
    antialiasing (what PIL does when it shrinks), computed in float32 under any precision policy."""
    import keras
    if mode not in RESIZE_MODES:
        from .errors import DataError
        raise DataError(f"resize={mode!r} is not a resize mode; choose one of {', '.join(RESIZE_MODES)}.")
    return keras.layers.Resizing(int(size), int(size), interpolation="bilinear",
                                 crop_to_aspect_ratio=(mode == "crop"), antialias=True,
                                 dtype="float32", name=name)


def model_input(images, size: int, mode: str = "crop"):
    """uint8 images (a batch, any one size) -> float32 ``size x size`` pixels, whole grey levels.

    Works on symbolic Keras tensors (the exported model's first operations) and on tensors.
    Rounding makes the result exactly the uint8 image the data pipeline stores (Keras returns
    rounded uint8 when it runs eagerly, unrounded floats inside a graph: this removes the
    difference)."""
    from keras import ops
    return ops.round(ops.cast(resizing_layer(size, mode)(images), "float32"))


@functools.lru_cache(maxsize=8)
def _resize_fn(size: int, mode: str):
    import tensorflow as tf
    layer = resizing_layer(size, mode)

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    def fn(image):
        return tf.cast(tf.round(tf.cast(layer(image[None]), tf.float32))[0], tf.uint8)
    return fn


def resize_image(image: np.ndarray, size: int, mode: str = "crop") -> np.ndarray:
    """One decoded RGB uint8 image (H, W, 3) -> (size, size, 3) uint8, exactly as the model does it."""
    image = np.asarray(image)
    if image.shape[:2] == (size, size):
        return image.astype(np.uint8, copy=False)  # the layer is the identity at the same size
    return _resize_fn(int(size), mode)(image).numpy()
