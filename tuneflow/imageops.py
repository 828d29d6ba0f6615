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
from PIL import Image

from .errors import DataError

RESIZE_MODES = ("crop", "squash")


def resizing_layer(size: int, mode: str = "crop", name: str = "resize"):
    """``crop``: the centre square, scaled to ``size`` (the backbones' own ImageNet evaluation,
    aspect ratio kept); ``squash``: the whole image stretched to ``size x size``. Bilinear with
    antialiasing (what PIL does when it shrinks), computed in float32 under any precision policy."""
    import keras
    if mode not in RESIZE_MODES:
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


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """One channel of a high-bit-depth mode scaled (not clipped) to 0..255.

    ``I;16*``: 16 bits, 65535 -> 255. ``I`` (32-bit int) and ``F`` (float) say nothing about their
    range, so it is read from the values: 0..1 (float) or 0..255 as they are, 0..65535 as 16 bits,
    anything else stretched from its minimum to its maximum."""
    a = a.astype(np.float64)
    finite = a[np.isfinite(a)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        scale, offset = 255.0 / 65535.0, 0.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        scale, offset = 255.0, 0.0
    elif lo >= 0 and hi <= 255:
        scale, offset = 1.0, 0.0
    elif lo >= 0 and hi <= 65535 and mode == "I":
        scale, offset = 255.0 / 65535.0, 0.0
    else:
        scale, offset = 255.0 / max(hi - lo, 1e-12), lo
    a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    return np.clip(np.round((a - offset) * scale), 0, 255).astype(np.uint8)


def to_rgb8(im: Image.Image) -> np.ndarray:
    """Any PIL image mode -> (H, W, 3) uint8 RGB.

    16-bit and 32-bit modes (``I;16``, ``I;16B``, ``I``, ``F``) are scaled to 8 bits (PIL's own
    ``convert`` clips them, so a 16-bit PNG would read as white); transparent pixels (``RGBA``,
    ``LA``, ``PA``, ``P`` or a ``transparency`` entry) become white; ``CMYK``, ``YCbCr``, ``1``,
    ``L`` and the rest go through PIL's conversion to RGB."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = _scale_to_uint8(np.asarray(im), mode)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La", "P") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent -> white
        return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"), np.uint8)
    return np.asarray(im.convert("RGB"), np.uint8)


def draft_size(fmt: str | None, width: int, height: int, size: int | None) -> tuple[int, int]:
    """The (width, height) :func:`decode_pixels` decodes a ``fmt`` image to for a ``size`` px model:
    a JPEG at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= ``size`` (PIL's
    ``draft()`` rule, which the artifact's graph decoder repeats), anything else at full size."""
    if not size or fmt not in ("JPEG", "MPO"):
        return width, height
    scale = next(s for s in (8, 4, 2, 1) if min(width // size, height // size) >= s or s == 1)
    return (width + scale - 1) // scale, (height + scale - 1) // scale


def decode_pixels(item, max_pixels: int | None = None, size: int | None = None) -> np.ndarray:
    """The one decoder: a path, encoded bytes or an array -> RGB uint8 (H, W, 3).

    PIL reads every format it knows; EXIF orientation is applied; grey, palette, CMYK, alpha and
    16-bit images become 8-bit RGB (JPEG with libjpeg's accurate integer IDCT, PIL's default).
    With ``size`` (the model's input side), a JPEG is decoded at the DCT scale of
    :func:`draft_size` (a 12 Mpx photo for a 224 px model: 1/8, 64x fewer pixels, never below
    the model's input); every client of a model passes its size, so training, evaluation,
    prediction, the HTTP service and the artifact's bytes signatures see the same pixels.
    ``max_pixels`` refuses larger images (decompression bombs) from the header, before decoding.
    Raises :class:`tuneflow.errors.DataError` naming the problem.
    """
    import io
    import warnings
    from pathlib import Path

    from PIL import ImageOps, UnidentifiedImageError

    if isinstance(item, np.ndarray):
        a = item
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=-1)
        if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
            raise DataError(f"An image array must be (H, W), (H, W, 1|3|4); got shape {a.shape}.")
        if a.shape[-1] == 1:
            a = np.repeat(a, 3, axis=-1)
        a = a[..., :3]
        if a.dtype != np.uint8:
            a = np.clip(np.round(a.astype(np.float64)), 0, 255).astype(np.uint8)
        return a
    name = "image bytes" if isinstance(item, (bytes, bytearray, memoryview)) else str(item)
    try:
        src = io.BytesIO(bytes(item)) if isinstance(item, (bytes, bytearray, memoryview)) else Path(item)
        if isinstance(src, io.BytesIO) and not src.getbuffer().nbytes:
            raise DataError("Empty image data (0 bytes).")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as im:
                if max_pixels is not None and im.size[0] * im.size[1] > max_pixels:
                    raise DataError(f"{name}: {im.size[0]}x{im.size[1]} = {im.size[0] * im.size[1]} pixels "
                                    f"exceeds the limit of {max_pixels} pixels per image.")
                if size and im.format in ("JPEG", "MPO"):
                    im.draft(im.mode, (int(size), int(size)))
                im.load()
                im = ImageOps.exif_transpose(im)
                return to_rgb8(im)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{name}: no such file.") from None
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image PIL can read (unknown or unsupported format).") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise DataError(f"{name}: refused as a decompression bomb ({exc}).") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{name}: unreadable image ({type(exc).__name__}: {exc}).") from None
