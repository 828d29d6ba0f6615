"""Serving throughput: ``tuneflow embed`` against a plain ``model.predict`` loop, the HTTP service at 1
and 16 concurrent clients against offline batch embedding (with p50/p95/p99 latency), and the
server's RSS growth over 10,000 requests; with ``--only abuse``, well-behaved clients' throughput
and the server's peak RSS while hostile clients run, beside the same well-behaved load alone.

    .venv/bin/python benchmarks/bench_serve.py DATA [--run RUN] [--rss-requests 10000]
    .venv/bin/python benchmarks/bench_serve.py DATA --run RUN --only abuse [--seconds 60]

Without --run, a ``small_similar`` run (Lite0 ImageNet weights, its default 288 px) is trained on
DATA first. Every image under DATA is embedded. JSON in benchmarks/results/serve_<DATA>.json.
"""
import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def offline(run, paths, repeats=2) -> dict:
    """images/s of tuneflow embed's code path vs a plain loop: PIL decode + resize, model.predict."""
    import keras
    from PIL import Image

    import tuneflow
    from tuneflow.export.embed import embed_files
    predictor = tuneflow.load(run)
    model = keras.models.load_model(Path(run) / "model.keras")
    s = predictor.input_size

    def plain():
        for i in range(0, len(paths), 64):
            batch = np.stack([np.asarray(Image.open(p).convert("RGB").resize((s, s), Image.BILINEAR))
                              for p in paths[i:i + 64]])
            model.predict(batch, verbose=0)

    def ours():
        embed_files(predictor, paths, batch_size=64)
    ours(), plain()  # warm-up: traces, caches
    out = {}
    for name, fn in (("tuneflow_embed", ours), ("plain_model_predict", plain)):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = {"images_per_s": len(paths) / min(times), "seconds": times}
    out["ratio"] = out["tuneflow_embed"]["images_per_s"] / out["plain_model_predict"]["images_per_s"]
    return out


def _hwm_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


class Server:
    def __init__(self, run, *flags):
        self.proc = subprocess.Popen([sys.executable, "-m", "tuneflow", "serve", str(run), "--port", "0",
                                      *map(str, flags)], cwd=REPO, stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if m:
                self.url = m.group(1)
                break
        else:
            raise SystemExit("server did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def hwm_mb(self) -> float:
        return _hwm_mb(self.proc.pid)

    def child_hwm_mb(self) -> float:
        """Peak RSS of the server's children (the low-priority process decoding large images)."""
        kids = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            kids += (task / "children").read_text().split()
        return sum(_hwm_mb(int(pid)) for pid in kids)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def http(url, blobs, clients, requests) -> dict:
    """``requests`` one-image POST /v1/embed from ``clients`` threads -> images/s and latency."""
    import httpx
    lat = []

    def client(k):
        with httpx.Client(base_url=url, timeout=120) as c:
            for j in range(k, requests, clients):
                t = time.perf_counter()
                r = c.post("/v1/embed", files=[("files", ("i.jpg", blobs[j % len(blobs)]))])
                lat.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t
    ms = np.array(lat) * 1000
    return {"clients": clients, "requests": requests, "images_per_s": requests / wall,
            "latency_ms": {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
                           "p99": float(np.percentile(ms, 99))}}


def well_behaved(url, blobs, clients, seconds) -> dict:
    """``clients`` threads posting one image each to /v1/embed for ``seconds`` -> images/s, latency."""
    import httpx
    lat, statuses, stop = [], {}, time.monotonic() + seconds

    def client(k):
        with httpx.Client(base_url=url, timeout=120) as c:
            j = k
            while time.monotonic() < stop:
                t = time.perf_counter()
                r = c.post("/v1/embed", files=[("files", ("i.jpg", blobs[j % len(blobs)]))])
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t)
                j += clients
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t
    ms = np.array(lat or [0.0]) * 1000
    return {"clients": clients, "seconds": wall, "images_per_s": len(lat) / wall, "statuses": statuses,
            "latency_ms": {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95))}}


def hostile(url, seconds, stop_event) -> dict:
    """Attackers for ``seconds``: header-only bombs (200 Mpx, 1 Gpx), requests of four 6000 x 6000
    PNGs (36 Mpx decoded from 35 kB each), one of 64 such PNGs, and slow clients trickling headers."""
    import io
    import socket
    import struct
    import zlib

    import httpx
    from PIL import Image

    def bomb(w, h):
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    buf = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buf, format="PNG")
    heavy = buf.getvalue()
    counts: dict = {}
    lock = threading.Lock()
    host, port = url.rsplit("//", 1)[1].split(":")

    def count(kind, status):
        with lock:
            counts.setdefault(kind, {}).setdefault(str(status), 0)
            counts[kind][str(status)] += 1

    def bomber():
        with httpx.Client(base_url=url, timeout=120) as c:
            while not stop_event.is_set():
                for w, h in ((20000, 10000), (40000, 25000)):
                    count("bomb", c.post("/v1/embed", files=[("files", ("b.png", bomb(w, h)))]).status_code)

    def heavy_client(n):
        with httpx.Client(base_url=url, timeout=300) as c:
            while not stop_event.is_set():
                r = c.post("/v1/embed", files=[("files", (f"{i}.png", heavy)) for i in range(n)])
                count(f"heavy_x{n}", r.status_code)
                if r.status_code == 503:  # a hostile client ignores Retry-After and comes straight back
                    time.sleep(0.05)

    def slowloris():
        while not stop_event.is_set():
            try:
                with socket.create_connection((host, int(port)), timeout=30) as s:
                    for b in b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10000:
                        if stop_event.is_set():
                            return
                        s.sendall(bytes([b]))
                        time.sleep(0.5)
            except OSError:
                count("slowloris", "cut off")
    threads = ([threading.Thread(target=bomber) for _ in range(2)]
               + [threading.Thread(target=heavy_client, args=(4,)) for _ in range(4)]
               + [threading.Thread(target=heavy_client, args=(64,))]
               + [threading.Thread(target=slowloris) for _ in range(8)])
    for t in threads:
        t.daemon = True
        t.start()
    time.sleep(seconds)
    stop_event.set()
    for t in threads:
        t.join(120)
    return counts


