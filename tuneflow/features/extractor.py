"""FeatureExtractor: a frozen feature model run by one engine at one precision, through the feature cache."""
from __future__ import annotations

import hashlib
import logging
import time

import numpy as np

from ..errors import TuneflowError
from . import cache as fcache
from . import infer

log = logging.getLogger("tuneflow")

# Images per forward pass without gradients: 64 is ~30% faster than 32 on 2 CPU cores at 224 px;
# activations grow with the pixel count, so larger inputs get proportionally smaller batches
# (input_size=2048 -> 1 image a batch) and the feature pass's memory stays about constant.
INFER_BATCH = 64
REFERENCE_PIXELS = 224 * 224


def infer_batch(size: int, base: int = INFER_BATCH) -> int:
    return int(max(1, min(base, base * REFERENCE_PIXELS // max(1, size * size))))


def architecture_digest(model) -> str:
    """Changes with any layer's class or configuration (e.g. replace_backbone_bn), not with weights."""
    import json
    h = hashlib.sha256()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        cfg = layer.get_config() if hasattr(layer, "get_config") else {}
        cfg = {k: v for k, v in cfg.items() if k not in ("name", "trainable")}
        h.update(type(layer).__name__.encode())
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class FeatureExtractor:
    """Runs ``feature_model`` (frozen) over images: engine, precision, batch size and the converted
    model are its state; :meth:`cached` keys results by everything that changes them.

    The model is a local (non-distributed) model over the same layers: features are computed on
    each worker without collective ops, because whether the cache hits may differ between workers.
    """

    def __init__(self, feature_model, engine: str = "auto", batch_size: int | None = None):
        import keras
        self.model = keras.Model(feature_model.input, feature_model.output)
        self.engine = infer.resolve_engine(engine)
        size = int(self.model.inputs[0].shape[1] or 224)
        self.batch_size = batch_size or infer_batch(size)
        self.memo: dict = {}
        self.weights_key = fcache.weights_digest(self.model)
        self.arch_key = architecture_digest(self.model)
        self.stats: list[tuple[int, float, str]] = []  # (images, seconds, engine that ran)

    @property
    def describe(self) -> str:
        """The engine asked for, as the cache key names it: ``openvino/bf16``, ``tensorflow/float32``."""
        return infer.describe(self.engine)

    @property
    def used(self) -> str:
        """The engine that actually ran (OpenVINO falls back to TensorFlow for a graph it cannot convert)."""
        return infer.describe(self.memo.get("used", self.engine))

    def run(self, images, map_fn=None):
        """Outputs on ``images`` (an array or a list of arrays, as if concatenated); NaN/Inf refused."""
        t0 = time.time()
        out = infer.run(self.model, images, self.batch_size, self.engine, map_fn=map_fn,
                        weights_key=self.weights_key, memo=self.memo)
        for o in (out if isinstance(out, list) else [out]):
            bad = ~np.isfinite(np.asarray(o, np.float32)).reshape(len(o), -1).all(1)
            if bad.any():
                raise TuneflowError(
                    f"The backbone produced NaN/Inf features for {int(bad.sum())} of {len(o)} images "
                    f"(first at index {int(np.argmax(bad))}) on {self.used}. The weights are damaged, or "
                    "the precision overflows: try --set precision=float32 or --set feature_engine=tensorflow.")
        n = sum(len(p) for p in images) if isinstance(images, (list, tuple)) else len(images)
        self.stats.append((n, time.time() - t0, self.used))
        return out

    def compute(self, images, augment_fn=None, views: int = 1, dtype=np.float32) -> np.ndarray:
        """(views, N, *feature_shape): view 0 is the plain image, later views augmented."""
        out = []
        for v in range(views):
            fn = augment_fn if (augment_fn is not None and v > 0) else None
            out.append(np.asarray(self.run(images, fn), dtype=dtype))
        return np.stack(out)

    def key(self, **parts) -> str:
        """A cache key over the model (weights and architecture), the engine and ``parts``."""
        return fcache.cache_key(weights=self.weights_key, arch=self.arch_key, engine=self.describe,
                                size=int(self.model.inputs[0].shape[1]), **parts)
