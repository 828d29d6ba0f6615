"""``build_backbone``: the one factory for every registered backbone."""
from __future__ import annotations

import json
import os
import tempfile
import urllib.request
from pathlib import Path

import keras

from ..errors import RecipeError, TuneflowError
from . import efficientnet_lite
from .freeze import apply_freeze
from .preprocess import Preprocess
from .registry import BackboneSpec, get_spec

BACKBONE_WEIGHTS = "backbone.weights.h5"  # file name inside a tuneflow run folder
BACKBONE_META = "backbone.json"


class WeightsUnavailableError(TuneflowError, RuntimeError):
    """ImageNet weights are neither cached nor downloadable."""


def keras_cache_dir() -> Path:
    """Where keras.applications keeps downloaded weights ($KERAS_HOME/models)."""
    return Path(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras"))) / "models"


def _imagenet_file(spec: BackboneSpec, include_top: bool, timeout: float = 20.0) -> Path:
    fname, origin = spec.weights_file, spec.weights_origin
    if include_top:
        fname, origin = fname.replace("_notop", ""), origin.replace("_notop", "")
    target = keras_cache_dir() / fname
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(origin, timeout=timeout) as resp:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except Exception as exc:  # noqa: BLE001 - any network/file failure means "not available"
        raise WeightsUnavailableError(
            f"ImageNet weights for {spec.name} are not cached and could not be downloaded "
            f"({type(exc).__name__}: {exc}).\n"
            f"  file needed: {fname}\n"
            f"  put it in:   {target.parent}/  (keras.applications' cache, $KERAS_HOME/models)\n"
            f"  from:        {origin}\n"
            "Alternatives: weights=None (random init, train from scratch), weights=<path to a "
            "weights file or a tuneflow run folder>, or backbone 'efficientnet_lite0' (or lite1, "
            "lite2), whose ImageNet weights ship with tuneflow's dependencies and work offline."
        ) from None
    return target


def _resolve_local(weights: str) -> Path:
    path = Path(weights).expanduser()
    if path.is_dir():
        for candidate in (path / BACKBONE_WEIGHTS, path / "model" / BACKBONE_WEIGHTS):
            if candidate.exists():
                return candidate
        raise FileNotFoundError(
            f"{path} is a folder but holds no {BACKBONE_WEIGHTS}; pass a tuneflow run folder, "
            "a .weights.h5/.h5 file, 'imagenet' or None.")
    if not path.exists():
        raise FileNotFoundError(
            f"Weights {weights!r} are not 'imagenet', None, or an existing file or folder.")
    return path


def build_backbone(name: str, weights: str | None = "imagenet", input_size: int | None = None,
                   include_top: bool = False, train: str = "frozen", freeze_bn: bool = True
                   ) -> keras.Model:
    """Build a registered backbone that takes RGB pixels 0..255 (preprocessing inside).

    Args:
      name: a key of :data:`tuneflow.backbones.BACKBONES`.
      weights: ``"imagenet"``, ``None``, or a path to a weights file (Keras ``.weights.h5``
        from :func:`save_backbone`, or a keras.applications ``.h5``) or a tuneflow run folder.
      input_size: square input side in pixels (default: the backbone's own).
      include_top: keep the 1000-class ImageNet classifier.
      train: freezing spec: ``frozen``, ``all``, ``top:N`` or ``from:BLOCK``.
      freeze_bn: keep BatchNorm layers in inference mode even inside trainable blocks.

    >>> m = build_backbone("efficientnet_lite0", weights=None, input_size=64)
    >>> m.output.shape
    (None, 2, 2, 1280)
    """
    spec = get_spec(name)
    size = spec.input_size(input_size)
    if size < spec.min_size:
        raise ValueError(f"input_size={size} is too small for {name}; use at least {spec.min_size}.")
    local = None if weights in (None, "imagenet") else _resolve_local(str(weights))
    if spec.name in efficientnet_lite.VARIANTS:
        model = efficientnet_lite.build(spec.name, (size, size, 3), include_top=include_top)
        if weights == "imagenet":
            efficientnet_lite.load_imagenet(model, spec.name)
    else:
        inputs = keras.Input((size, size, 3), name="pixels")
        x = Preprocess(spec.preprocess, name="preprocess")(inputs)
        app_weights = None
        if weights == "imagenet":
            app_weights = str(_imagenet_file(spec, include_top))
        elif local is not None and not local.name.endswith(".weights.h5"):
            app_weights = str(local)  # a keras.applications-style .h5
        try:
            model = spec.constructor(include_top=include_top, weights=app_weights, input_tensor=x,
                                     input_shape=(size, size, 3))
        except ValueError as exc:
            if app_weights is None or weights == "imagenet":
                raise
            raise _misfit(local, name, include_top, exc) from None
    # Keras weights files (.weights.h5, from save_backbone) for every backbone; for the Lites, whose
    # graph is tuneflow's own, any Keras .h5 as well: a file is never silently ignored.
    if local is not None and (local.name.endswith(".weights.h5") or spec.name in efficientnet_lite.VARIANTS):
        try:
            model.load_weights(str(local))
        except Exception as exc:  # noqa: BLE001 - any failure means "not weights for this model"
            raise _misfit(local, name, include_top, exc) from None
    apply_freeze(model, spec, train, freeze_bn=freeze_bn)
    return model


def _misfit(local, name, include_top, exc) -> TuneflowError:
    return RecipeError(f"weights={str(local)!r} does not fit {name} (include_top={include_top}): "
                       f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}. Pass the weights "
                       "file or run folder of the same backbone, 'imagenet' or None.")


def save_backbone(model: keras.Model, folder: str | Path, name: str | None = None) -> Path:
    """Save a backbone's weights (and its registry ``name`` and input size) into ``folder`` atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / BACKBONE_WEIGHTS
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".weights.h5")
    os.close(fd)
    try:
        model.save_weights(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    meta = {"backbone": name,
            "input_size": int(model.input_shape[1])}
    (folder / BACKBONE_META).write_text(json.dumps(meta, indent=2))
    return target
