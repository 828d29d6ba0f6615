"""The server-wide budget of decoded pixels in flight: images wait for room in a bounded queue, and past it are refused with 503.

Memory of a request is its images' decoded pixels (a 6000 x 6000 PNG is 108 MB as RGB, and the
model's resize works on it in float32); the body size says nothing about it (that PNG compresses
to 35 kB). So each image, before it is decoded, takes its decoded pixel count (known from its
header: :func:`tuneflow.imageops.draft_size`) from one budget shared by every request, and gives
it back once it has been reduced to the model's input. An image that fits goes at once, even past
larger ones waiting (a photo does not queue behind a 36 Mpx PNG: measured with
``benchmarks/bench_serve.py --only abuse``, strict arrival order cut well-behaved throughput
to 0.03x under attack); one that does not fit waits, and waiters are let in, in arrival order,
as room frees. When ``max_queue`` images already wait, the request is answered 503 with a
``Retry-After`` at once, never piled up. One image is held at a time per request, so requests
cannot deadlock each other.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from .config import ApiError

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
        if not self._fits(pixels):
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
        for waiter in list(self._waiters):  # in arrival order, each one that fits now
            pixels, future = waiter
            if self._fits(pixels):
                self._waiters.remove(waiter)
                self.in_use += pixels
                future.set_result(None)
