"""Frozen-feature cache on disk: features stored once, verified by checksum when read back.

Keys come from :meth:`tuneflow.features.extractor.FeatureExtractor.key`: backbone weights (a hash
of their values) and architecture, engine and precision, input size, tap layer, augmented views
with their seed, and the data fingerprint: change any one and the features are recomputed.

Large feature arrays (above 64 MB, or :func:`tuneflow.data.store.inmemory_max_bytes` if lower) are
read back as read-only memory maps, and :func:`cached_into` lets the feature pass write into a ``.npy`` on disk
batch by batch: a cache larger than RAM is never held in memory whole.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from ..atomic import write_file
from ..data.store import ImageRows, inmemory_max_bytes
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
    return _scan(path)[0]


def _scan(path: Path, block: int = 1 << 22) -> tuple[str, bool]:
    """(sha256 of the file, whether its values are all finite), read in 4 MB blocks through the
    file (not a memory map): neither the file nor its pages ever sit in this process's memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            _, _, dtype = read[version](f)
            start = f.tell()  # a multiple of 64 (npy's header alignment): blocks stay item-aligned
        except (ValueError, KeyError):  # not a .npy at all: the checksum alone decides (and np.load fails later)
            dtype, start = None, None
        f.seek(0)
        finite, pos, buf = True, 0, bytearray(block)
        view = memoryview(buf)
        while got := f.readinto(buf):
            h.update(view[:got])
            if finite and dtype is not None and dtype.kind == "f" and pos + got > start:
                lo = max(start - pos, 0)
                usable = (got - lo) // dtype.itemsize * dtype.itemsize
                finite = bool(np.isfinite(np.frombuffer(view[lo:lo + usable], dtype)).all())
            pos += got
    return h.hexdigest(), finite


def _commit(tmp: Path, path: Path) -> None:
    """A finished array file into place, then its checksum (what makes it a cache hit)."""
    digest = _digest(tmp)
    os.replace(tmp, path)
    write_file(path.with_suffix(".sha256"), digest)  # several processes may finish one key at once


def _load_verified(path: Path) -> np.ndarray | None:
    """The cached array, or None (with a warning) when it is damaged: checksum, format or NaN/Inf,
    all checked in one streamed read of the file. Files above
    :func:`_max_bytes` come back as read-only memory maps."""
    sums = path.with_suffix(".sha256")
    try:
        if not sums.exists():
            raise ValueError("no checksum file")
        digest, finite = _scan(path)
        if sums.read_text().strip() != digest:
            raise ValueError("checksum mismatch")
        feats = np.load(path, mmap_mode="r" if path.stat().st_size > _max_bytes() else None)
        if feats.dtype.kind == "f" and not finite:
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
    row of ``out``, a :class:`RowWriter` over a ``.npy`` file of ``shape`` and ``dtype`` being
    written (``out[i:j] = rows``; ``out[v]`` is the writer of the sub-array ``v``). Rows go to
    the file with ``pwrite``, so neither the array nor its pages are ever in this process's
    memory. Committed atomically with its checksum; returns (features, hit), read back as
    :func:`cached` reads them (a memory map when large). With ``enabled=False`` the file is a
    temporary one, never reused.

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
    _sweep_parts(root, key)
    # the writer's pid in the name: a killed pass's leftover is recognised and removed next time
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f"{key}-{os.getpid()}-", suffix=".npy.part")
    os.close(fd)
    try:
        header = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))
        offset = header.offset  # the header written and the file sized (sparse); no page touched
        del header
        with open(tmp, "rb+") as f:
            fill(RowWriter(f.fileno(), offset, tuple(shape), np.dtype(dtype)))
            os.fsync(f.fileno())
        if not enabled:  # nothing kept: read back (a map of an unlinked file stays valid on POSIX)
            feats = np.load(tmp, mmap_mode="r")
            return (feats if feats.nbytes > _max_bytes() else np.array(feats)), False
        _commit(Path(tmp), path)
        return np.load(path, mmap_mode="r" if path.stat().st_size > _max_bytes() else None), False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sweep_parts(root: Path, key: str) -> None:
    """Remove partial files of ``key`` left by feature passes whose process is gone (killed)."""
    for part in root.glob(f"{key}-*-*.npy.part"):
        try:
            os.kill(int(part.name[len(key) + 1:].split("-")[0]), 0)
        except ProcessLookupError:  # the writer is dead: its file will never be finished
            part.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):  # another user's live process, or not ours
            continue


