"""tuneflow serve: the micro-batcher, then a real server process on 127.0.0.1 with a real HTTP client (bad inputs, parity, load, SIGTERM drain, start-up failures)."""
import base64
import csv
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from tuneflow.serve.batcher import MicroBatcher


def test_batcher_joins_concurrent_requests_and_keeps_each_its_rows():
    calls = []

    def double(x):
        calls.append(len(x))
        time.sleep(0.01)  # a model call: requests pile up meanwhile
        return x * 2
    b = MicroBatcher({"f": double}, max_batch=8, max_wait_ms=20).start()
    inputs = [np.full((n, 2), i, np.float32) for i, n in enumerate([1, 3, 2, 1, 5, 1, 1, 2, 1, 12])]
    with ThreadPoolExecutor(10) as pool:
        outs = list(pool.map(lambda x: b.submit(("f",), x).result(timeout=10), inputs))
    b.stop()
    for x, y in zip(inputs, outs):
        np.testing.assert_array_equal(y, x * 2)
    assert sum(calls) >= sum(len(x) for x in inputs)   # padded up to a bucket, never fewer rows
    assert set(calls) <= {1, 2, 3, 4, 6, 8}            # only the bucket sizes reach the model
    assert max(calls) <= 8 and len(calls) < len(inputs)  # batched, never over max_batch


def test_batcher_pads_to_a_few_batch_sizes_and_returns_only_real_rows():
    from tuneflow.serve.batcher import bucket_sizes, padded_call
    assert bucket_sizes(64) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert bucket_sizes(40) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40]
    assert bucket_sizes(1) == [1] and bucket_sizes(2) == [1, 2]
    for m in (5, 17, 40, 64, 100):  # never more than a third of a call is padding (above 2 rows)
        b = bucket_sizes(m)
        assert all(min(x for x in b if x >= n) <= max(2, 1.5 * n) for n in range(1, m + 1))
    seen = []

    def f(x, k):
        seen.append(x.shape[0])
        return x.sum(axis=1) + k
    x = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    y = padded_call(f, x, (1.0,), bucket_sizes(64))
    assert seen == [6] and y.shape == (5,)
    np.testing.assert_array_equal(y, x.sum(axis=1) + 1.0)
    calls = []
    b = MicroBatcher({"f": lambda x: calls.append(len(x)) or x}, max_batch=64, pad_batches=False).start()
    b.submit(("f",), np.zeros((5, 1), np.float32)).result(timeout=5)
    b.stop()
    assert calls == [5]  # padding can be switched off


def test_batcher_groups_by_key_fails_only_the_failing_batch_and_drains_on_stop():
    def boom(x):
        raise RuntimeError("model exploded")
    b = MicroBatcher({"ok": lambda x, k: x + k, "bad": boom}, max_batch=4, max_wait_ms=50).start()
    good = [b.submit(("ok", 1.0), np.zeros((1, 1), np.float32)) for _ in range(6)]
    bad = b.submit(("bad",), np.zeros((1, 1), np.float32))
    other = b.submit(("ok", 5.0), np.zeros((1, 1), np.float32))
    b.stop()  # everything submitted before the stop is still answered
    assert [float(f.result(timeout=5)[0, 0]) for f in good] == [1.0] * 6
    assert float(other.result(timeout=5)[0, 0]) == 5.0
    with pytest.raises(RuntimeError, match="exploded"):
        bad.result(timeout=5)
    with pytest.raises(RuntimeError, match="shutting down"):
        b.submit(("ok", 1.0), np.zeros((1, 1), np.float32))


