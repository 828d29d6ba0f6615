"""Frozen-feature cache: run a frozen backbone once, train heads on the stored features.

Keyed by backbone, weights (a hash of their values), input size, tap layer, augmented
view count and the data fingerprint: change any one and the cache is recomputed.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from ..home import tuneflow_home

log = logging.getLogger("tuneflow")


def cache_root() -> Path:
    return tuneflow_home() / "features"


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for w in model.weights:
        h.update(np.asarray(w).tobytes())
    return h.hexdigest()[:16]


def cache_key(**parts) -> str:
    text = "|".join(f"{k}={parts[k]}" for k in sorted(parts))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def exists(key: str) -> bool:
    return (cache_root() / f"{key}.npy").exists()


def compute_features(feature_model, images, batch_size: int, augment_fn=None,
                     views: int = 1, dtype=np.float16, engine: str = "tensorflow",
                     weights_key: str | None = None) -> np.ndarray:
    """Features for every image (and ``views`` augmented copies when ``augment_fn`` is given).
    ``images``: an array, or a list of arrays computed in one pass as if concatenated.
    ``engine``: ``tensorflow`` or ``openvino`` (see :mod:`tuneflow.features.infer`).

    Returns ``dtype`` of shape (views, N, *feature_shape): float16 for feature maps (half
    the memory, ample for a head behind dropout), float32 for pooled vectors (exact).
    """
    from . import infer
    local = local_model(feature_model)
    out = []
    for v in range(views):  # view 0 is always the plain image
        fn = augment_fn if (augment_fn is not None and v > 0) else None
        out.append(np.asarray(infer.run(local, images, batch_size, engine, map_fn=fn, weights_key=weights_key),
                              dtype=dtype))
    return np.stack(out)


def local_model(feature_model):
    """A local (non-distributed) model over the same layers: features are computed on each
    worker without collective ops, because whether the cache hits may differ between workers.
    Kept on the feature model, so that train and val share one traced function (or conversion)."""
    import keras
    local = getattr(feature_model, "_tuneflow_local", None)
    if local is None:
        local = keras.Model(feature_model.input, feature_model.output)
        feature_model._tuneflow_local = local
    return local


def cached(key: str, compute, *, enabled: bool = True) -> tuple[np.ndarray, bool]:
    """Return (features, hit). Writes are atomic: a killed run never leaves half a cache file."""
    if not enabled:
        return compute(), False
    path = cache_root() / f"{key}.npy"
    if path.exists():
        try:
            return np.load(path), True
        except (OSError, ValueError) as exc:
            log.warning("feature cache %s unreadable (%s); recomputing", path, exc)
    feats = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.part")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, feats)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return feats, False
