"""The FastAPI application: routes for embed, classify, search, health, info and metrics over one micro-batching worker; the page at ``/`` (:mod:`.page`), explanations and thumbnails (:mod:`.explain`).

Each POST is read and checked, decoded and resized in a thread of its own (:mod:`.inputs`), then
its float32 batch joins the single inference worker's queue (:mod:`.batcher`); the route awaits
its rows and shapes the JSON answer. Errors are JSON ``{"error", "code", ...}`` with a 4xx status.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

import numpy as np
import orjson
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from .batcher import MicroBatcher
from .card import model_card
from .config import ApiError, ServeConfig
from .explain import LazyExplainer, explain_router
from .inputs import prepare_request, read_images
from .memory import Trimmer
from .metrics import Metrics, MetricsMiddleware
from .page import page_router

log = logging.getLogger("tuneflow.serve")
ENDPOINTS = ("/v1/embed", "/v1/classify", "/v1/search", "/v1/explain", "/healthz", "/readyz", "/v1/info", "/metrics")
LAYERS = ("pooled", "penultimate")


class BodyLimit:
    """Refuses a request body over ``max_bytes`` with 413: at once from Content-Length, or while
    it streams in (chunked uploads), before it is held in memory whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    def _error(self):
        return ApiError(413, "request_too_large", f"the request body is over the limit max_request_bytes "
                        f"= {self.max_bytes} bytes; send fewer or smaller images per request.",
                        limit="max_request_bytes", value=self.max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse(self._error().body(), status_code=413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._error()
            return message
        await self.app(scope, limited, send)


def _json(body: dict) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def _top(probs: np.ndarray, classes: list[str], top: int) -> list[dict]:
    """Probabilities [n, K] -> the predictions' JSON, the same shape as ``Predictor.predict``."""
    out = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:top]
        best = int(order[0])
        out.append({"class": classes[best], "probability": float(row[best]),
                    "top": [[classes[int(i)], float(row[i])] for i in order]})
    return out


def _no_explainer():
    raise RuntimeError("the server was started without the run's Keras model")


def create_app(predictor, cfg: ServeConfig | None = None, index=None, on_stop=None, run_dir=None,
               explainer=None):
    """The service for a loaded predictor (and optionally a loaded :class:`tuneflow.index.Index`).
    The inference worker starts and stops with the app's lifespan; ``app.state.ready`` says when;
    ``on_stop(app)`` is called once the server has drained and the worker has finished.
    ``run_dir``: the run folder, for the model card in ``/v1/info``; ``explainer``: a callable
    returning the :class:`~tuneflow.export.explain.Explainer` of the served model (``/v1/explain``)."""
    cfg = cfg or ServeConfig()
    card = model_card(run_dir) if run_dir is not None else None
    explainer = LazyExplainer(explainer if explainer is not None else _no_explainer)
    metrics = Metrics(ENDPOINTS)
    classes = list(predictor.classes)

    def embed_fn(x, layer, normalize):
        return predictor.embed_prepared(x, layer=layer, normalize=normalize)

    def classify_fn(x):
        return predictor.classify_prepared(x)

    def on_batch(n):
        metrics.batch_size.observe(n)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.batcher = MicroBatcher({"embed": embed_fn, "classify": classify_fn},
                                         cfg.max_batch, cfg.max_wait_ms, on_batch,
                                         pad_batches=cfg.pad_batches, on_idle=Trimmer().maybe).start()
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            await run_in_threadpool(app.state.batcher.stop, cfg.drain_timeout_s)
            if on_stop is not None:
                on_stop(app)

    app = FastAPI(title="tuneflow", version=str(predictor.info.get("tuneflow_version", "")), lifespan=lifespan,
                  docs_url="/docs", redoc_url=None)
    app.state.ready = False
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"bad parameter: {problems}", "code": "bad_parameter"}, status_code=422)

    @app.exception_handler(Exception)
    async def internal(request, exc: Exception):
        log.exception("request %s failed", request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}", "code": "internal"},
                            status_code=500)

    async def infer(request: Request, key: tuple) -> np.ndarray:
        blobs = await read_images(request, cfg)
        batch = await run_in_threadpool(prepare_request, predictor, blobs, cfg)
        batcher = request.app.state.batcher
        try:
            future = batcher.submit(key, batch)
        except RuntimeError as exc:
            raise ApiError(503, "shutting_down", "the server is shutting down; retry on another replica.") from exc
        y = await asyncio.wrap_future(future)
        metrics.images.labels(key[0]).inc(len(batch))
        return y

    @app.post("/v1/embed")
    async def embed(request: Request, layer: str = Query("pooled"), normalize: bool = Query(True)):
        if layer not in LAYERS:
            raise ApiError(422, "bad_parameter", f"layer={layer!r}; choose one of {', '.join(LAYERS)}.")
        y = await infer(request, ("embed", layer, normalize))
        # orjson writes the float32 array directly (shortest exact float32 text, ~25x faster than
        # json.dumps of .tolist() and half the bytes); FastAPI's own encoder is bypassed
        return _json({"embeddings": np.ascontiguousarray(y, np.float32), "dim": int(y.shape[1])})

    @app.post("/v1/classify")
    async def classify(request: Request, top: int = Query(cfg.top, ge=1)):
        y = await infer(request, ("classify",))
        return _json({"predictions": _top(y, classes, min(top, len(classes)))})

    @app.post("/v1/search")
    async def search(request: Request, k: int = Query(5, ge=1)):
        if index is None:
            raise ApiError(404, "no_index", "this server has no index; start it with "
                           "`tuneflow serve RUN --index INDEX_DIR` (build one with `tuneflow index`).")
        if k > cfg.max_k:
            raise ApiError(422, "bad_parameter", f"k={k} is over the limit max_k = {cfg.max_k}.",
                           limit="max_k", value=cfg.max_k)
        y = await infer(request, ("embed", index.meta["layer"], bool(index.meta["normalize"])))
        return {"results": await run_in_threadpool(index.search, y, k)}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request):
        b = getattr(request.app.state, "batcher", None)
        if request.app.state.ready and b is not None and b.running:
            return {"status": "ready"}
        return JSONResponse({"status": "not ready", "code": "not_ready"}, status_code=503)

    @app.get("/v1/info")
    async def info():
        out = dict(predictor.info)
        out["serving"] = cfg.as_dict()
        out["index"] = None if index is None else {**index.meta, "count": len(index)}
        out["card"] = card
        return out

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(explain_router(predictor, cfg, explainer, index))
    app.include_router(page_router())
    app.add_middleware(BodyLimit, max_bytes=cfg.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