class FakePredictor:
    """Only for routing checks without TensorFlow: 2 classes, the embedding is the mean colour."""
    classes = ["x", "y"]
    embedding_dim = 3
    input_size = 2
    resize = "squash"
    info = {"backbone": "fake", "tuneflow_version": "0", "source": "/secret/run/model"}

    def decode(self, data, max_pixels=None):
        from tuneflow.imageops import decode_pixels
        return decode_pixels(data, max_pixels=max_pixels, size=self.input_size)

    def prepare(self, images):
        return np.stack([im[:2, :2].astype(np.float32) for im in images])

    def embed_prepared(self, x, layer="pooled", normalize=True):
        return x.mean(axis=(1, 2))

    def classify_prepared(self, x):
        p = x.mean(axis=(1, 2, 3)) / 255.0
        return np.stack([1 - p, p], axis=1)


def test_app_routes_without_an_index_or_a_model_process():
    from fastapi.testclient import TestClient

    from tuneflow.serve import ServeConfig, create_app
    with TestClient(create_app(FakePredictor(), ServeConfig(max_wait_ms=1))) as c:
        assert c.get("/readyz").json() == {"status": "ready"}
        r = c.post("/v1/search", files=[("files", ("a.png", _png()))])
        assert r.status_code == 404 and r.json()["code"] == "no_index"
        r = c.post("/v1/classify?top=1", files=[("files", ("a.png", _png(value=200))), ("files", ("b.png", _png(value=10)))])
        assert [p["class"] for p in r.json()["predictions"]] == ["y", "x"]  # request order kept
        r = c.post("/v1/embed", json={"images": [base64.b64encode(_png(value=30)).decode()]})
        assert r.json() == {"embeddings": [[30.0, 30.0, 30.0]], "dim": 3}
        assert c.get("/v1/info").json()["serving"]["max_batch"] == 64


