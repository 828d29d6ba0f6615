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
from tuneflow.serve.budget import PixelBudget
from tuneflow.serve.config import ApiError
from tuneflow.serve.memory import BYTES_PER_PIXEL

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


def children(pid: int) -> list[int]:
    """The process ids of ``pid``'s children (/proc/PID/task/*/children)."""
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def test_pixel_budget_lets_what_fits_pass_queues_the_rest_then_refuses_with_retry_after():
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
        third = asyncio.create_task(user("c", 2, 0.05))  # fits beside a: goes past b at once
        await asyncio.sleep(0.01)
        assert budget.in_use == 8 and budget.waiting == 1
        with pytest.raises(ApiError) as err:  # does not fit, and the queue (1) is full: refused at once
            async with budget.hold(5):
                pass
        await asyncio.gather(first, second, third)
        return budget, order, err.value
    budget, order, err = asyncio.run(scenario())
    assert order == ["a", "c", "b"] and budget.in_use == 0 and budget.peak == 8 and budget.refused == 1
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
        # refused as soon as the total passes the limit: the damaged 7th image is never probed
        status, body = post(*[big_png(1000)] * 6, bomb_png(500, 500)[:40])
        assert status == 413 and body["code"] == "request_too_many_pixels", body
        assert "first 4 of its 7 images decode to 4000000 pixels" in body["error"], body
        status, body = post(big_png(1000), bomb_png(500, 500)[:40])  # a header cut short
        assert status == 422 and body["code"] == "truncated_image" and body["image"] == 1
        lying = bomb_png(900, 900)  # claims 0.8 Mpx, holds 64 bytes of image data
        status, body = post(lying)
        assert status == 422 and body["code"] in ("truncated_image", "corrupt_image"), body
        refused = {"WEBP": _image("WEBP"), "transparent GIF": _image("GIF", "P", transparency=3),
                   "palette BMP": _image("BMP", "P"), "CMYK JPEG": _image("JPEG", "CMYK"), "TIFF": _image("TIFF")}
        exif = Image.Exif()
        exif[0x0112] = 6
        refused["rotated PNG"] = _image("PNG", exif=exif.tobytes())
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


MAX_PIXELS = 10_000_000      # one image: 3000 x 3000 (9 Mpx) passes
BUDGET = 20_000_000          # decoded pixels in flight: two such images at once
MARGIN = 400 * 2**20         # peak RSS allowed over the warmed-up server's peak, besides the budget:
#                              the request threads' own buffers, request bodies, allocator slack
LANE_RUNTIME = 900 * 2**20   # the large-image process's own Python, TensorFlow and libraries, before
#                              any image (its pixels are in the budget): 749 MB measured here


def _slow_headers(url: str, seconds: float) -> float:
    """Trickle a request's headers one byte every 0.3 s; how long until the server hung up."""
    host, port = url.rsplit("//", 1)[1].split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=seconds) as s:
        for b in b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
            try:
                s.sendall(bytes([b]))
                time.sleep(0.3)
                if time.monotonic() - t0 > seconds:
                    return float("inf")
            except OSError:  # reset or broken pipe: closed by the server
                return time.monotonic() - t0
    return float("inf")


def _slow_body(url: str) -> tuple[int, dict, float]:
    """Headers in full, then 10 of the 1000 body bytes announced, then nothing."""
    import json
    host, port = url.rsplit("//", 1)[1].split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST /v1/embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"images\":".encode())
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), time.monotonic() - t0


