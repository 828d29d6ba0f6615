"""Serving throughput: ``tuneflow embed`` against a plain ``model.predict`` loop, the HTTP service at 1
and 16 concurrent clients against offline batch embedding (with p50/p95/p99 latency), and the
server's RSS growth over 10,000 requests.

    .venv/bin/python benchmarks/bench_serve.py DATA [--run RUN] [--rss-requests 10000]

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


class Server:
    def __init__(self, run):
        self.proc = subprocess.Popen([sys.executable, "-m", "tuneflow", "serve", str(run), "--port", "0"],
                                     cwd=REPO, stderr=subprocess.PIPE, text=True)
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--run")
    ap.add_argument("--rss-requests", type=int, default=10_000)
    ap.add_argument("--only", choices=["all", "rss", "throughput"], default="all",
                    help="rss: only the server's memory over --rss-requests (skips the throughput parts); "
                         "throughput: only the offline and HTTP throughput (skips the memory part)")
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
    suffix = {"all": "", "rss": "_rss", "throughput": "_throughput"}[args.only]
    out = HERE / "results" / f"serve_{data.name}{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