class Server:
    """``tuneflow serve`` in a subprocess on a free port; stderr collected by a thread."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "tuneflow", "serve", *map(str, args), "--port", "0"],
                                     cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_listening(self, timeout=300) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in self.lines:
                m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
                if m:
                    return m.group(1)
            if self.proc.poll() is not None:
                raise AssertionError("server exited: " + "".join(self.lines)[-3000:])
            time.sleep(0.1)
        raise AssertionError("server did not start: " + "".join(self.lines)[-3000:])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)


def _val_paths(run, limit=200):
    with open(run / "val_predictions.csv", newline="") as f:
        return [Path(r["path"]) for r in csv.DictReader(f)][:limit]


def _png(shape=(20, 30, 3), value=90):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.full(shape, value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_server_errors_parity_load_and_drain(serving_run, tmp_path):
    import httpx
    from PIL import Image

    import tuneflow
    run, images = serving_run
    predictor = tuneflow.load(run)
    val = _val_paths(run)
    from tuneflow.index import build_index
    build_index(run, val, tmp_path / "idx")
    server = Server(run, "--max-images", "64", "--max-pixels", "1000000", "--max-request-bytes", "3000000",
                    "--index", tmp_path / "idx")
    try:
        url = server.wait_listening()
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.get("/healthz").json() == {"status": "ok"}
            assert c.get("/readyz").status_code == 200
            info = c.get("/v1/info").json()
            assert info["classes"] == predictor.classes and info["embedding_dim"] == predictor.embedding_dim
            assert info["backbone"] == "efficientnet_lite0" and info["checkpoint"] == "best"

            # parity: every validation image over HTTP (multipart and base64 JSON) == in-process
            ref = predictor.embed(val)
            got = []
            for i in range(0, len(val), 16):
                files = [("files", (p.name, p.read_bytes(), "image/png")) for p in val[i:i + 16]]
                r = c.post("/v1/embed", files=files)
                assert r.status_code == 200, r.text
                assert r.json()["dim"] == predictor.embedding_dim
                got += r.json()["embeddings"]
            assert np.abs(np.array(got, np.float32) - ref).max() <= 1e-5
            r = c.post("/v1/embed", json={"images": [base64.b64encode(p.read_bytes()).decode() for p in val[:3]]})
            assert np.abs(np.array(r.json()["embeddings"], np.float32) - ref[:3]).max() <= 1e-5
            r = c.post("/v1/classify?top=2", files=[("files", (p.name, p.read_bytes())) for p in val[:4]])
            preds = r.json()["predictions"]
            assert [p["class"] for p in preds] == [d["class"] for d in predictor.predict(val[:4])]
            assert all(len(p["top"]) == 2 and p["top"][0][0] == p["class"] for p in preds)
            r = c.post("/v1/search?k=3", files=[("files", (p.name, p.read_bytes())) for p in val[2:4]])
            results = r.json()["results"]
            assert [hits[0]["path"] for hits in results] == [str(p) for p in val[2:4]]
            assert all(len(hits) == 3 and hits[0]["score"] == pytest.approx(1.0, abs=1e-5) for hits in results)

            # every bad input: a 4xx JSON error naming the problem (and the limit), server keeps serving
            jpeg = io.BytesIO()
            Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(jpeg, format="JPEG")
            tiff = io.BytesIO()
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tiff, format="TIFF")
            bomb = io.BytesIO()
            Image.new("L", (2000, 2000)).save(bomb, format="PNG")  # 4 Mpx in a few kB
            ok = ("files", ("ok.png", _png()))
            cases = [
                (c.post("/v1/embed", files=[("files", ("t.txt", b"hello, not an image"))]), 422, "not_an_image", None),
                (c.post("/v1/embed", files=[ok, ("files", ("cut.jpg", jpeg.getvalue()[:300]))]), 422,
                 "truncated_image", None),
                (c.post("/v1/embed", files=[("files", ("x.tif", tiff.getvalue()))]), 415, "unsupported_image_type", None),
                (c.post("/v1/embed", content=b"", headers={"content-type": "application/json"}), 400, "empty_body", None),
                (c.post("/v1/embed"), 400, "empty_body", None),
                (c.post("/v1/embed", content=b"abc", headers={"content-type": "text/plain"}), 415,
                 "unsupported_media_type", None),
                (c.post("/v1/embed", content=b'{"images": [', headers={"content-type": "application/json"}), 400,
                 "malformed_json", None),
                (c.post("/v1/embed", json={"images": ["not base64!"]}), 400, "malformed_base64", None),
                (c.post("/v1/embed", json={"pictures": []}), 422, "bad_json_shape", None),
                (c.post("/v1/embed", files=[("files", ("e.png", b""))]), 422, "empty_image", None),
                (c.post("/v1/embed", files=[ok] * 65), 413, "too_many_images", "max_images"),
                (c.post("/v1/embed", json={"images": [base64.b64encode(_png()).decode()] * 65}), 413,
                 "too_many_images", "max_images"),
                (c.post("/v1/embed", files=[("files", ("big.png", bomb.getvalue()))]), 413, "image_too_large",
                 "max_pixels"),
                (c.post("/v1/embed", files=[("files", ("huge.bin", b"\0" * 3_100_000))]), 413, "request_too_large",
                 "max_request_bytes"),
                (c.post("/v1/embed?layer=middle", files=[ok]), 422, "bad_parameter", None),
            ]
            for r, status, code, limit in cases:
                body = r.json()
                assert (r.status_code, body["code"]) == (status, code), body
                assert body["error"]
                if limit:
                    assert body["limit"] == limit and body["value"] > 0
            assert c.get("/readyz").status_code == 200

        # 1000 requests from 16 concurrent clients: zero errors, each answer its own image's
        blobs = [p.read_bytes() for p in val]

        def client(k):
            answers = []
            with httpx.Client(base_url=url, timeout=60) as cc:
                for j in range(k, 1000, 16):
                    r = cc.post("/v1/embed", files=[("files", ("i.png", blobs[j % len(blobs)]))])
                    answers.append((j, r.status_code, r.json()))
            return answers
        with ThreadPoolExecutor(16) as pool:
            answers = [a for part in pool.map(client, range(16)) for a in part]
        assert len(answers) == 1000 and all(s == 200 for _, s, _ in answers)
        worst = max(np.abs(np.array(b["embeddings"][0]) - ref[j % len(blobs)]).max() for j, _, b in answers)
        assert worst <= 1e-5
        metrics = httpx.get(url + "/metrics").text
        assert 'tuneflow_requests_total{endpoint="/v1/embed"}' in metrics
        assert 'tuneflow_errors_total{endpoint="/v1/embed",status="413"}' in metrics
        batches = re.search(r"tuneflow_batch_size_count (\S+)", metrics).group(1)
        images_run = re.search(r'tuneflow_images_total\{kind="embed"\} (\S+)', metrics).group(1)
        assert float(batches) < float(images_run)  # concurrent requests were joined into batches
        assert "tuneflow_request_latency_seconds_bucket" in metrics

        # SIGTERM under load: every request the server accepted is answered
        received, failures, stop = [], [], threading.Event()

        def hammer():
            with httpx.Client(base_url=url, timeout=60) as cc:
                while not stop.is_set():
                    try:
                        r = cc.post("/v1/classify", files=[("files", ("i.png", blobs[0]))])
                    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                        failures.append(type(exc).__name__)  # refused or closed before it was read
                        return
                    received.append(r.status_code)
        threads = [threading.Thread(target=hammer) for _ in range(16)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(60)
        stop.set()
        for t in threads:
            t.join(60)
        drained = [ln for ln in server.lines if "drained;" in ln]
        assert drained, "".join(server.lines)[-2000:]
        summary = json.loads(drained[0].split("drained; ", 1)[1])
        assert summary["in_flight"] == 0
        assert len(received) > 0 and set(received) == {200}, "".join(server.lines)[-6000:]
        assert summary["answered"]["/v1/classify"] == len(received) + 1  # +1: the parity check's request
    finally:
        server.stop()


@pytest.mark.slow
def test_server_refuses_to_start_on_a_missing_or_damaged_model(serving_run, tmp_path):
    run, _ = serving_run
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "model" / "saved_model.pb").write_bytes(b"\x08\x01garbage")
    for target, message in [(tmp_path / "nope", "does not exist"), (broken, "cannot be loaded")]:
        out = subprocess.run([sys.executable, "-m", "tuneflow", "serve", str(target), "--port", "0"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode != 0
        assert message in out.stderr and "serving" not in out.stderr, out.stderr[-2000:]


def test_memory_upkeep_calls_work_and_the_worker_trims_only_when_idle():
    from tuneflow.serve import memory
    assert isinstance(memory.limit_arenas(), bool) and isinstance(memory.trim(), bool)
    t = memory.Trimmer(every_s=0.0)
    idle = []
    b = MicroBatcher({"f": lambda x: x}, max_batch=4, on_idle=lambda: (idle.append(1), t.maybe())).start()
    for _ in range(3):
        b.submit(("f",), np.zeros((1, 1), np.float32)).result(timeout=5)
    b.stop()
    assert len(idle) == 3 and t.trims == 3  # one call after each batch that left the queue empty


def test_batcher_fills_a_padded_call_with_images_that_arrive_a_little_later():
    calls = []
    b = MicroBatcher({"f": lambda x: calls.append(len(x)) or x}, max_batch=8, max_wait_ms=300).start()
    futures = [b.submit(("f",), np.full((1, 1), i, np.float32)) for i in range(5)]
    time.sleep(0.45)  # after max_wait (5 is not a bucket: 6 is), within the fill wait
    futures.append(b.submit(("f",), np.full((1, 1), 5, np.float32)))
    out = [float(f.result(timeout=10)[0, 0]) for f in futures]
    b.stop()
    assert out == [0, 1, 2, 3, 4, 5]
    assert calls == [6]  # one call: the sixth image took the row padding would have filled
