"""Memory and speed against dataset size: synthetic JPEG folders of 2k, 20k (100k) images, each
loaded and run through the Lite0 feature pass (OpenVINO, as the recipes run it on a CPU) in a
fresh process.

Per size: peak RSS (VmHWM) and peak RssAnon (the process's own memory; RssFile, pages of mapped
files, is the kernel's evictable cache), sampled every 50 ms; images/s of loading (decode +
resize into the store) and of the feature pass; images/s of the training input pipeline
(gather + medium augmentation, no model) over 2,000 images after 3 warm-up batches.

    .venv/bin/python benchmarks/bench_scale.py [N ...]          (default 2000 20000)
        --size 224 --feature-mode streamed|extractor|none --keep (keep the generated folders)
    TUNEFLOW_INMEMORY_MAX_BYTES=1 .venv/bin/python benchmarks/bench_scale.py 2000   (store forced)
    .venv/bin/python benchmarks/bench_scale.py 2000 100000 --recipes small_similar --size 96 \
        --set head_solver=sgd --set head.epochs=2     (whole recipes: ``tuneflow.finetune``)

``extractor``: ``FeatureExtractor.compute`` (features gathered in RAM); ``streamed``: what the
cached recipes run, ``FeatureExtractor.compute_into`` writing each batch of one train+val pass into
``features.cache.cached_into`` files; ``none``: no feature pass.
JSON in benchmarks/results/scale.json (rows merged by size and mode).

``--paths DATA [--rounds 3]``: the in-memory and the store path on one real folder (the store forced
with TUNEFLOW_INMEMORY_MAX_BYTES=1), alternated in fresh processes with fresh stores, ``--rounds``
times each at 224 px without a feature pass: load, input-pipeline and fine-tuning images/s per run
(``train_throughput``: Lite0's top 2 blocks and head trained on batches from that path), their
medians, the store/RAM ratios and input pipeline / training; JSON in benchmarks/results/paths_<data>.json.

``--gather``: random 32-row batches gathered from RAM and from a store file (``gather_speed``).

``--recipes NAME,...``: each recipe run whole (``tuneflow.finetune``, ImageNet weights, ``--set``
overrides passed on) on each folder in a fresh process: wall time, val accuracy, peak RssAnon and
VmHWM; rows in benchmarks/results/scale_recipes.json (merged by recipe, size and overrides).
"""
import contextlib
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
WARM_BATCHES = 3  # input pipeline: batches drawn before timing starts
INPUT_IMAGES = 2000  # input pipeline: images timed after those


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


TRAIN_STEPS, TRAIN_WARM = 24, 3  # fine-tuning throughput: steps timed, after these untimed ones


def train_throughput(bundle, size: int) -> float:
    """Images/s of fine-tuning steps (Lite0 at ``size``, top 2 blocks and a linear head trained,
    batch 32, ImageNet weights) fed by ``train_dataset`` over ``bundle.train`` with medium
    augmentation: what a fine-tuning epoch runs at on this input path."""
    import keras

    from tuneflow import build_backbone
    from tuneflow.backbones import apply_freeze, get_spec
    from tuneflow.data.pipeline import train_dataset
    from tuneflow.recipes import large_similar
    from tuneflow.training.heads import build_head
    bb = build_backbone("efficientnet_lite0", input_size=size)
    apply_freeze(bb, get_spec("efficientnet_lite0"), "top:2")
    k = int(bundle.train.y.max()) + 1
    model = keras.Model(bb.input, build_head(bb.output.shape[1:], k, large_similar, "batch")(bb.output))
    model.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy")
    ds = train_dataset(bundle.train, 32, augment="medium", seed=0, repeat=True)
    model.fit(ds, steps_per_epoch=TRAIN_WARM, epochs=1, verbose=0)  # tracing, thread pools
    t = time.time()
    model.fit(ds, steps_per_epoch=TRAIN_STEPS, epochs=1, verbose=0)
    return TRAIN_STEPS * 32 / (time.time() - t)


