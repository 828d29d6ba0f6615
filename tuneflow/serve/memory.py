"""A long-running server's memory: what a decoded pixel costs and the default budget of them, fewer glibc malloc arenas, freed memory handed back.

A server that decodes requests in a pool of threads and runs TensorFlow in others gets a glibc
malloc arena per thread (up to 8 per core); images of every size freed in one arena are reused
only by that arena's threads, so the resident size creeps up request after request even though
nothing leaks (``benchmarks/bench_serve.py --only rss``: +140 MB over 3,000 requests with the
defaults). Two standard remedies, both glibc calls through ctypes (on another C library they do
nothing): ``mallopt(M_ARENA_MAX, 2)`` at start-up (what ``MALLOC_ARENA_MAX=2`` does, set before
the worker threads exist), and ``malloc_trim(0)`` from time to time, which returns free pages of
every arena to the system.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time

log = logging.getLogger("tuneflow.serve")

# Bytes of memory one decoded pixel costs at its peak: PIL's decode, the RGB conversion, numpy's
# copy, the resize's float32 copy. Measured as the peak-RSS rise of decode_pixels + resize_image
# on a 3000 x 3000 PNG, divided by its pixels: grey, palette, RGBA 24-25, RGB 20, 16-bit grey 35.
BYTES_PER_PIXEL = 40
MEMORY_SHARE = 0.08  # the default budget: this share of the machine's memory (24 GB -> 2 GB), at BYTES_PER_PIXEL


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup's limit when it is lower (a container)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_inflight_pixels(max_pixels: int) -> int:
    """``--max-inflight-pixels`` when not given: MEMORY_SHARE of the machine's memory at
    BYTES_PER_PIXEL (24 GiB -> 51 Mpx, ~2 GB), and never less than one image of ``max_pixels``."""
    return max(int(max_pixels), int(machine_memory_bytes() * MEMORY_SHARE / BYTES_PER_PIXEL))


M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
ARENAS = 2


def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas for threads created from now on (unless the user set
    ``MALLOC_ARENA_MAX`` themselves). True if the setting took."""
    if _LIBC is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(_LIBC.mallopt(M_ARENA_MAX, int(arenas)))


def trim() -> bool:
    """Return free heap pages of every arena to the system; True if some memory was released."""
    return bool(_LIBC.malloc_trim(0)) if _LIBC is not None else False


class Trimmer:
    """Calls :func:`trim` at most every ``every_s`` seconds, when told the server is between
    batches (``maybe()`` from the inference worker after a batch, when its queue is empty)."""

    def __init__(self, every_s: float = 2.0):
        self.every_s = every_s
        self._last = time.monotonic()
        self.trims = 0

    def maybe(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            trim()
            self.trims += 1
