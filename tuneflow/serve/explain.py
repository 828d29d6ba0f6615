"""The service's routes for explanations and gallery thumbnails: ``POST /v1/explain`` and ``GET /v1/index/items/{id}/thumbnail``.

``/v1/explain`` takes images as ``/v1/classify`` does (multipart field ``files`` or JSON base64) and
answers, per image, the Grad-CAM of a class (the predicted one, or ``?class=NAME``): the raw grid
(the backbone's last block, values 0..1), the heatmap as an RGBA PNG the size of the model's input,
the model's view of the image with the heatmap over it (PNG), and the prediction. The gradient pass
runs outside the micro-batcher, one request at a time (it holds the feature maps and their
gradients: ~2x a forward pass's memory).

Thumbnails are the small JPEGs ``tuneflow index`` stored in the index folder, named by item id
(the ``id`` of a ``/v1/search`` result); no route reads a path a client names.
"""
from __future__ import annotations

import threading

import numpy as np
from fastapi import APIRouter, Path as PathParam, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from ..export.explain import heatmap_rgba, overlay, png_base64
from .config import ApiError, ServeConfig
from .inputs import prepare_request, read_images


class LazyExplainer:
    """The run's :class:`~tuneflow.export.explain.Explainer`, loaded at the first request (the Keras
    model beside the served SavedModel costs its weights' memory again; a service nobody asks
    for explanations does not pay it). ``load()`` is called once, under a lock."""

    def __init__(self, load):
        self._load, self._lock, self._explainer, self._error = load, threading.Lock(), None, None

    def __call__(self):
        with self._lock:
            if self._explainer is None and self._error is None:
                try:
                    self._explainer = self._load()
                except Exception as exc:  # noqa: BLE001 - reported on each request, the service stays up
                    self._error = f"{type(exc).__name__}: {exc}"
            if self._error is not None:
                raise ApiError(503, "explain_unavailable", f"explanations are unavailable for this model: "
                               f"{self._error}")
            return self._explainer


def explain_router(predictor, cfg: ServeConfig, explainer: LazyExplainer, index=None, budget=None,
                   lane=None) -> APIRouter:
    """The routes (mounted behind the API key, as the other ``/v1/*`` routes); images are read and
    decoded as for ``/v1/classify``, within the server's pixel ``budget``."""
    router = APIRouter()
    classes = list(predictor.classes)
    lock = threading.Lock()  # one gradient pass at a time: bounded memory, the batcher keeps the cores

    def run(batch, target):
        ex = explainer()
        with lock:
            e = ex.explain(batch, None if target is None else [target] * len(batch))
        out = []
        for image, grid, cid, probs in zip(batch, e.grids, e.classes, e.probabilities):
            order = np.argsort(-probs, kind="stable")[:min(cfg.top, len(classes))]
            best = int(order[0])
            out.append({"class": classes[int(cid)], "probability": float(probs[int(cid)]),
                        "grid": np.round(grid, 6).tolist(), "grid_shape": list(grid.shape),
                        "heatmap_png": png_base64(heatmap_rgba(grid, image.shape[0])),
                        "overlay_png": png_base64(overlay(image, grid)),
                        "prediction": {"class": classes[best], "probability": float(probs[best]),
                                       "top": [[classes[int(i)], float(probs[i])] for i in order]}})
        return out

    @router.post("/v1/explain")
    async def explain(request: Request, target: str | None = Query(None, alias="class")):
        if target is not None and target not in classes:
            raise ApiError(422, "bad_parameter", f"class={target!r} is not one of the model's classes "
                           f"({', '.join(classes)}).")
        blobs = await read_images(request, cfg)
        batch = await prepare_request(predictor, blobs, cfg, budget, lane)
        del blobs
        return {"explanations": await run_in_threadpool(run, batch, target)}

    @router.get("/v1/index/items/{item}/thumbnail")
    async def thumbnail(item: int = PathParam(..., ge=0)):
        if index is None:
            raise ApiError(404, "no_index", "this server has no index; start it with "
                           "`tuneflow serve RUN --index INDEX_DIR` (build one with `tuneflow index`).")
        if item >= len(index):
            raise ApiError(404, "no_such_item", f"item {item} is not in the index (it holds {len(index)} "
                           f"items, ids 0..{len(index) - 1}).")
        path = index.thumbnail(item)
        if path is None:
            raise ApiError(404, "no_thumbnail", f"item {item} has no thumbnail (its image was unreadable "
                           "when the index was built, or the index predates thumbnails: rebuild it with "
                           "`tuneflow index`).")
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return router
