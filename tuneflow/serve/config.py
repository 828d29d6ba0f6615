"""The service's settings (batching, input and memory limits, time-outs) and the one error shape every failed request gets."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..errors import ServeError
from .memory import default_inflight_pixels


@dataclass(frozen=True)
class ServeConfig:
    """Batching and limits of ``tuneflow serve``; each limit is named in the error that enforces it."""
    max_batch: int = 64             # images per model call; larger batches amortise the call, cost latency
    max_wait_ms: float = 5.0        # how long the worker waits for more images after the first arrives
    pad_batches: bool = True        # model calls padded to a few batch sizes (see .batcher)
    max_request_bytes: int = 32 * 2**20   # 32 MiB of request body (multipart or JSON with base64)
    max_images: int = 64            # images per request
    max_pixels: int = 40_000_000    # width x height of one image: a decompression bomb stops here
    max_request_pixels: int = 200_000_000  # decoded pixels of all a request's images together
    max_inflight_pixels: int | None = None  # decoded pixels held at once by the whole server (see
    #                                  .budget); None: 8% of the machine's memory at 40 B/px
    max_queue: int = 256            # images waiting for room in that budget; beyond: 503 + Retry-After
    limit_concurrency: int = 128    # open connections + requests (uvicorn's); beyond: 503 at once
    header_timeout_s: float = 10.0  # a connection must send its request's headers within this
    body_timeout_s: float = 60.0    # ... and the whole body within this, from the first byte of it
    keep_alive_s: float = 5.0       # an idle keep-alive connection is closed after this
    docs: bool = False              # /docs and /openapi.json (off: they describe the service to anyone)
    top: int = 5                    # classes listed in each prediction's "top"
    max_k: int = 100                # neighbours per query for /v1/search
    drain_timeout_s: float = 30.0   # after SIGTERM, how long accepted requests may take to be answered

    def as_dict(self) -> dict:
        return asdict(self)

    def checked(self) -> "ServeConfig":
        """The settings with the budget resolved; ServeError when one contradicts another."""
        budget = self.max_inflight_pixels or default_inflight_pixels(self.max_pixels)
        for name in ("max_batch", "max_request_bytes", "max_images", "max_pixels", "max_request_pixels",
                     "max_queue", "limit_concurrency"):
            if getattr(self, name) < 1:
                raise ServeError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1.")
        if budget < self.max_pixels:
            raise ServeError(f"--max-inflight-pixels {budget} is below --max-pixels {self.max_pixels}: an image "
                             "the server accepts would never fit; raise the first or lower the second.")
        return replace(self, max_inflight_pixels=int(budget))


class ApiError(Exception):
    """A request the service refuses: HTTP status, a stable machine code, a message for people, and,
    for a limit, its name and value. Rendered as ``{"error": message, "code": code, ...}``."""

    def __init__(self, status: int, code: str, message: str, *, limit: str | None = None,
                 value=None, image: int | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.limit, self.value, self.image, self.headers = limit, value, image, headers

    def body(self) -> dict:
        out = {"error": self.message, "code": self.code}
        if self.limit is not None:
            out.update(limit=self.limit, value=self.value)
        if self.image is not None:
            out["image"] = self.image
        return out