def one(folder: str, size: int, mode: str) -> dict:
    peak = Peak()
    import keras
    import numpy as np

    from tuneflow import build_backbone
    from tuneflow.data import ImageRows, load_data
    from tuneflow.data.pipeline import train_dataset
    from tuneflow.features.extractor import FeatureExtractor
    base = Peak.now()
    t = time.time()
    bundle = load_data(folder, size)
    load_s = time.time() - t
    n = len(bundle.train) + len(bundle.val)
    after_load = Peak.now()
    anon_load = peak.anon

    ds = iter(train_dataset(bundle.train, 32, augment="medium", seed=0, repeat=True))
    for _ in range(WARM_BATCHES):  # tracing and the first fill of the prefetch buffers: not throughput
        next(ds)
    t, seen = time.time(), 0
    while seen < INPUT_IMAGES:
        seen += len(next(ds)[0])
    input_ips = seen / (time.time() - t)

    train_ips = None
    if mode == "train":  # a fine-tuning epoch fed by this path: Lite0's top 2 blocks + head, medium augmentation
        train_ips = train_throughput(bundle, size)
    bb = build_backbone("efficientnet_lite0", input_size=size)
    model = keras.Model(bb.input, keras.layers.GlobalAveragePooling2D()(bb.output))
    ex = FeatureExtractor(model, engine="openvino")
    t = time.time()
    if mode in ("none", "train"):  # loading and the input pipeline only (the feature pass takes ~1 h at 100k on 2 cores)
        feats = np.zeros((n, 1))
    elif mode == "extractor":
        feats = ex.compute([bundle.train.x, bundle.val.x])[0]
    else:  # what the cached recipes run (cached.cached_features): each batch written into its file
        from tuneflow.features.cache import cached_into
        dims, got = int(model.output.shape[-1]), {}

        def fill_train(out_tr):
            got["val"] = cached_into(f"bench-scale-val-{n}-{size}", (1, len(bundle.val), dims), np.float32,
                                     lambda out_va: ex.compute_into([out_tr, out_va], [bundle.train.x, bundle.val.x]),
                                     enabled=False)[0]
        ftr, _ = cached_into(f"bench-scale-train-{n}-{size}", (1, len(bundle.train), dims), np.float32, fill_train,
                             enabled=False)
        feats = [ftr[0][:64], got["val"][0]]
        n_feats = len(ftr[0]) + len(got["val"][0])
    feat_s = time.time() - t
    if mode != "streamed":
        n_feats, feats = len(feats), [feats[:64]]
    assert n_feats == n and all(np.isfinite(np.asarray(f[:64])).all() for f in feats)
    end = Peak.now()
    peak.run = False
    return {"images": n, "size": size, "mode": mode, "engine": ex.used,
            "in_store": isinstance(bundle.train.x, ImageRows), "load_seconds": round(load_s, 1),
            "load_images_per_second": round(n / load_s, 1), "input_pipeline_images_per_second": round(input_ips, 1),
            "feature_seconds": round(feat_s, 1),
            "feature_images_per_second": round(n / feat_s, 1) if mode not in ("none", "train") else None,
            "train_images_per_second": round(train_ips, 1) if train_ips else None,
            "rss_anon_after_imports_mb": round(base["RssAnon"] / 1024, 1),
            "rss_anon_after_load_mb": round(after_load["RssAnon"] / 1024, 1),
            "peak_rss_anon_load_mb": round(anon_load / 1024, 1),
            "peak_rss_anon_mb": round(peak.anon / 1024, 1), "peak_rss_file_mb": round(peak.file / 1024, 1),
            "vmhwm_mb": round(end["VmHWM"] / 1024, 1), "cpus": os.cpu_count()}


