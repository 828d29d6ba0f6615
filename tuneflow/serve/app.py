"""The FastAPI application: routes for embed, classify, search, health, info and metrics over one micro-batching worker.

Each POST is read (within a size limit and a time limit), its images' headers checked, then each
image decoded and reduced in a worker thread while it holds its pixels of the server's memory
budget (:mod:`.inputs`, :mod:`.budget`); the float32 batch joins the single inference worker's
queue (:mod:`.batcher`); the route awaits its rows and shapes the JSON answer. Errors are JSON
``{"error", "code", ...}`` with a 4xx status; a bug is a 500 ``{"error": "internal error", "code":
"internal", "request_id"}`` whose traceback is in the server's log under that id.

Routes come in routers: :data:`health` (``/healthz``, ``/readyz``, always open) and the API
(:func:`api_router`: every other route, behind :func:`.auth.require_api_key`); :func:`create_app`
takes more routers through ``routers=`` and puts them behind the key too.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from .auth import require_api_key
from .batcher import MicroBatcher
from .budget import PixelBudget
from .card import model_card
from .config import ApiError, ServeConfig
from .explain import LazyExplainer, explain_router
from .inputs import prepare_request, read_images
from .lane import LANE_NICE, LARGE_PIXELS, LargeImageLane
from .memory import BYTES_PER_PIXEL, Trimmer
from .metrics import Metrics, MetricsMiddleware
from .page import page_router

log = logging.getLogger("tuneflow.serve")
ENDPOINTS = ("/v1/embed", "/v1/classify", "/v1/search", "/v1/explain", "/healthz", "/readyz", "/v1/info", "/metrics")
LAYERS = ("pooled", "penultimate")
PATH_KEYS = ("source", "run", "path", "run_dir", "model_dir")  # left out of /v1/info


class BodyLimit:
    """Refuses a request body over ``max_bytes`` with 413: at once from Content-Length, or while
    it streams in (chunked uploads), before it is held in memory whole; and a body that takes
    longer than ``timeout_s`` to arrive (a client trickling bytes) with 408, freeing its slot."""

    def __init__(self, app, max_bytes: int, timeout_s: float = 60.0):
        self.app, self.max_bytes, self.timeout_s = app, int(max_bytes), float(timeout_s)

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
        seen, complete = 0, False
        deadline = time.monotonic() + self.timeout_s

        async def limited():
            nonlocal seen, complete
            if complete:  # the body is in: what follows (a disconnect) is not timed
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise ApiError(408, "request_timeout", f"the request body did not arrive within the limit "
                               f"body_timeout_s = {self.timeout_s:g} s; send it faster or in smaller requests.",
                               limit="body_timeout_s", value=self.timeout_s) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
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


def _private(info: dict) -> dict:
    """Info without filesystem paths: where the run lies on disk is none of a client's business."""
    return {k: v for k, v in info.items() if k not in PATH_KEYS}


health = APIRouter()


@health.get("/healthz")
async def healthz():
    return {"status": "ok"}


@health.get("/readyz")
async def readyz(request: Request):
    b = getattr(request.app.state, "batcher", None)
    if request.app.state.ready and b is not None and b.running:
        return {"status": "ready"}
    return JSONResponse({"status": "not ready", "code": "not_ready"}, status_code=503)


