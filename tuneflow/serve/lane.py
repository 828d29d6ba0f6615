"""The low-priority lane for large images: one child process, at the lowest CPU priority, decodes and reduces them to the model's input.

A 36 Mpx PNG costs about a second of CPU to decode and reduce, most of it in the model's own
resize, which TensorFlow runs on its shared thread pool: a low-priority *thread* in the server
could not keep that work from competing with the model's inference. In a child process at nice
19, decoded by the very same functions (:func:`tuneflow.imageops.decode_pixels` then
:func:`tuneflow.imageops.resize_image`, so its pixels are the ones the server, ``Predictor`` and the
artifact's bytes signatures see), it gets only the CPU that nobody else wants: measured with
``benchmarks/bench_serve.py --only abuse``. The server's memory budget still counts those
pixels (the caller holds them in :class:`.budget.PixelBudget` while the child works).

The child (a Python running :func:`_serve_lane`) starts with the first large image (it imports
TensorFlow: a few seconds, once), reads one request at a time from its stdin and answers on its
stdout (length-prefixed pickles between this process and its own child), and ends when its stdin
closes: with the server, however the server ends. A child that dies is started again; only the
image it was working on is answered with an error (:class:`LaneDied`).

Why not ``concurrent.futures.ProcessPoolExecutor``: its spawned workers re-import the server's
``__main__`` (a user's unguarded script would start a second server), and it notices a dead
worker only later, in its own thread, so an innocent image could be blamed.
"""
from __future__ import annotations

import asyncio
import os
import pickle
import struct
import subprocess
import sys

import numpy as np

from ..imageops import decode_pixels, resize_image
from .memory import limit_arenas, trim

LARGE_PIXELS = 4_000_000  # decoded pixels from which an image goes to this lane
LANE_NICE = 19
_HEADER = struct.Struct(">Q")
_CHILD = "from tuneflow.serve.lane import _serve_lane; raise SystemExit(_serve_lane())"


def decode_reduce(data: bytes, size: int, mode: str, max_pixels: int) -> np.ndarray:
    """Encoded bytes -> the model's (size, size, 3) uint8 input (what ``Predictor.prepare`` makes of
    ``Predictor.decode``): what the child computes. DataError when the image cannot be decoded."""
    return resize_image(decode_pixels(data, max_pixels=max_pixels, size=size), size, mode)


class LaneDied(RuntimeError):
    """The lane's child process ended while it worked on an image (killed, out of memory, crashed)."""


def _send(stream, obj) -> None:
    blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(blob)) + blob)
    stream.flush()


def _receive(stream):
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError("the other end closed the pipe")
    (n,) = _HEADER.unpack(head)
    blob = stream.read(n)
    if len(blob) < n:
        raise EOFError("the other end closed the pipe mid-message")
    return pickle.loads(blob)


class LargeImageLane:
    """``await lane.run(data)`` -> (size, size, 3) uint8, decoded and reduced in the low-priority
    child, one image at a time (the others wait their turn here, so a child that dies takes only
    the image it was working on with it)."""

    def __init__(self, size: int, mode: str, max_pixels: int):
        self.size, self.mode, self.max_pixels = int(size), mode, int(max_pixels)
        self._child: subprocess.Popen | None = None
        self._turn: asyncio.Lock | None = None
        self.started = 0

    def _ensure_child(self) -> subprocess.Popen:
        if self._child is not None and self._child.poll() is None:
            return self._child
        if self._child is not None:  # it died while idle: the image goes to a new one
            self._reap()
        # oneDNN keeps ~0.5 GB of buffers per 36 Mpx image after it (measured): the child only
        # resizes, which oneDNN has no kernels for (same pixels: tests/test_serve_lane.py), so it is off
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
               "TF_ENABLE_ONEDNN_OPTS": "0"}
        self._child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, env=env)
        self.started += 1
        return self._child

    def _exchange(self, data: bytes) -> np.ndarray:
        for attempt in (0, 1):
            child = self._ensure_child()
            try:
                _send(child.stdin, (data, self.size, self.mode, self.max_pixels))
            except (BrokenPipeError, OSError):
                # it had died before it read this image (killed while idle, and not yet reaped):
                # the image goes to a new child
                self._reap(kill=True)
                continue
            try:
                status, value = _receive(child.stdout)
            except (EOFError, OSError, pickle.UnpicklingError) as exc:
                self._reap(kill=True)
                raise LaneDied("the process decoding large images ended while decoding this one") from exc
            if status == "error":
                raise value  # the decoder's own error (DataError naming the problem)
            return value
        raise LaneDied("the process decoding large images could not be started")

    async def run(self, data: bytes) -> np.ndarray:
        if self._turn is None:
            self._turn = asyncio.Lock()
        async with self._turn:  # one image at a time; the child is started in the executor's thread
            return await asyncio.get_running_loop().run_in_executor(None, self._exchange, data)

    @property
    def restarts(self) -> int:
        return max(self.started - 1, 0)

    def pids(self) -> list[int]:
        """The child's process id while it runs (for memory checks and tests)."""
        child = self._child
        return [child.pid] if child is not None and child.poll() is None else []

    def _reap(self, kill: bool = False) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        if kill:
            child.kill()
        for stream in (child.stdin, child.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            child.wait(5)  # stdin closed: it ends after the image it is on, if any
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def close(self) -> None:
        self._reap()


def _serve_lane() -> int:
    """The child: lowest priority, then one image at a time from stdin until stdin closes."""
    try:
        os.nice(LANE_NICE - os.nice(0))
    except OSError:  # not permitted: normal priority, still out of the server's thread pool
        pass
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server drains
    limit_arenas()  # TensorFlow's threads would each grow an arena of their own, image after image
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but answers on the answer pipe
    while True:
        try:
            data, size, mode, max_pixels = _receive(requests)
        except EOFError:
            return 0
        try:
            answer = ("ok", decode_reduce(data, size, mode, max_pixels))
        except Exception as exc:  # noqa: BLE001 - sent back to the server, which answers the request
            try:
                pickle.loads(pickle.dumps(exc))
            except Exception:  # noqa: BLE001 - an exception that does not survive the pipe: its words do
                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
            answer = ("error", exc)
        del data
        try:
            _send(answers, answer)
        except BrokenPipeError:
            return 0
        del answer
        trim()  # hand the image's pages back before the next one

