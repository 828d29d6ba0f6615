"""tuneflow serve against hostile clients: decompression bombs, pixel-heavy requests, crowds, slow clients, missing keys.

The fast tests drive the app in-process (TestClient, a fake model); the slow one runs a real
``tuneflow serve`` process with a small memory budget and checks, after each attack, the status,
the JSON error naming the limit, that a normal request is still answered, and that the server's
peak RSS (VmHWM) stayed within the budget plus a stated margin: the budget is a guarantee.
"""
import asyncio
import io
import logging
import re
import signal
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_serve import FakePredictor, Server, _png
from tuneflow.serve.budget import BYTES_PER_PIXEL, PixelBudget
from tuneflow.serve.config import ApiError

KEY = "s3cret-key-for-tests"


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height grey pixels, with a few bytes of image data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def big_png(side: int) -> bytes:
    """A grey side x side PNG of zeros: side**2 decoded pixels in a few kB."""
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def vm_hwm(pid: int) -> int:
    """Peak resident memory of a process, in bytes (/proc/PID/status VmHWM)."""
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) * 1024


def test_pixel_budget_queues_in_order_then_refuses_with_retry_after():
    async def scenario():
        budget = PixelBudget(10, max_queue=1, retry_after_s=2)
        order = []

        async def user(name, pixels, hold_s):
            async with budget.hold(pixels):
                order.append(name)
                await asyncio.sleep(hold_s)
        first = asyncio.create_task(user("a", 6, 0.2))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(user("b", 6, 0.0))  # does not fit beside a: waits
        await asyncio.sleep(0.01)
        assert budget.in_use == 6 and budget.waiting == 1
        with pytest.raises(ApiError) as err:  # the queue (1) is full: refused at once
            async with budget.hold(1):
                pass
        await asyncio.gather(first, second)
        return budget, order, err.value
    budget, order, err = asyncio.run(scenario())
    assert order == ["a", "b"] and budget.in_use == 0 and budget.peak == 6 and budget.refused == 1
    assert (err.status, err.code, err.limit, err.value) == (503, "server_busy", "max_inflight_pixels", 10)
    assert err.headers == {"Retry-After": "2"} and "max_queue = 1" in err.message


class BrokenPredictor(FakePredictor):
    def classify_prepared(self, x):
        raise RuntimeError("secret detail of the model's internals")


def _client(predictor=None, key=KEY, **settings):
    from fastapi.testclient import TestClient

    from tuneflow.serve import ServeConfig, create_app
    cfg = ServeConfig(max_wait_ms=1, max_pixels=1_000_000, max_inflight_pixels=2_000_000,
                      max_request_pixels=3_000_000, **settings)
    return TestClient(create_app(predictor or FakePredictor(), cfg, api_key=key), raise_server_exceptions=False)


def test_api_key_docs_info_and_internal_errors(caplog):
    ok = ("files", ("a.png", _png()))
    auth = {"Authorization": f"Bearer {KEY}"}
    with _client() as c:
        for path in ("/healthz", "/readyz"):  # open: load balancers probe them without a key
            assert c.get(path).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY}):
            for r in (c.post("/v1/classify", files=[ok], headers=headers), c.get("/v1/info", headers=headers),
                      c.get("/metrics", headers=headers)):
                assert r.status_code == 401 and r.json()["code"] == "unauthorized", r.text
                assert "Authorization: Bearer KEY" in r.json()["error"]
                assert r.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/classify", files=[ok], headers=auth).status_code == 200
        info = c.get("/v1/info", headers=auth).json()
        assert "source" not in info and "/secret" not in str(info)  # no filesystem paths
        serving = info["serving"]
        assert serving["max_inflight_pixels"] == 2_000_000 and serving["max_request_pixels"] == 3_000_000
        assert serving["inflight_budget_bytes"] == 2_000_000 * BYTES_PER_PIXEL
        assert KEY not in str(info)
        for path in ("/docs", "/openapi.json", "/redoc"):  # off unless --docs
            assert c.get(path, headers=auth).status_code == 404
    with _client(docs=True) as c:
        assert c.get("/openapi.json").status_code == 401
        assert "/v1/embed" in c.get("/openapi.json", headers=auth).json()["paths"]
        assert c.get("/docs", headers=auth).status_code == 200
    with _client(key=None) as c:  # no key set: open, as before
        assert c.post("/v1/classify", files=[ok]).status_code == 200
    with caplog.at_level(logging.ERROR, logger="tuneflow.serve"), _client(BrokenPredictor(), key=None) as c:
        r = c.post("/v1/classify", files=[ok])
        body = r.json()
        assert r.status_code == 500 and set(body) == {"error", "code", "request_id"}
        assert body["error"] == "internal error" and body["code"] == "internal"
        assert "secret detail" not in r.text and "RuntimeError" not in r.text
        logged = [rec for rec in caplog.records if body["request_id"] in rec.getMessage()]
        assert logged and "secret detail" in str(logged[0].exc_info[1])  # the traceback, under the id
        assert c.get("/healthz").status_code == 200


def _image(fmt, mode="RGB", size=(40, 30), **kw):
    buf = io.BytesIO()
    Image.new(mode, size, (0, 128, 0) if mode == "RGB" else 3).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_bombs_heavy_requests_and_formats_the_model_decodes_otherwise_are_refused_by_name():
    with _client(key=None) as c:
        def post(*blobs):
            r = c.post("/v1/embed", files=[("files", (f"{i}.bin", b)) for i, b in enumerate(blobs)])
            return r.status_code, r.json()
        for w, h in ((20000, 10000), (40000, 25000), (1001, 1000)):  # 200 Mpx, 1 Gpx, just over 1 Mpx
            status, body = post(bomb_png(w, h))
            assert status == 413 and body["code"] == "image_too_large", body
            assert (body["limit"], body["value"]) == ("max_pixels", 1_000_000) and str(w * h) in body["error"]
        status, body = post(*[big_png(1000)] * 4)  # 4 Mpx decoded from a few kB
        assert status == 413 and (body["code"], body["limit"]) == ("request_too_many_pixels", "max_request_pixels")
        assert "4000000" in body["error"] and body["value"] == 3_000_000
        status, body = post(big_png(1000), bomb_png(500, 500)[:40])  # a header cut short
        assert status == 422 and body["code"] == "truncated_image" and body["image"] == 1
        lying = bomb_png(900, 900)  # claims 0.8 Mpx, holds 64 bytes of image data
        status, body = post(lying)
        assert status == 422 and body["code"] in ("truncated_image", "corrupt_image"), body
        refused = {"WEBP": _image("WEBP"), "transparent GIF": _image("GIF", "P", transparency=3),
                   "palette BMP": _image("BMP", "P"), "CMYK JPEG": _image("JPEG", "CMYK"), "TIFF": _image("TIFF")}
        for name, blob in refused.items():
            status, body = post(blob)
            assert status == 415 and body["code"] == "unsupported_image_type", (name, body)
        assert "bytes signatures" in post(_image("WEBP"))[1]["error"]
        frames = [Image.new("RGB", (40, 30), (i * 60, 0, 0)) for i in range(4)]
        buf = io.BytesIO()
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
        status, body = post(buf.getvalue())  # animated: its first frame
        assert status == 200 and len(body["embeddings"]) == 1
        assert post(_png())[0] == 200
