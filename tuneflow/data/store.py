"""Decoded images kept on disk and memory-mapped when they would not fit comfortably in RAM.

A dataset whose decoded pixels (N x S x S x 3 bytes) exceed :func:`inmemory_max_bytes` is decoded
chunk by chunk into ``$TUNEFLOW_HOME/images/<key>.npy`` (written under a temporary name, renamed
when complete, then a JSON manifest written last as the completion marker) and read back as a
read-only memory map: pages are the kernel's file cache, evictable, so the process's own memory
(RssAnon) stays flat whatever the dataset size. The key covers every input's name, size and
modification time, the pixel size and the resize mode: a second load of the same data reuses
the store without decoding. :class:`ImageRows` is the array-like view a :class:`~tuneflow.data.Split`
holds: row subsets without copying, rows read on demand.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..atomic import write_file
from ..errors import DataError
from ..home import tuneflow_home

log = logging.getLogger("tuneflow.data")

STORE_VERSION = 2  # bump when the decoder or the layout changes: old stores are not reused
CHUNK_ROWS = 256  # rows decoded and written at a time: 256 x 224^2 x 3 B = 38 MB of buffer
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB of decoded pixels in RAM at most (~6,800 images at 224 px)


def inmemory_max_bytes() -> int:
    """Decoded bytes above which images go to a memory-mapped store: ``$TUNEFLOW_INMEMORY_MAX_BYTES``,
    or 1 GiB, or an eighth of physical memory when that is smaller."""
    env = os.environ.get("TUNEFLOW_INMEMORY_MAX_BYTES")
    if env:
        try:
            return int(float(env))
        except ValueError:
            raise DataError(f"TUNEFLOW_INMEMORY_MAX_BYTES={env!r} is not a number of bytes; "
                            "set it to e.g. 2e9, or unset it for the default (1 GiB).") from None
    try:
        phys = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        phys = 8 * DEFAULT_MAX_BYTES
    return int(min(DEFAULT_MAX_BYTES, phys // 8))


def store_root() -> Path:
    return tuneflow_home() / "images"


class ImageRows:
    """Rows ``index`` of an (N, S, S, 3) uint8 array (usually a read-only memory map), as an array.

    Indexing with an int, a slice or an index array returns a NumPy array of just those rows
    (read from disk on demand); :meth:`take` returns another view without reading anything;
    :meth:`chunks` walks the rows a few hundred at a time. ``np.asarray(rows)`` reads them all.
    Rows of a store are read with ``pread`` into fresh buffers rather than touched through the
    mapping: the pages stay in the kernel's cache, not in this process's resident set, so its
    RSS (VmHWM included) does not grow with the number of images read.
    """

    def __init__(self, base: np.ndarray, index: np.ndarray | None = None, path: str = ""):
        self.base = base
        self.index = None if index is None else np.asarray(index, np.int64)
        self.path = path
        self.meta: dict = {}  # what the decoder kept beside the pixels (TFDS: the labels)
        # opened here, not on first read: tf.data reads from several threads at once (pread is safe)
        self._fd = os.open(base.filename, os.O_RDONLY) if isinstance(base, np.memmap) else None

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """Base rows ``rows`` (any order, repeats allowed), read from the file in file order, each
        straight into its place in the result: a run of consecutive file rows is one ``preadv``
        into that run's destination rows, wherever they lie (no second copy to reorder; numpy's
        fancy assignment of uint8 rows ran at ~1 GB/s, 8x slower than the reads)."""
        shape = tuple(self.base.shape[1:])
        if not isinstance(self.base, np.memmap) or not len(rows):
            return np.array(self.base[rows])
        out = np.empty((len(rows),) + shape, self.base.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        order = None if len(rows) < 2 or (np.diff(rows) > 0).all() else np.argsort(rows, kind="stable")
        srt = rows if order is None else rows[order]
        row_bytes = flat.shape[1]
        breaks = np.flatnonzero(np.diff(srt) != 1) + 1
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(srt)]):
            pos = self.base.offset + int(srt[a]) * row_bytes
            if order is None:
                _preadv_all(self._fd, [flat[a:b]], pos, self.base.filename)
            else:
                _preadv_all(self._fd, [flat[k] for k in order[a:b]], pos, self.base.filename)
        return out

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __len__(self) -> int:
        return len(self.base) if self.index is None else len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self),) + tuple(self.base.shape[1:])

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return self.base.ndim

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def _rows(self, key) -> np.ndarray:
        """Base-row numbers for ``key`` (an int, slice or index/bool array over this view)."""
        if self.index is not None:
            return self.index[key]
        n = len(self.base)  # identity view: never build an arange of a million rows per batch
        if isinstance(key, slice):
            return np.arange(*key.indices(n))
        if isinstance(key, (int, np.integer)):
            if not -n <= key < n:
                raise IndexError(f"row {key} out of range for {n} rows")
            return np.int64(key % n)
        key = np.asarray(key)
        if key.dtype == bool:
            return np.flatnonzero(key)
        rows = key.astype(np.int64) % max(n, 1)
        if key.size and (key.min() < -n or key.max() >= n):
            raise IndexError(f"rows {key.min()}..{key.max()} out of range for {n} rows")
        return rows

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        rows = self._rows(key)
        if np.ndim(rows) == 0:
            out = self._read(np.asarray([rows], np.int64))[0]
        else:
            out = self._read(np.asarray(rows, np.int64))
        if not rest:
            return out
        return out[(slice(None),) + rest] if out.ndim == self.base.ndim else out[rest]

    def take(self, idx) -> "ImageRows":
        out = ImageRows(self.base, self._rows(np.asarray(idx, np.int64)), self.path)
        out.meta = self.meta
        return out

    def chunks(self, rows: int = CHUNK_ROWS):
        for i in range(0, len(self), rows):
            yield self[i:i + rows]

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def astype(self, dtype) -> np.ndarray:
        return np.asarray(self, dtype)

    def min(self):
        return min((c.min() for c in self.chunks()), default=np.uint8(0))

    def max(self):
        return max((c.max() for c in self.chunks()), default=np.uint8(0))

    def __repr__(self) -> str:
        return f"ImageRows({self.shape}, {self.dtype}, {self.path or 'in memory'})"


IOV_MAX = 1024  # buffers per preadv call (Linux's limit)


def _preadv_all(fd: int, bufs, pos: int, name: str = "") -> None:
    """Fill ``bufs`` (arrays or memoryviews, in order) from the file's bytes at ``pos`` on: ``preadv``
    repeated until every buffer is full (one call reads at most IOV_MAX buffers and ~2 GB)."""
    views = [memoryview(b).cast("B") for b in bufs]
    i = 0
    while i < len(views):
        got = os.preadv(fd, views[i:i + IOV_MAX], pos)
        if got <= 0:
            raise OSError(f"{name}: unexpected end of file at byte {pos}")
        pos += got
        while got and i < len(views):
            if got >= len(views[i]):
                got -= len(views[i])
                i += 1
            else:
                views[i], got = views[i][got:], 0


def iter_chunks(x, rows: int = CHUNK_ROWS):
    """Consecutive row blocks of an array or :class:`ImageRows`, each a NumPy array."""
    if isinstance(x, ImageRows):
        yield from x.chunks(rows)
        return
    for i in range(0, len(x), rows):
        yield x[i:i + rows]


def concat_rows(parts):
    """Rows of several arrays one after another: a view when all are views of one store."""
    if parts and all(isinstance(p, ImageRows) for p in parts) and all(p.base is parts[0].base for p in parts):
        return ImageRows(parts[0].base, np.concatenate([p._rows(slice(None)) for p in parts]), parts[0].path)
    return np.concatenate([np.asarray(p) for p in parts])


def source_key(entries, size: int, resize: str, extra: str = "") -> str:
    """What decoded pixels depend on: each input's identity (path, bytes, mtime), size and mode."""
    from PIL import __version__ as pil_version
    h = hashlib.sha256(f"v{STORE_VERSION}|pil{pil_version}|{size}|{resize}|{extra}".encode())
    for e in entries:
        h.update(str(e).encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.hexdigest()[:24]


def file_entries(files) -> list[tuple[str, int, int]]:
    """(path, bytes, mtime in ns) per file: a changed file changes the store key."""
    out = []
    for f in files:
        try:
            st = os.stat(f)
            out.append((str(f), st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(f), -1, -1))  # unreadable now: decoding names it
    return out


def _open_store(key: str):
    """A complete store for ``key``: (ImageRows over it, ok mask, skipped), or None."""
    path, manifest = store_root() / f"{key}.npy", store_root() / f"{key}.json"
    if not (path.exists() and manifest.exists()):
        return None
    try:
        meta = json.loads(manifest.read_text())
        base = np.load(path, mmap_mode="r")
        if list(base.shape) != meta["shape"] or not meta.get("complete"):
            raise ValueError(f"shape {base.shape}, manifest {meta.get('shape')}")
    except (OSError, ValueError, KeyError) as exc:
        log.warning("decoded-image store %s is damaged (%s); decoding again", path, exc)
        return None
    ok = np.zeros(len(base), bool)
    ok[np.asarray(meta["ok"], np.int64)] = True
    rows = ImageRows(base, None, str(path))
    rows.meta = meta.get("extra") or {}
    return rows, ok, list(meta["skipped"])


def decode_rows(items, names, size: int, resize: str, decode, desc: str = "decode",
                key: str | None = None, extra=None):
    """Decode ``items`` (paths, encoded bytes, ...; an iterable of known length ``len(names)``) with
    ``decode(item) -> (size, size, 3) uint8``, in parallel, chunk by chunk.

    Returns ``(x, ok, skipped)``: ``x`` an (N, size, size, 3) array (in RAM below
    :func:`inmemory_max_bytes`, else an :class:`ImageRows` over a store keyed by ``key``; a
    complete store with that key is reused without decoding), ``ok`` which rows decoded, and
    ``skipped`` one line per item that failed, naming it (``names[i]``) and the error.
    ``extra()``: a JSON-able dict, called once every item was read, kept in the store's manifest
    and given back as ``x.meta`` when the store is reused (e.g. labels read beside the pixels).
    """
    n = len(names)
    nbytes = n * size * size * 3
    on_disk = key is not None and nbytes > inmemory_max_bytes()
    if on_disk:
        found = _open_store(key)
        if found is not None:
            log.info("decoded images: reusing %s (%d images)", found[0].path, n)
            for s in found[2]:
                log.warning("skipping unreadable image: %s", s)
            return found
    ok = np.ones(n, bool)
    skipped = []
    workers = min(8, (os.cpu_count() or 2) * 2)
    if on_disk:
        root = store_root()
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, suffix=".npy.part")
        f = os.fdopen(fd, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (n, size, size, 3)}
        np.lib.format.write_array_header_1_0(f, header)
        # Two buffers: one chunk is written (a writer thread, its own file position) while the
        # next is decoded, so the decoders never wait on the disk.
        bufs = [np.zeros((CHUNK_ROWS, size, size, 3), np.uint8) for _ in range(2)]
        writer, pending = ThreadPoolExecutor(1), [None, None]
        x = None
        log.info("decoding %d images (%.1f GB) to %s", n, nbytes / 1e9, root)
    else:
        x = np.zeros((n, size, size, 3), np.uint8)
    try:
        it = iter(items)
        with ThreadPoolExecutor(workers) as pool, tqdm(total=n, desc=desc, unit="img", leave=False,
                                                        disable=n < 200) as bar:
            for lo in range(0, n, CHUNK_ROWS):
                hi = min(n, lo + CHUNK_ROWS)
                chunk = list(itertools.islice(it, hi - lo))
                if len(chunk) < hi - lo:
                    raise DataError(f"The data ended after {lo + len(chunk)} of the {n} images it announced "
                                    f"(last: {names[lo + len(chunk) - 1] if lo + len(chunk) else 'none'}); "
                                    "it changed while being read: load it again.")
                slot = (lo // CHUNK_ROWS) % 2
                if x is None and pending[slot] is not None:
                    pending[slot].result()  # that buffer's previous chunk is on its way to disk
                out = x[lo:hi] if x is not None else bufs[slot][:hi - lo]

                def work(i, chunk=chunk, out=out, lo=lo):
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            out[i] = decode(chunk[i])
                    except Exception as exc:  # noqa: BLE001 - any decoder failure means "unreadable"
                        out[i] = 0
                        ok[lo + i] = False
                        skipped.append(f"{names[lo + i]} ({type(exc).__name__}: {exc})")

                list(pool.map(work, range(hi - lo)))  # one chunk's futures at a time: bounded memory
                if x is None:
                    pending[slot] = writer.submit(f.write, memoryview(out).cast("B"))
                bar.update(hi - lo)
        skipped.sort()
        if x is None:
            for p in pending:  # in order: one writer thread
                if p is not None:
                    p.result()
            f.flush()
            os.fsync(f.fileno())
            f.close()
            path = store_root() / f"{key}.npy"
            os.replace(tmp, path)
            meta = {"version": STORE_VERSION, "shape": [n, size, size, 3], "resize": resize,
                    "ok": np.where(ok)[0].tolist(), "skipped": skipped, "complete": True,
                    "extra": extra() if extra else {}}
            write_file(path.with_suffix(".json"), json.dumps(meta))  # written last: the completion marker
            x = ImageRows(np.load(path, mmap_mode="r"), None, str(path))
            x.meta = meta["extra"]
    finally:
        if on_disk:
            writer.shutdown(wait=True)  # no write still running into a file about to be removed
            if not f.closed:
                f.close()
            if os.path.exists(tmp):
                os.unlink(tmp)
    for s in skipped:
        log.warning("skipping unreadable image: %s", s)
    return x, ok, skipped
