"""Memory and speed against dataset size: synthetic JPEG folders of 2k, 20k (100k) images, each
loaded and run through the Lite0 feature pass (OpenVINO, as the recipes run it on a CPU) in a
fresh process.

Per size: peak RSS (VmHWM) and peak RssAnon (the process's own memory; RssFile, pages of mapped
files, is the kernel's evictable cache), sampled every 50 ms; images/s of loading (decode +
resize into the store) and of the feature pass; images/s of the training input pipeline
(gather + medium augmentation, no model) over its first 2,000 images.

    .venv/bin/python benchmarks/bench_scale.py [N ...]          (default 2000 20000)
        --size 224 --feature-mode extractor|streamed|none --keep (keep the generated folders)
    TUNEFLOW_INMEMORY_MAX_BYTES=1 .venv/bin/python benchmarks/bench_scale.py 2000   (store forced)

``extractor``: ``FeatureExtractor.compute`` as the recipes call it today (features concatenated in
RAM); ``streamed``: the same OpenVINO model writing each batch into ``features.cache.cached_into``;
``none``: no feature pass.
JSON in benchmarks/results/scale.json (rows merged by size and mode).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = Path(tempfile.gettempdir()) / "tuneflow_bench_scale"
CLASSES = 10


def make_folder(n: int) -> Path:
    """``n`` 64x64 JPEGs (~2 KB each: smooth colour fields) in 10 class folders, made once."""
    import numpy as np
    from PIL import Image
    root = WORK / f"jpeg{n}"
    done = root / ".complete"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(n)
    yy, xx = np.mgrid[:64, :64] / 64.0
    for i in range(n):
        c = i % CLASSES
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        a, b, ph = rng.uniform(1, 6, 3)
        img = np.stack([np.sin(a * xx * 3 + ph + c), np.cos(b * yy * 3 + c), np.sin((xx + yy) * (a + b))], -1)
        img = ((img * 0.5 + 0.5) * 255 + rng.normal(0, 4, img.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"{i:07d}.jpg", quality=85)
    done.write_text("")
    return root


class Peak:
    """Peak RssAnon / RssFile of this process (kB), sampled every 50 ms in a thread."""

    def __init__(self):
        self.anon = self.file = 0
        self.run = True
        threading.Thread(target=self._loop, daemon=True).start()

    @staticmethod
    def now() -> dict:
        f = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
        return {k: int(f[k].split()[0]) for k in ("RssAnon", "RssFile", "VmHWM")}

    def _loop(self):
        while self.run:
            r = self.now()
            self.anon, self.file = max(self.anon, r["RssAnon"]), max(self.file, r["RssFile"])
            time.sleep(0.05)


def one(folder: str, size: int, mode: str) -> dict:
    peak = Peak()
    import keras
    import numpy as np

    from tuneflow import build_backbone
    from tuneflow.data import ImageRows, load_data
    from tuneflow.data.pipeline import train_dataset
    from tuneflow.features import infer
    from tuneflow.features.extractor import FeatureExtractor
    base = Peak.now()
    t = time.time()
    bundle = load_data(folder, size)
    load_s = time.time() - t
    n = len(bundle.train) + len(bundle.val)
    after_load = Peak.now()
    anon_load = peak.anon

    t = time.time()
    ds = train_dataset(bundle.train, 32, augment="medium", seed=0)
    seen = 0
    for xb, _ in ds:
        seen += len(xb)
        if seen >= 2000:
            break
    input_ips = seen / (time.time() - t)

    bb = build_backbone("efficientnet_lite0", input_size=size)
    model = keras.Model(bb.input, keras.layers.GlobalAveragePooling2D()(bb.output))
    ex = FeatureExtractor(model, engine="openvino")
    t = time.time()
    if mode == "none":  # loading and the input pipeline only (the feature pass takes ~1 h at 100k on 2 cores)
        feats = np.zeros((n, 1))
    elif mode == "extractor":
        feats = ex.compute([bundle.train.x, bundle.val.x])[0]
    else:
        from tuneflow.features.cache import cached_into
        compiled = infer._openvino_model(ex.model, ex.weights_key, ex.memo)
        request, port = compiled.create_infer_request(), compiled.outputs[0]

        def fill(out):
            i = 0
            for batch in infer._batches([bundle.train.x, bundle.val.x], ex.batch_size):
                out[i:i + len(batch)] = request.infer(np.asarray(batch, np.float32))[port]
                i += len(batch)
        feats, _ = cached_into(f"bench-scale-{n}-{size}", (n, int(model.output.shape[-1])), np.float32, fill,
                               enabled=False)
    feat_s = time.time() - t
    assert len(feats) == n and np.isfinite(np.asarray(feats[:64])).all()
    end = Peak.now()
    peak.run = False
    return {"images": n, "size": size, "mode": mode, "engine": ex.used,
            "in_store": isinstance(bundle.train.x, ImageRows), "load_seconds": round(load_s, 1),
            "load_images_per_second": round(n / load_s, 1), "input_pipeline_images_per_second": round(input_ips, 1),
            "feature_seconds": round(feat_s, 1),
            "feature_images_per_second": round(n / feat_s, 1) if mode != "none" else None,
            "rss_anon_after_imports_mb": round(base["RssAnon"] / 1024, 1),
            "rss_anon_after_load_mb": round(after_load["RssAnon"] / 1024, 1),
            "peak_rss_anon_load_mb": round(anon_load / 1024, 1),
            "peak_rss_anon_mb": round(peak.anon / 1024, 1), "peak_rss_file_mb": round(peak.file / 1024, 1),
            "vmhwm_mb": round(end["VmHWM"] / 1024, 1), "cpus": os.cpu_count()}


def main():
    if "--only" in sys.argv:
        i = sys.argv.index("--only")
        print(json.dumps(one(sys.argv[i + 1], int(sys.argv[i + 2]), sys.argv[i + 3])))
        return
    args = sys.argv[1:]
    size = int(args[args.index("--size") + 1]) if "--size" in args else 224
    mode = args[args.index("--feature-mode") + 1] if "--feature-mode" in args else "extractor"
    sizes = [int(a) for i, a in enumerate(args) if a.isdigit() and (i == 0 or not args[i - 1].startswith("--"))]
    sizes = sizes or [2000, 20000]
    out_path = HERE / "results" / "scale.json"
    rows = json.loads(out_path.read_text())["rows"] if out_path.exists() else []
    src_home = Path(os.environ.get("TUNEFLOW_HOME") or Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser()
                    / "tuneflow")
    for n in sizes:
        folder = make_folder(n)
        with tempfile.TemporaryDirectory(dir=WORK) as home:  # a fresh image store per size, deleted after
            if (src_home / "weights").exists():
                os.symlink(src_home / "weights", Path(home) / "weights")  # converted ImageNet weights
            env = dict(os.environ, TUNEFLOW_HOME=home, TF_CPP_MIN_LOG_LEVEL="3")
            cmd = [sys.executable, __file__, "--only", str(folder), str(size), mode]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                sys.exit(done.stderr[-3000:])
            row = json.loads(done.stdout.strip().splitlines()[-1])
        same = ("images", "size", "mode", "in_store")
        rows = [r for r in rows if [r[k] for k in same] != [row[k] for k in same]]
        rows.append(row)
        print(row, flush=True)
        out_path.parent.mkdir(exist_ok=True)
        rows.sort(key=lambda r: (r["mode"], r["images"], r["in_store"]))
        out_path.write_text(json.dumps({"rows": rows}, indent=2))
        if "--keep" not in args:
            shutil.rmtree(folder)
    print("| images | mode | in store | load img/s | input img/s | feature img/s | peak RssAnon MB "
          "| peak RssFile MB | VmHWM MB |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']} | {r['mode']} | {r['in_store']} | {r['load_images_per_second']} | "
              f"{r['input_pipeline_images_per_second']} | {r['feature_images_per_second']} | "
              f"{r['peak_rss_anon_mb']} | {r['peak_rss_file_mb']} | {r['vmhwm_mb']} |")


if __name__ == "__main__":
    main()