def _hostile_process(url, seconds, queue):
    """The attackers in a process of their own (as they would be on another machine): their Python
    does not share the well-behaved clients' interpreter lock; their CPU is still this machine's."""
    queue.put(hostile(url, seconds, threading.Event()))


def abuse(run, blobs, seconds, clients=4) -> dict:
    """Well-behaved throughput and the server's peak RSS alone, then with hostile clients."""
    server = Server(run)
    try:
        import httpx
        info = httpx.get(server.url + "/v1/info").json()["serving"]
        well_behaved(server.url, blobs, clients, 10)  # warm-up
        base_hwm = server.hwm_mb()
        alone = well_behaved(server.url, blobs, clients, seconds)
        alone["peak_rss_mb"] = server.hwm_mb()
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        answers = ctx.Queue()
        attacker = ctx.Process(target=_hostile_process, args=(server.url, seconds + 5, answers))
        attacker.start()
        time.sleep(5)  # the attack under way
        under = well_behaved(server.url, blobs, clients, seconds)
        attack = answers.get(timeout=600)
        attacker.join(60)
        under["peak_rss_mb"] = server.hwm_mb()
        under["large_image_process_peak_rss_mb"] = server.child_hwm_mb()
        under["hostile_answers"] = attack
    finally:
        server.stop()
    out = {"serving": {k: info[k] for k in ("max_pixels", "max_request_pixels", "max_inflight_pixels", "max_queue",
                                            "limit_concurrency", "bytes_per_pixel", "inflight_budget_bytes",
                                            "large_image_pixels", "large_image_nice")},
           "baseline_peak_rss_mb": base_hwm, "alone": alone, "under_attack": under,
           "throughput_ratio": under["images_per_s"] / max(alone["images_per_s"], 1e-9),
           "peak_rss_over_baseline_mb": under["peak_rss_mb"] - base_hwm,
           # the server and its large-image process together (that process did not exist at baseline)
           "peak_rss_with_child_over_baseline_mb": under["peak_rss_mb"] + under["large_image_process_peak_rss_mb"]
           - base_hwm,
           "goals": {"throughput_ratio": ">= 0.7", "peak_rss_with_child_over_baseline_mb": "<= 2048"}}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--run")
    ap.add_argument("--rss-requests", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=60, help="abuse: length of each well-behaved load")
    ap.add_argument("--only", choices=["all", "rss", "throughput", "abuse"], default="all",
                    help="rss: only the server's memory over --rss-requests (skips the throughput parts); "
                         "throughput: only the offline and HTTP throughput (skips the memory part); "
                         "abuse: well-behaved clients alone, then beside hostile ones")
    args = ap.parse_args()
    data = Path(args.data)
    from tuneflow.export.embed import list_images
    paths = list_images([data])
    tmp = tempfile.TemporaryDirectory()
    run = args.run
    if run is None:
        import tuneflow
        run = str(Path(tmp.name) / "run")
        tuneflow.finetune("small_similar", str(data), run, verbose=0)
    result = {"data": str(data), "images": len(paths), "run": run,
              "command": "benchmarks/bench_serve.py " + " ".join(sys.argv[1:])}
    if args.only == "abuse":
        result["abuse"] = abuse(run, [p.read_bytes() for p in paths], args.seconds)
        print(json.dumps(result["abuse"], indent=1), flush=True)
        return finish(result, data, args)
    if args.only != "rss":
        result["offline"] = offline(run, paths)
        print(json.dumps(result["offline"], indent=1), flush=True)
    blobs = [p.read_bytes() for p in paths]
    server = Server(run)
    try:
        http(server.url, blobs, 16, 64)  # warm-up
        if args.only != "rss":
            result["http"] = [http(server.url, blobs, c, n) for c, n in ((1, 200), (16, 800))]
            base = result["offline"]["tuneflow_embed"]["images_per_s"]
            for h in result["http"]:
                h["vs_offline"] = h["images_per_s"] / base
            print(json.dumps(result["http"], indent=1), flush=True)
        if args.only == "throughput":
            return finish(result, data, args)
        # RSS after a first pass over the images (every image size and batch shape met once), then
        # sampled every 10% of the requests: growth that levels off is a cache filling, growth
        # that keeps rising is a leak.
        http(server.url, blobs, 16, max(len(blobs), 1000))
        before = server.rss_mb()
        t = time.perf_counter()
        curve = []
        step = max(1, args.rss_requests // 10)
        for done in range(0, args.rss_requests, step):
            http(server.url, blobs, 16, min(step, args.rss_requests - done))
            curve.append(round(server.rss_mb() - before, 1))
        result["rss"] = {"requests": args.rss_requests, "before_mb": before, "after_mb": server.rss_mb(),
                         "seconds": time.perf_counter() - t, "growth_curve_mb": curve}
        result["rss"]["growth_mb"] = result["rss"]["after_mb"] - before
        print(json.dumps(result["rss"], indent=1), flush=True)
    finally:
        server.stop()
    finish(result, data, args)


def finish(result, data, args):
    suffix = {"all": "", "rss": "_rss", "throughput": "_throughput", "abuse": "_abuse"}[args.only]
    out = HERE / "results" / f"serve_{data.name}{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
