"""Frozen-feature cache on disk: features stored once, verified by checksum when read back.

Keys come from :meth:`tuneflow.features.extractor.FeatureExtractor.key`: backbone weights (a hash
of their values) and architecture, engine and precision, input size, tap layer, augmented views
with their seed, and the data fingerprint: change any one and the features are recomputed.

Large feature arrays (above :func:`tuneflow.data.store.inmemory_max_bytes`) are read back as
read-only memory maps, and :func:`cached_into` lets the feature pass write into a ``.npy`` on disk
batch by batch: a cache larger than RAM is never held in memory whole.
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


def _all_finite(a: np.ndarray, rows: int = 4096) -> bool:
    """``np.isfinite(a).all()`` a block of rows at a time (a memory map is never read whole)."""
    flat = a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a.reshape(-1, 1)
    return all(np.isfinite(flat[i:i + rows]).all() for i in range(0, len(flat), rows))


def _commit(tmp: Path, path: Path) -> None:
    """A finished array file into place, then its checksum (what makes it a cache hit)."""
    digest = _digest(tmp)
    os.replace(tmp, path)
    sums_tmp = path.with_suffix(".sha256.part")
    sums_tmp.write_text(digest)
    os.replace(sums_tmp, path.with_suffix(".sha256"))


def _load_verified(path: Path) -> np.ndarray | None:
    """The cached array, or None (with a warning) when it is damaged: checksum, format or NaN/Inf.
    Files above :func:`~tuneflow.data.store.inmemory_max_bytes` come back as read-only memory maps."""
    from ..data.store import inmemory_max_bytes
    sums = path.with_suffix(".sha256")
    try:
        if not sums.exists() or sums.read_text().strip() != _digest(path):
            raise ValueError("checksum mismatch" if sums.exists() else "no checksum file")
        feats = np.load(path, mmap_mode="r" if path.stat().st_size > inmemory_max_bytes() else None)
        if feats.dtype.kind == "f" and not _all_finite(feats):
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
        _commit(Path(tmp), path)
    except OSError as exc:
        log.warning("feature cache not written (%s): %s", path.parent, exc)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return feats, False


def cached_into(key: str, shape: tuple[int, ...], dtype, fill, *, enabled: bool = True) -> tuple[np.ndarray, bool]:
    """Like :func:`cached`, for a feature pass that writes as it goes: ``fill(out)`` writes every
    row of ``out`` (an array of ``shape`` and ``dtype``, memory-mapped onto a ``.npy`` file being
    written, so it never sits in RAM whole). Committed atomically with its checksum; returns
    (features, hit), the features read back as :func:`cached` reads them.

    Example (the extractor writing batch by batch)::

        def fill(out):
            for i, feats in enumerate(batch_outputs):
                out[i * bs:i * bs + len(feats)] = feats
        feats, hit = cached_into(key, (n, 1280), np.float32, fill)
    """
    path = cache_root() / f"{key}.npy"
    if enabled and path.exists():
        feats = _load_verified(path)
        if feats is not None:
            return feats, True
    root = path.parent if enabled else Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, suffix=".npy.part")
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))
        fill(out)
        out.flush()
        del out
        if not enabled:  # nothing kept: read back (a map of an unlinked file stays valid on POSIX)
            feats = np.load(tmp, mmap_mode="r")
            return (feats if feats.nbytes > _max_bytes() else np.array(feats)), False
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _commit(Path(tmp), path)
        return np.load(path, mmap_mode="r" if path.stat().st_size > _max_bytes() else None), False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _max_bytes() -> int:
    from ..data.store import inmemory_max_bytes
    return inmemory_max_bytes()