def api_router(predictor, cfg: ServeConfig, index, metrics: Metrics, budget: PixelBudget,
               lane=None, card: dict | None = None) -> APIRouter:
    """embed, classify, search, info and metrics (and the docs with ``cfg.docs``), behind the API key."""
    api = APIRouter(dependencies=[Depends(require_api_key)])
    classes = list(predictor.classes)

    async def infer(request: Request, key: tuple) -> np.ndarray:
        blobs = await read_images(request, cfg)
        batch = await prepare_request(predictor, blobs, cfg, budget, lane)
        del blobs  # the encoded bytes are not kept while the batch waits for the model
        batcher = request.app.state.batcher
        try:
            future = batcher.submit(key, batch)
        except RuntimeError as exc:
            raise ApiError(503, "shutting_down", "the server is shutting down; retry on another replica.",
                           headers={"Retry-After": "5"}) from exc
        y = await asyncio.wrap_future(future)
        metrics.images.labels(key[0]).inc(len(batch))
        return y

    @api.post("/v1/embed")
    async def embed(request: Request, layer: str = Query("pooled"), normalize: bool = Query(True)):
        if layer not in LAYERS:
            raise ApiError(422, "bad_parameter", f"layer={layer!r}; choose one of {', '.join(LAYERS)}.")
        y = await infer(request, ("embed", layer, normalize))
        # orjson writes the float32 array directly (shortest exact float32 text, ~25x faster than
        # json.dumps of .tolist() and half the bytes); FastAPI's own encoder is bypassed
        return _json({"embeddings": np.ascontiguousarray(y, np.float32), "dim": int(y.shape[1])})

    @api.post("/v1/classify")
    async def classify(request: Request, top: int = Query(cfg.top, ge=1)):
        y = await infer(request, ("classify",))
        return _json({"predictions": _top(y, classes, min(top, len(classes)))})

    @api.post("/v1/search")
    async def search(request: Request, k: int = Query(5, ge=1)):
        if index is None:
            raise ApiError(404, "no_index", "this server has no index; start it with "
                           "`tuneflow serve RUN --index INDEX_DIR` (build one with `tuneflow index`).")
        if k > cfg.max_k:
            raise ApiError(422, "bad_parameter", f"k={k} is over the limit max_k = {cfg.max_k}.",
                           limit="max_k", value=cfg.max_k)
        y = await infer(request, ("embed", index.meta["layer"], bool(index.meta["normalize"])))
        return {"results": await run_in_threadpool(index.search, y, k)}

    @api.get("/v1/info")
    async def info():
        out = _private(predictor.info)
        out["serving"] = {**cfg.as_dict(), "bytes_per_pixel": BYTES_PER_PIXEL,
                          "inflight_budget_bytes": cfg.max_inflight_pixels * BYTES_PER_PIXEL,
                          # images from this many decoded pixels go to the low-priority child process
                          "large_image_pixels": LARGE_PIXELS, "large_image_nice": LANE_NICE}
        out["index"] = None if index is None else _private({**index.meta, "count": len(index)})
        out["card"] = card  # what the run measured, for the page's model card (None: no run folder)
        return out

    @api.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if cfg.docs:
        @api.get("/openapi.json", include_in_schema=False)
        async def openapi(request: Request):
            return JSONResponse(request.app.openapi())

        @api.get("/docs", include_in_schema=False)
        async def docs():
            return get_swagger_ui_html(openapi_url="/openapi.json", title="tuneflow")
    return api


def _no_explainer():
    raise RuntimeError("the server was started without the run's Keras model")


def create_app(predictor, cfg: ServeConfig | None = None, index=None, on_stop=None, api_key: str | None = None,
               routers: tuple = (), run_dir=None, explainer=None):
    """The service for a loaded predictor (and optionally a loaded :class:`tuneflow.index.Index`).
    The inference worker starts and stops with the app's lifespan; ``app.state.ready`` says when;
    ``on_stop(app)`` is called once the server has drained and the worker has finished. With
    ``api_key``, every route but the health checks needs ``Authorization: Bearer KEY``; more
    ``routers`` (FastAPI ``APIRouter``s) are mounted behind the same key. ``run_dir``: the run
    folder, for the model card in ``/v1/info``; ``explainer``: a callable returning the
    :class:`~tuneflow.export.explain.Explainer` of the served model (``/v1/explain``). The page at
    ``/`` (:mod:`.page`) is open: it asks for the key itself when the service needs one."""
    cfg = (cfg or ServeConfig()).checked()
    # PIL's own bomb check (a warning past this many pixels, an error past twice) agrees with ours
    Image.MAX_IMAGE_PIXELS = cfg.max_pixels
    metrics = Metrics(ENDPOINTS)
    budget = PixelBudget(cfg.max_inflight_pixels, cfg.max_queue)
    lane = LargeImageLane(predictor.input_size, predictor.resize, cfg.max_pixels)

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
            lane.close()
            if on_stop is not None:
                on_stop(app)

    # the docs are routes of the API router (behind the key), not FastAPI's open ones
    app = FastAPI(title="tuneflow", version=str(predictor.info.get("tuneflow_version", "")), lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ready = False
    app.state.metrics = metrics
    app.state.budget = budget
    app.state.lane = lane
    app.state.api_key = api_key
    app.state.config = cfg

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"bad parameter: {problems}", "code": "bad_parameter"}, status_code=422)

    @app.exception_handler(Exception)
    async def internal(request, exc: Exception):
        request_id = uuid.uuid4().hex[:16]
        log.error("request %s %s failed, request_id %s", request.method, request.url.path, request_id,
                  exc_info=exc)
        return JSONResponse({"error": "internal error", "code": "internal", "request_id": request_id},
                            status_code=500)

    app.include_router(health)
    card = model_card(run_dir) if run_dir is not None else None
    app.include_router(api_router(predictor, cfg, index, metrics, budget, lane, card))
    explain = explain_router(predictor, cfg, LazyExplainer(explainer or _no_explainer), index, budget, lane)
    app.include_router(page_router())
    for router in (explain, *routers):
        app.include_router(router, dependencies=[Depends(require_api_key)])
    app.add_middleware(BodyLimit, max_bytes=cfg.max_request_bytes, timeout_s=cfg.body_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
