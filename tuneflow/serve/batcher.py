"""Micro-batching: one queue and ONE inference thread that joins concurrent requests' images into model calls.

Requests arrive already decoded and resized (float32 [n, S, S, 3]); the worker takes the first
waiting request, then gathers more of the same kind (embed with given settings, classify) until
``max_batch`` images or ``max_wait_ms`` have passed, runs one call of the predictor's
prepared-batch function, and hands each request its own rows. One thread means one model call
at a time: TensorFlow already spreads a call over every core, and the model's memory is paid once.

Each call is padded up to one of a few batch sizes (powers of two and the sizes halfway between
them, up to ``max_batch``), as TF Serving's ``allowed_batch_sizes`` does: oneDNN keeps compiled primitives and
scratch buffers per input shape, so a server that called the model with every size from 1 to 64
kept ~64 sets of them (the RSS grew for thousands of requests); with buckets it keeps 12.
The padding rows are zeros and their outputs are dropped (inference treats rows independently);
before padding, the worker waits up to FILL_WAIT x ``max_wait_ms`` more for real images to
take those rows.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

_STOP = object()
FILL_WAIT = 2.0  # after max_wait, up to this many max_waits more to fill a padded call with real images


def bucket_sizes(max_batch: int) -> list[int]:
    """The batch sizes the model is called with: powers of two and the sizes halfway between
    them (1, 2, 3, 4, 6, 8, 12, 16, 24, ...) below ``max_batch``, then ``max_batch``. At most a
    third of a call is padding; 64 gives 12 shapes."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        if b >= 2 and b + b // 2 < max_batch:
            sizes.append(b + b // 2)
        b *= 2
    return sizes + [max_batch]


def padded_call(fn, x: np.ndarray, args: tuple, buckets: list[int]) -> np.ndarray:
    """``fn(x, *args)`` with x's rows padded by zeros up to the smallest bucket that holds them."""
    n = len(x)
    size = next((b for b in buckets if b >= n), n)
    if size > n:
        x = np.concatenate([x, np.zeros((size - n,) + x.shape[1:], x.dtype)])
    return np.asarray(fn(x, *args))[:n]


@dataclass
class _Item:
    key: tuple
    batch: np.ndarray
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """``submit(key, batch)`` -> Future of that batch's output rows. ``functions[key[0]](x, *key[1:])``
    computes a joined batch; ``on_batch(n_images)`` is told each call's size (for metrics)."""

    def __init__(self, functions: dict, max_batch: int = 64, max_wait_ms: float = 5.0, on_batch=None,
                 pad_batches: bool = True, on_idle=None):
        self.functions = functions
        self.max_batch = max(1, int(max_batch))
        self.buckets = bucket_sizes(self.max_batch) if pad_batches else []
        self.max_wait_s = max(0.0, float(max_wait_ms)) / 1000.0
        self.on_batch = on_batch
        self.on_idle = on_idle  # called after a batch when no request is waiting (memory upkeep)
        self._queue: queue.Queue = queue.Queue()
        self._held: deque = deque()  # taken from the queue but of another kind, or not fitting: next
        self._thread = threading.Thread(target=self._loop, name="tuneflow-inference", daemon=True)
        self._lock = threading.Lock()
        self._stopping = False
        self.batches = 0

    def start(self) -> "MicroBatcher":
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, key: tuple, batch: np.ndarray) -> Future:
        item = _Item(tuple(key), batch)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the inference worker is shutting down")
            self._queue.put(item)
        return item.future

    def stop(self, timeout: float | None = None) -> None:
        """Finish every submitted batch, then end the worker (what SIGTERM's drain ends with)."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _next(self, timeout: float | None):
        if self._held:
            return self._held.popleft()
        try:
            return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _gather(self, first: _Item) -> list[_Item]:
        items, n = [first], len(first.batch)
        deadline = time.monotonic() + self.max_wait_s
        skipped: list = []
        held, self._held = self._held, deque()
        target, filling = self.max_batch, False
        while n < target:
            if held:
                item = held.popleft()
            else:
                item = self._next(deadline - time.monotonic())
                if item is None:
                    if self.buckets and not filling and n not in self.buckets:
                        # the call will be padded up to the next bucket: wait a little longer for
                        # real images to take those rows (throughput, not zeros)
                        target = next(b for b in self.buckets if b >= n)
                        deadline = time.monotonic() + FILL_WAIT * self.max_wait_s
                        filling = True
                        continue
                    break
            if item is _STOP:
                skipped.append(item)
                break
            if item.key != first.key or n + len(item.batch) > self.max_batch:
                skipped.append(item)
                continue
            items.append(item)
            n += len(item.batch)
        self._held = deque(skipped + list(held) + list(self._held))
        return items

    def _loop(self) -> None:
        while True:
            first = self._next(None)
            if first is _STOP:
                if self._held:  # work taken from the queue before the stop: do it first
                    self._held.append(_STOP)
                    continue
                return
            items = self._gather(first)
            self._run(items)
            if self.on_idle is not None and self._queue.empty() and not self._held:
                self.on_idle()

    def _run(self, items: list[_Item]) -> None:
        fn = self.functions[items[0].key[0]]
        args = items[0].key[1:]
        try:
            x = items[0].batch if len(items) == 1 else np.concatenate([it.batch for it in items])
            # a single request larger than max_batch runs in max_batch slices
            outs = [padded_call(fn, x[i:i + self.max_batch], args, self.buckets)
                    for i in range(0, len(x), self.max_batch)]
            y = outs[0] if len(outs) == 1 else np.concatenate(outs)
        except BaseException as exc:  # noqa: BLE001 - a failed model call fails its requests, not the worker
            for it in items:
                it.future.set_exception(exc)
            return
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(len(x))
        start = 0
        for it in items:
            it.future.set_result(y[start:start + len(it.batch)])
            start += len(it.batch)
