"""Augmentation presets behind one interface, with two backends.

A preset is data: a dict of neutral operations (flip, crop scale, rotation, warp,
contrast, brightness) that each backend translates. ``keras`` builds Keras
preprocessing layers (in-graph, parallel inside tf.data); ``albumentations`` builds
an ``A.Compose`` and runs it on whole batches inside tf.data, a thread per core,
instead of one ``tf.numpy_function`` call per image (albumentations-team/albumentations#1464).
Validation data is never augmented: only the training pipeline calls these.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Strengths from the practitioners' defaults: flips always; crops/scale, rotation and
# warps, then colour (contrast, brightness) as the preset grows.
PRESETS: dict[str, dict] = {
    "none": {},
    "light": {"flip": True, "crop_scale": 0.8},
    "medium": {"flip": True, "crop_scale": 0.65, "rotate_deg": 10, "contrast": 0.2,
               "brightness": 0.15},
    "heavy": {"flip": True, "crop_scale": 0.5, "rotate_deg": 20, "translate": 0.1,
              "shear_deg": 8, "perspective": 0.05, "contrast": 0.35, "brightness": 0.3},
}
BACKENDS = ("keras", "albumentations")
# Augmentation works on pixels in float32 whatever the model's mixed-precision policy: under
# mixed_bfloat16 Keras layers would otherwise compute in bfloat16 (8 mantissa bits: pixel values
# rounded by up to 1 grey level, and the layers' dtypes would disagree).
F32 = "float32"


def check_preset(preset) -> None:
    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"Unknown augmentation preset {preset!r}; choose one of "
                         f"{', '.join(PRESETS)}, or pass your own albumentations Compose or Keras layers.")


def _random_affine_layer():
    import keras
    import tensorflow as tf

    class RandomAffine(keras.layers.Layer):
        """Zoom-in, rotation, translation and shear as ONE resampling per image.

        Keras has a layer per geometric operation and each resamples the whole image, so a
        preset with zoom + rotation pays (and blurs) twice; composing the matrices first and
        calling ``ImageProjectiveTransformV3`` once is about twice as fast on CPU. Output pixel
        (x, y) samples input ``c + s R(theta) Shear (p - c) + t`` with reflect padding.
        """

        def __init__(self, zoom=0.0, rotate=0.0, translate=0.0, shear=0.0, seed=None, **kw):
            super().__init__(**kw)
            self.zoom, self.rotate, self.translate, self.shear, self.seed = zoom, rotate, translate, shear, seed

        def call(self, images, training=True):
            images = tf.cast(images, tf.float32)
            shape = tf.shape(images)
            n, h, w = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)

            def u(lo, hi, salt):
                return tf.random.uniform([n], lo, hi, seed=None if self.seed is None else self.seed + salt)

            s = 1.0 - u(0.0, self.zoom, 1) if self.zoom else tf.ones([n])
            th = u(-self.rotate, self.rotate, 2) if self.rotate else tf.zeros([n])
            sh = u(-self.shear, self.shear, 3) if self.shear else tf.zeros([n])
            tx = u(-self.translate, self.translate, 4) * w if self.translate else tf.zeros([n])
            ty = u(-self.translate, self.translate, 5) * h if self.translate else tf.zeros([n])
            cos, sin = tf.cos(th), tf.sin(th)
            # M = s * R(theta) @ [[1, sh], [0, 1]]
            m00, m01 = s * cos, s * (cos * sh - sin)
            m10, m11 = s * sin, s * (sin * sh + cos)
            cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
            ox = cx - (m00 * cx + m01 * cy) + tx
            oy = cy - (m10 * cx + m11 * cy) + ty
            zeros = tf.zeros([n])
            transforms = tf.stack([m00, m01, ox, m10, m11, oy, zeros, zeros], axis=1)
            out = tf.raw_ops.ImageProjectiveTransformV3(
                images=images, transforms=transforms, output_shape=shape[1:3], fill_value=0.0,
                interpolation="BILINEAR", fill_mode="REFLECT")
            out.set_shape(images.shape)  # keep the static shape for the layers that follow
            return out

        def compute_output_shape(self, input_shape):
            return input_shape

    return RandomAffine


def keras_augmenter(preset, size: int, seed: int | None = None):
    """A callable on uint8/float batches (N, S, S, 3) in 0..255 -> float32 batches, or None."""
    import keras
    if not isinstance(preset, str):  # the user's own Keras layer(s)
        layers = preset if isinstance(preset, (list, tuple)) else [preset]
        return keras.Sequential(list(layers), name="augment")
    check_preset(preset)
    p = PRESETS[preset]
    if not p:
        return None
    L = keras.layers
    layers = []
    if p.get("flip"):
        layers.append(L.RandomFlip("horizontal", seed=seed, dtype=F32))
    geo = dict(zoom=1 - float(np.sqrt(p.get("crop_scale", 1.0))),  # area scale -> side zoom-in
               rotate=float(np.radians(p.get("rotate_deg", 0.0))), translate=float(p.get("translate", 0.0)),
               shear=float(np.tan(np.radians(p.get("shear_deg", 0.0)))))
    if any(geo.values()):
        layers.append(_random_affine_layer()(**geo, seed=seed, name="random_affine", dtype=F32))
    if p.get("perspective"):
        layers.append(L.RandomPerspective(factor=1.0, scale=p["perspective"], seed=seed, dtype=F32))
    if p.get("contrast"):
        layers.append(L.RandomContrast(p["contrast"], value_range=(0, 255), seed=seed, dtype=F32))
    if p.get("brightness"):
        layers.append(L.RandomBrightness(p["brightness"], value_range=(0, 255), seed=seed, dtype=F32))
    return keras.Sequential(layers, name=f"augment_{preset}")


def albumentations_compose(preset, size: int):
    import albumentations as A
    if not isinstance(preset, str):
        return preset  # the user's own Compose
    check_preset(preset)
    p = PRESETS[preset]
    if not p:
        return None
    ops = []
    if p.get("crop_scale"):
        ops.append(A.RandomResizedCrop(size=(size, size), scale=(p["crop_scale"], 1.0)))
    if p.get("flip"):
        ops.append(A.HorizontalFlip(p=0.5))
    if p.get("rotate_deg") or p.get("translate") or p.get("shear_deg"):
        ops.append(A.Affine(rotate=(-p.get("rotate_deg", 0), p.get("rotate_deg", 0)),
                            translate_percent=(-p.get("translate", 0), p.get("translate", 0)),
                            shear=(-p.get("shear_deg", 0), p.get("shear_deg", 0)),
                            border_mode=4, p=0.8))  # 4 = cv2.BORDER_REFLECT_101
    if p.get("perspective"):
        ops.append(A.Perspective(scale=(0.0, p["perspective"]), p=0.5))
    if p.get("contrast") or p.get("brightness"):
        ops.append(A.RandomBrightnessContrast(brightness_limit=p.get("brightness", 0),
                                              contrast_limit=p.get("contrast", 0), p=0.8))
    return A.Compose(ops)


class AlbumentationsBatch:
    """Apply a Compose to a whole uint8 batch with a thread pool (cv2 releases the GIL)."""

    def __init__(self, compose, workers: int | None = None):
        self.compose = compose
        self.pool = ThreadPoolExecutor(workers or max(2, os.cpu_count() or 2))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.uint8)
        return np.stack(list(self.pool.map(lambda im: self.compose(image=im)["image"], batch)))


def make_augmenter(preset, backend: str, size: int, seed: int | None = None):
    """Return ``fn(batch_tensor) -> float32 batch_tensor`` for use inside tf.data, or None."""
    import tensorflow as tf
    if backend not in BACKENDS:
        raise ValueError(f"Unknown augmentation backend {backend!r}; choose {' or '.join(BACKENDS)}.")
    if backend == "keras":
        aug = keras_augmenter(preset, size, seed)
        if aug is None:
            return None

        def fn(x):
            return tf.cast(aug(tf.cast(x, tf.float32), training=True), tf.float32)
        return fn
    compose = albumentations_compose(preset, size)
    if compose is None:
        return None
    runner = AlbumentationsBatch(compose)

    def fn(x):
        out = tf.numpy_function(runner, [tf.cast(x, tf.uint8)], tf.uint8, stateful=True)
        out.set_shape(x.shape)
        return tf.cast(out, tf.float32)
    return fn


def preview(images: np.ndarray, preset, backend: str, out_path, rows: int = 4, cols: int = 6,
            seed: int = 0) -> str:
    """Write a PNG grid: each row is one source image, then ``cols-1`` augmented versions."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tensorflow as tf
    size = images.shape[1]
    fn = make_augmenter(preset, backend, size, seed)
    rows = min(rows, len(images))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.6), squeeze=False)
    for r in range(rows):
        src = np.repeat(images[r:r + 1], cols - 1, axis=0)
        aug = src if fn is None else np.asarray(fn(tf.constant(src))).clip(0, 255).astype(np.uint8)
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(images[r] if c == 0 else aug[c - 1])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("original" if c == 0 else f"aug {c}", fontsize=8)
    name = preset if isinstance(preset, str) else "custom"
    fig.suptitle(f"augmentation preset '{name}' ({backend})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return str(out_path)
