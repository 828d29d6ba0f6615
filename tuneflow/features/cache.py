"""Frozen-feature cache on disk: features stored once, verified by checksum when read back.

Keys come from :meth:`tuneflow.features.extractor.FeatureExtractor.key`: backbone weights (a hash
of their values) and architecture, engine and precision, input size, tap layer, augmented views
with their seed, and the data fingerprint: change any one and the features are recomputed.
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


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _load_verified(path: Path) -> np.ndarray | None:
    """The cached array, or None (with a warning) when it is damaged: checksum, format or NaN/Inf."""
    sums = path.with_suffix(".sha256")
    try:
        if not sums.exists() or sums.read_text().strip() != _digest(path):
            raise ValueError("checksum mismatch" if sums.exists() else "no checksum file")
        feats = np.load(path)
        if feats.dtype.kind == "f" and not np.isfinite(feats).all():
            raise ValueError("NaN/Inf values")
        return feats
    except (OSError, ValueError) as exc:
        log.warning("feature cache %s is damaged (%s); recomputing", path, exc)
        return None


def cached(key: str, compute, *, enabled: bool = True) -> tuple[np.ndarray, bool]:
    """Return (features, hit). Writes are atomic (array, then its checksum, each renamed into
    place): a killed run never leaves half a cache file that would be read back."""
    if not enabled:
        return compute(), False
    path = cache_root() / f"{key}.npy"
    if path.exists():
        feats = _load_verified(path)
        if feats is not None:
            return feats, True
    feats = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.part")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, feats)
            f.flush()
            os.fsync(f.fileno())
        digest = _digest(Path(tmp))
        os.replace(tmp, path)
        sums_tmp = path.with_suffix(".sha256.part")
        sums_tmp.write_text(digest)
        os.replace(sums_tmp, path.with_suffix(".sha256"))
    except OSError as exc:
        log.warning("feature cache not written (%s): %s", path.parent, exc)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return feats, False
