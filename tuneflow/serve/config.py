"""The service's settings (batching and input limits) and the one error shape every failed request gets."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ServeConfig:
    """Batching and limits of ``tuneflow serve``; each limit is named in the error that enforces it."""
    max_batch: int = 64             # images per model call; larger batches amortise the call, cost latency
    max_wait_ms: float = 5.0        # how long the worker waits for more images after the first arrives
    pad_batches: bool = True        # model calls padded to a few batch sizes (see .batcher)
    max_request_bytes: int = 32 * 2**20   # 32 MiB of request body (multipart or JSON with base64)
    max_images: int = 64            # images per request
    max_pixels: int = 40_000_000    # width x height of one image: a decompression bomb stops here
    top: int = 5                    # classes listed in each prediction's "top"
    max_k: int = 100                # neighbours per query for /v1/search
    drain_timeout_s: float = 30.0   # after SIGTERM, how long accepted requests may take to be answered

    def as_dict(self) -> dict:
        return asdict(self)


class ApiError(Exception):
    """A request the service refuses: HTTP status, a stable machine code, a message for people, and,
    for a limit, its name and value. Rendered as ``{"error": message, "code": code, ...}``."""

    def __init__(self, status: int, code: str, message: str, *, limit: str | None = None,
                 value=None, image: int | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.limit, self.value, self.image = limit, value, image

    def body(self) -> dict:
        out = {"error": self.message, "code": self.code}
        if self.limit is not None:
            out.update(limit=self.limit, value=self.value)
        if self.image is not None:
            out["image"] = self.image
        return out