@pytest.mark.slow
def test_a_real_server_survives_hostile_clients_within_its_memory_budget(serving_run, monkeypatch):
    import httpx
    run, images = serving_run
    monkeypatch.setenv("TUNEFLOW_API_KEY", KEY)
    server = Server(run, "--max-pixels", MAX_PIXELS, "--max-inflight-pixels", BUDGET, "--max-request-pixels",
                    100_000_000, "--max-queue", 4, "--header-timeout", 2, "--body-timeout", 3)
    auth = {"Authorization": f"Bearer {KEY}"}
    normal = [("files", (p.name, p.read_bytes())) for p in sorted(Path(images).rglob("*.png"))[:4]]
    try:
        url = server.wait_listening()
        c = httpx.Client(base_url=url, timeout=120, headers=auth)

        def still_serving():
            r = c.post("/v1/classify", files=normal)
            assert r.status_code == 200 and len(r.json()["predictions"]) == 4, r.text
        still_serving()
        info = c.get("/v1/info").json()
        assert info["serving"]["max_inflight_pixels"] == BUDGET and "source" not in info
        baseline = vm_hwm(server.proc.pid)

        # no key, a wrong key: 401; the health checks stay open
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer not-the-key"}):
            r = c.post("/v1/classify", files=normal, headers=headers)
            assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        assert httpx.get(url + "/healthz").status_code == 200 and httpx.get(url + "/v1/info").status_code == 401
        still_serving()

        # header-only bombs: 200 Mpx and 1 Gpx in a few dozen bytes -> 413 naming max_pixels
        for w, h in ((20000, 10000), (40000, 25000)):
            r = c.post("/v1/embed", files=[("files", ("bomb.png", bomb_png(w, h)))])
            body = r.json()
            assert r.status_code == 413 and (body["code"], body["limit"], body["value"]) == (
                "image_too_large", "max_pixels", MAX_PIXELS), body
        still_serving()

        # 64 large-but-small-file PNGs (9 Mpx, ~9 kB each) in one request: 413 naming the request limit
        heavy = big_png(3000)
        r = c.post("/v1/embed", files=[("files", (f"{i}.png", heavy)) for i in range(64)])
        body = r.json()
        assert r.status_code == 413 and (body["code"], body["limit"]) == ("request_too_many_pixels",
                                                                          "max_request_pixels"), body
        still_serving()

        # 8 concurrent heavy clients (8 of those PNGs each): the budget holds two images at a time,
        # four wait, the rest are told 503 + Retry-After and come back; every client is answered
        busy = []

        def heavy_client(k):
            with httpx.Client(base_url=url, timeout=300, headers=auth) as cc:
                while True:
                    r = cc.post("/v1/embed", files=[("files", (f"{i}.png", heavy)) for i in range(8)])
                    if r.status_code != 503:
                        return r.status_code, len(r.json().get("embeddings", []))
                    busy.append((r.headers.get("retry-after"), r.json()))
                    time.sleep(float(r.headers["retry-after"]))
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(heavy_client, range(8)))
        assert answers == [(200, 8)] * 8
        assert busy, "8 clients x 8 images over a budget of 2 images and a queue of 4: some must be told to wait"
        assert all(ra == "1" and b["code"] == "server_busy" and b["limit"] == "max_inflight_pixels"
                   for ra, b in busy)
        still_serving()

        # a client trickling its headers is cut off (--header-timeout 2), one stalling its body gets 408
        assert _slow_headers(url, 15) < 8
        status, body, took = _slow_body(url)
        assert status == 408 and (body["code"], body["limit"]) == ("request_timeout", "body_timeout_s"), body
        assert took < 15
        still_serving()

        # the server and its large-image process together (the 9 Mpx PNGs were decoded there)
        lanes = children(server.proc.pid)
        assert len(lanes) == 1, lanes
        peak = vm_hwm(server.proc.pid) + vm_hwm(lanes[0])
        allowed = baseline + LANE_RUNTIME + BUDGET * BYTES_PER_PIXEL + MARGIN
        assert peak <= allowed, f"peak RSS {peak / 2**20:.0f} MB over {allowed / 2**20:.0f} MB " \
                                f"(baseline {baseline / 2**20:.0f} MB + large-image process + budget + margin)"
        print(f"peak RSS {peak / 2**20:.0f} MB (large-image process {vm_hwm(lanes[0]) / 2**20:.0f} MB); "
              f"baseline {baseline / 2**20:.0f} MB; allowed {allowed / 2**20:.0f} MB")
        c.close()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0  # drained, then a normal exit
    finally:
        server.stop()


def test_api_key_sources_and_settings_that_cannot_work_are_named(tmp_path, monkeypatch):
    from tuneflow.errors import ServeError
    from tuneflow.serve import ServeConfig
    from tuneflow.serve.auth import load_api_key
    from tuneflow.serve.memory import default_inflight_pixels
    monkeypatch.delenv("TUNEFLOW_API_KEY", raising=False)
    assert load_api_key() is None
    monkeypatch.setenv("TUNEFLOW_API_KEY", " from-env \n")
    assert load_api_key() == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\nignored second line\n")
    assert load_api_key(key_file) == "from-file"  # the file wins over the environment
    key_file.write_text("\n")
    with pytest.raises(ServeError, match=r"--api-key-file .*key is empty; write the key on its first line"):
        load_api_key(key_file)
    with pytest.raises(ServeError, match=r"--api-key-file .*nope: cannot read it"):
        load_api_key(tmp_path / "nope")
    with pytest.raises(ServeError, match=r"--max-inflight-pixels 1000 is below --max-pixels 2000"):
        ServeConfig(max_pixels=2000, max_inflight_pixels=1000).checked()
    with pytest.raises(ServeError, match=r"--max-queue 0 must be at least 1"):
        ServeConfig(max_queue=0).checked()
    budget = ServeConfig().checked().max_inflight_pixels  # derived from the machine's memory
    assert budget == default_inflight_pixels(40_000_000) >= 40_000_000
