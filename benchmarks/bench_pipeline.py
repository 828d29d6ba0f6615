"""Input-pipeline throughput (images/s) per backend and preset, next to Keras's legacy
ImageDataGenerator doing the same augmentations and to Lite0's training speed, in one run.

    .venv/bin/python benchmarks/bench_pipeline.py [DATA]   (default ../shared/datasets/cats_dogs)
"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = Path(sys.argv[1] if len(sys.argv) > 1 else HERE.parent.parent / "shared" / "datasets" / "cats_dogs")
SIZE, BATCH, IMAGES = 224, 32, 1024  # pixels, batch, images timed per configuration


def timed(ds, images=IMAGES):
    it = iter(ds)
    next(it)  # warm-up: graph tracing, thread pools
    n, t0 = 0, time.time()
    while n < images:
        n += int(next(it)[0].shape[0])
    return n / (time.time() - t0)


def main():
    if not DATA.exists():
        print(f"skip: {DATA} not found")
        return
    from tuneflow.data import load_data
    from tuneflow.data.augment import PRESETS
    from tuneflow.data.pipeline import train_dataset
    bundle = load_data(DATA, SIZE)
    rows = {}
    for backend in ("keras", "albumentations"):
        for preset in PRESETS:
            ds = train_dataset(bundle.train, BATCH, augment=preset, backend=backend, repeat=True)
            rows[f"{backend}/{preset}"] = timed(ds)
            print(f"{backend:15s} {preset:7s} {rows[f'{backend}/{preset}']:8.1f} img/s", flush=True)
    from keras.src.legacy.preprocessing.image import ImageDataGenerator
    for preset, kw in (("light", dict(horizontal_flip=True, zoom_range=(0.9, 1.0))),
                       ("medium", dict(horizontal_flip=True, zoom_range=(0.8, 1.0), rotation_range=10,
                                       brightness_range=(0.85, 1.15)))):
        gen = ImageDataGenerator(**kw).flow(bundle.train.x.astype(np.float32), bundle.train.y, batch_size=BATCH)
        rows[f"ImageDataGenerator/{preset}"] = timed(gen)
        print(f"ImageDataGenerator {preset:7s} {rows[f'ImageDataGenerator/{preset}']:8.1f} img/s", flush=True)
    # what the pipeline must feed: Lite0 training the top 2 blocks (the shape of large_similar's fine-tuning
    # stage; the recipe itself now runs Lite1 at 280 px)
    import keras
    import tuneflow
    from tuneflow.training.heads import build_head
    from tuneflow.backbones import apply_freeze, get_spec
    from tuneflow.recipes import large_similar
    bb = tuneflow.build_backbone("efficientnet_lite0", input_size=SIZE)
    apply_freeze(bb, get_spec("efficientnet_lite0"), "top:2")
    model = keras.Model(bb.input, build_head(bb.output.shape[1:], 2, large_similar, "batch")(bb.output))
    model.compile("adam", "sparse_categorical_crossentropy")
    x, y = bundle.train.x[:BATCH * 9].astype(np.float32), bundle.train.y[:BATCH * 9]
    model.train_on_batch(x[:BATCH], y[:BATCH])
    t0 = time.time()
    for i in range(1, 9):
        model.train_on_batch(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])
    rows["lite0_train_top2"] = 8 * BATCH / (time.time() - t0)
    print(f"Lite0 training (top 2 blocks) {rows['lite0_train_top2']:8.1f} img/s")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "pipeline_cats_dogs.json").write_text(json.dumps({"images_per_second": rows, "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
