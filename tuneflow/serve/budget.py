"""The server-wide budget of decoded pixels in flight: images wait for room in a bounded queue, and past it are refused with 503.

Memory of a request is its images' decoded pixels (a 6000 x 6000 PNG is 108 MB as RGB, and the
model's resize works on it in float32); the body size says nothing about it (that PNG compresses
to 35 kB). So each image, before it is decoded, takes its decoded pixel count (known from its
header: :func:`tuneflow.imageops.draft_size`) from one budget shared by every request, and gives
it back once it has been reduced to the model's input. An image that finds no room waits, in
arrival order; when ``max_queue`` images already wait, the request is answered 503 with a
``Retry-After`` at once, never piled up. One image is held at a time per request, so requests
cannot deadlock each other.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque

from .config import ApiError

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


class PixelBudget:
    """``async with budget.hold(pixels):`` -- room for that many decoded pixels, waiting in a
    queue of at most ``max_queue`` images; 503 ``server_busy`` beyond it. One event loop only."""

    def __init__(self, max_pixels: int, max_queue: int, retry_after_s: int = 1):
        self.capacity, self.max_queue, self.retry_after_s = int(max_pixels), int(max_queue), int(retry_after_s)
        self.in_use = 0
        self.peak = 0
        self.refused = 0
        self._waiters: deque = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _fits(self, pixels: int) -> bool:
        return self.in_use + pixels <= self.capacity

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int):
        pixels = min(int(pixels), self.capacity)  # the per-image limit keeps it below; never stuck
        if self._waiters or not self._fits(pixels):
            if len(self._waiters) >= self.max_queue:
                self.refused += 1
                raise ApiError(503, "server_busy", f"the server is at its memory budget (max_inflight_pixels = "
                               f"{self.capacity} decoded pixels in flight, {self.waiting} images queued, "
                               f"max_queue = {self.max_queue}); retry after {self.retry_after_s} s.",
                               limit="max_inflight_pixels", value=self.capacity,
                               headers={"Retry-After": str(self.retry_after_s)})
            waiter = [pixels, asyncio.get_running_loop().create_future()]
            self._waiters.append(waiter)
            try:
                await waiter[1]  # _wake() took our pixels for us
            except BaseException:
                if waiter[1].done() and not waiter[1].cancelled():
                    self._release(pixels)  # woken and cancelled at once: give the room back
                else:
                    self._waiters.remove(waiter)
                    self._wake()
                raise
        else:
            self.in_use += pixels
        self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            self._release(pixels)

    def _release(self, pixels: int) -> None:
        self.in_use -= pixels
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):  # first come, first served
            pixels, future = self._waiters.popleft()
            self.in_use += pixels
            future.set_result(None)
