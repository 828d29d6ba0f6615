"""The service's page at ``/``: static HTML, CSS and JavaScript shipped in the package (no CDN, no build step).

The page is a client like any other: it calls the public ``/v1/*`` endpoints (info, classify,
explain, search, thumbnails), with the API key the user typed when the service asks for one.
Only the files named in :data:`FILES` are served, from the package, never a path a client names.
"""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from .config import ApiError

FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "style.css": "text/css; charset=utf-8"}


def _read(name: str) -> bytes:
    return resources.files("tuneflow.serve").joinpath("static", name).read_bytes()


def page_router() -> APIRouter:
    router = APIRouter()
    # no-cache: a page from an older tuneflow must not be shown by a newer server
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

    @router.get("/", include_in_schema=False)
    async def index():
        return Response(_read("index.html"), media_type=FILES["index.html"], headers=headers)

    @router.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in FILES:
            raise ApiError(404, "not_found", f"/static/{name}: no such file (the page has "
                           f"{', '.join(sorted(FILES))}).")
        return Response(_read(name), media_type=FILES[name], headers=headers)

    return router