def one_recipe(folder: str, size: int, recipe: str, sets: list[str]) -> dict:
    peak = Peak()
    import logging

    from tuneflow import finetune
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    overrides = [f"input_size={size}"] + list(sets)
    t = time.time()
    with tempfile.TemporaryDirectory(dir=WORK) as out:
        res = finetune(recipe, folder, Path(out) / "run", overrides=overrides, verbose=0)
    wall = time.time() - t
    end = Peak.now()
    peak.run = False
    rep = res.report
    return {"recipe": recipe, "train_images": int(sum(rep["train_counts"].values())),
            "size": size, "overrides": " ".join(sets), "seconds": round(wall, 1),
            "val_accuracy": rep.get("val_accuracy"), "peak_rss_anon_mb": round(peak.anon / 1024, 1),
            "peak_rss_file_mb": round(peak.file / 1024, 1), "vmhwm_mb": round(end["VmHWM"] / 1024, 1),
            "cpus": os.cpu_count()}


def recipes_main(args, sizes, size):
    names = args[args.index("--recipes") + 1].split(",")
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    out_path = HERE / "results" / "scale_recipes.json"
    rows = json.loads(out_path.read_text())["rows"] if out_path.exists() else []
    for n in sizes:
        folder = make_folder(n)
        for name in names:
            with _fresh_home() as env:  # fresh image store and feature cache
                cmd = [sys.executable, __file__, "--only-recipe", str(folder), str(size), name] + sets
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                log_path = WORK / f"recipe_{name}_{n}.log"  # the run's log, for reading
                log_path.write_text(done.stderr[-20000:])
                if done.returncode:
                    sys.exit(done.stderr[-3000:])
                row = {"images": n, **json.loads(done.stdout.strip().splitlines()[-1])}
            same = ("recipe", "images", "size", "overrides")
            rows = [r for r in rows if [r.get(k) for k in same] != [row[k] for k in same]]
            rows.append(row)
            print(row, flush=True)
            rows.sort(key=lambda r: (r["recipe"], r["size"], r["images"]))
            out_path.write_text(json.dumps({"rows": rows}, indent=2))
    print("| recipe | images | size | overrides | seconds | val acc | peak RssAnon MB | VmHWM MB |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['images']} | {r['size']} | {r['overrides']} | {r['seconds']} | "
              f"{r['val_accuracy']} | {r['peak_rss_anon_mb']} | {r['vmhwm_mb']} |")


@contextlib.contextmanager
def _fresh_home(extra_env: dict | None = None):
    """The environment of a fresh process with a fresh TUNEFLOW_HOME (no image store, no feature
    cache; the converted ImageNet weights linked in), deleted afterwards."""
    src_home = Path(os.environ.get("TUNEFLOW_HOME") or Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser()
                    / "tuneflow")
    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORK) as home:
        if (src_home / "weights").exists():
            os.symlink(src_home / "weights", Path(home) / "weights")
        yield dict(os.environ, TUNEFLOW_HOME=home, TF_CPP_MIN_LOG_LEVEL="3", **(extra_env or {}))


def _fresh_run(folder: str, size: int, mode: str, extra_env: dict | None = None) -> dict:
    """``one`` in a fresh process with a fresh TUNEFLOW_HOME."""
    with _fresh_home(extra_env) as env:
        done = subprocess.run([sys.executable, __file__, "--only", folder, str(size), mode],
                              capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def gather_speed(n: int = 3000, size: int = 224, batches: int = 300) -> dict:
    """Random 32-row batches gathered (what the input pipeline does per batch) from ``n`` rows of
    ``size`` px uint8 in RAM and from the same rows in a store file read by ``ImageRows`` (the file
    in the page cache), alternated twice; images/s of each run."""
    import numpy as np

    from tuneflow.data.store import ImageRows
    x = np.random.default_rng(0).integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORK) as d:
        np.save(Path(d) / "rows.npy", x)
        rows = ImageRows(np.load(Path(d) / "rows.npy", mmap_mode="r"), None, str(Path(d) / "rows.npy"))
        rng, out = np.random.default_rng(1), {"ram": [], "store": []}
        for name, src in (("ram", x), ("store", rows)) * 2:
            t = time.time()
            for _ in range(batches):
                src[rng.choice(n, 32, replace=False)]
            out[name].append(round(batches * 32 / (time.time() - t)))
        del rows
    return {"command": "benchmarks/bench_scale.py --gather", "rows": n, "size": size,
            "images_per_second": out}