class RowWriter:
    """Write-only rows of a C-ordered array stored in a file at ``offset``: ``w[i:j] = rows``
    writes with ``pwrite`` (rows are contiguous); ``w[v]`` is the writer of sub-array ``v``."""

    def __init__(self, fd: int, offset: int, shape: tuple[int, ...], dtype):
        self.fd, self.offset, self.shape, self.dtype = fd, offset, tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i):
        if not isinstance(i, (int, np.integer)) or not -len(self) <= i < len(self):
            raise IndexError(f"RowWriter[{i!r}]: an index in 0..{len(self) - 1} expected")
        return RowWriter(self.fd, self.offset + int(i % len(self)) * self.row_bytes, self.shape[1:], self.dtype)

    def __setitem__(self, key, value):
        if isinstance(key, (int, np.integer)):
            key = slice(int(key) % len(self), int(key) % len(self) + 1)
        start, stop, step = key.indices(len(self)) if isinstance(key, slice) else (None, None, None)
        if step != 1:
            raise IndexError(f"RowWriter: rows are written as contiguous slices, not {key!r}")
        rows = np.ascontiguousarray(np.broadcast_to(np.asarray(value, self.dtype),
                                                    (max(0, stop - start),) + self.shape[1:]))
        view, pos = memoryview(rows.reshape(-1).view(np.uint8)), self.offset + start * self.row_bytes
        while len(view):  # pwrite may write less than asked
            done = os.pwrite(self.fd, view, pos)
            view, pos = view[done:], pos + done


def _offset_known(x) -> bool:
    """Whether ``x`` is a memory map whose ``offset`` is where its data starts in its file. A
    slice of a map inherits its parent's ``offset`` (wrong for it); a map made with its own offset
    (its base is the ``mmap``) or one that runs to the file's end (the whole cache) is right.
    Raises OSError when the file is gone."""
    import mmap
    return (isinstance(x, np.memmap) and bool(x.filename) and x.flags.c_contiguous and x.ndim > 0
            and (isinstance(x.base, mmap.mmap) or os.path.getsize(x.filename) == x.offset + x.nbytes))


def rows_view(x):
    """``x`` for reading rows from: a memory map whose offset is known (a whole cache file, or a
    map made by :func:`split_views`) comes back as an :class:`~tuneflow.data.store.ImageRows`
    (rows read with ``pread``, so the pages stay in the kernel's cache, not in this process's
    resident set); anything else (a slice of a map is read through the map) as it is."""
    try:
        return ImageRows(x, path=str(x.filename)) if _offset_known(x) else x
    except OSError:  # the file is gone (a temporary cache, unlinked): read through the map
        return x


def split_views(x) -> list:
    """The views of a (V, N, ...) cache, ``x[v]`` each: for a memory-mapped file, each its own map
    at its true offset (so :func:`rows_view` reads it with ``pread``; a slice ``x[v]`` would
    carry the file's offset and be read through the map, its pages joining the process's RSS)."""
    try:
        known = _offset_known(x)
    except OSError:
        known = False
    if known:
        step = x[0].nbytes
        return [np.memmap(x.filename, x.dtype, "r", offset=x.offset + v * step, shape=x.shape[1:])
                for v in range(x.shape[0])]
    return [x[v] for v in range(len(x))]


# Features at most this large are read back into RAM; larger ones stay memory-mapped. Lower than
# the images' threshold: from ~50 MB on, the head's batches gathered from an array take as long
# as tf.data's in-RAM shuffle (benchmarks/bench_head_input.py), so holding more in RAM buys nothing.
FEATURES_INMEMORY_MAX_BYTES = 64 << 20


def _max_bytes() -> int:
    """Bytes of features above which a cache file is read back as a memory map: the least of
    FEATURES_INMEMORY_MAX_BYTES and :func:`~tuneflow.data.store.inmemory_max_bytes`."""
    return min(FEATURES_INMEMORY_MAX_BYTES, inmemory_max_bytes())