def summarize_paths(rows: list[dict]) -> dict:
    """Medians per path (load, input pipeline, VmHWM) and store / RAM ratios. Fine-tuning steps
    are summarised by the best run per path: some runs, on either path, ran their 24 timed steps
    at exactly half speed (37.4 img/s, 20.5 s) although the same code in one process does not,
    a stall from outside the input path that a median over 3-5 runs does not absorb."""
    import statistics
    med = {p: {k: statistics.median(x[k] for x in rows if x["path"] == p)
               for k in ("load_images_per_second", "input_pipeline_images_per_second", "vmhwm_mb")}
           for p in ("ram", "store")}
    best = {p: max(x["train_images_per_second"] for x in rows if x["path"] == p) for p in med}
    ratio = {k: round(med["store"][k] / med["ram"][k], 3) for k in med["ram"]}
    ratio["train_images_per_second_best"] = round(best["store"] / best["ram"], 3)
    return {"medians": med, "train_images_per_second_best": best, "store_over_ram": ratio,
            "input_pipeline_over_training": {p: round(med[p]["input_pipeline_images_per_second"] / best[p], 2)
                                             for p in med}}


def paths_main(args):
    data = str(Path(args[args.index("--paths") + 1]).resolve())
    rounds = int(args[args.index("--rounds") + 1]) if "--rounds" in args else 3
    rows = []
    for r in range(1, rounds + 1):
        for path, env in (("ram", {}), ("store", {"TUNEFLOW_INMEMORY_MAX_BYTES": "1"})):
            row = {**_fresh_run(data, 224, "train", env), "round": r, "path": path}
            if row["in_store"] != (path == "store"):
                sys.exit(f"{path} run came back with in_store={row['in_store']}: the threshold did not apply")
            rows.append(row)
            print({k: row[k] for k in ("round", "path", "load_images_per_second",
                                       "input_pipeline_images_per_second", "train_images_per_second",
                                       "vmhwm_mb")}, flush=True)
    out = {"command": "benchmarks/bench_scale.py " + " ".join(args), "data": data,
           **summarize_paths(rows), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()], "rows": rows}
    target = HERE / "results" / f"paths_{Path(data).name}.json"
    target.write_text(json.dumps(out, indent=2))
    print(f"over {rounds} rounds: {json.dumps({k: v for k, v in out.items() if k != 'rows'})} -> {target}")


def main():
    if "--only-recipe" in sys.argv:
        i = sys.argv.index("--only-recipe")
        print(json.dumps(one_recipe(sys.argv[i + 1], int(sys.argv[i + 2]), sys.argv[i + 3], sys.argv[i + 4:])))
        return
    if "--only" in sys.argv:
        i = sys.argv.index("--only")
        print(json.dumps(one(sys.argv[i + 1], int(sys.argv[i + 2]), sys.argv[i + 3])))
        return
    args = sys.argv[1:]
    if "--paths" in args:
        return paths_main(args)
    if "--gather" in args:
        return print(json.dumps(gather_speed()))
    size = int(args[args.index("--size") + 1]) if "--size" in args else 224
    mode = args[args.index("--feature-mode") + 1] if "--feature-mode" in args else "streamed"
    sizes = [int(a) for i, a in enumerate(args) if a.isdigit() and (i == 0 or not args[i - 1].startswith("--"))]
    sizes = sizes or [2000, 20000]
    if "--recipes" in args:
        return recipes_main(args, sizes, size)
    out_path = HERE / "results" / "scale.json"
    rows = json.loads(out_path.read_text())["rows"] if out_path.exists() else []
    for n in sizes:
        folder = make_folder(n)
        row = _fresh_run(str(folder), size, mode)  # a fresh image store per size, deleted after
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
