"""small_similar vs the Keras transfer-learning guide's recipe, same backbone and data, one process.

The baseline is written as a user following the guide would: image_dataset_from_directory,
flip + rotation layers, the frozen base called with training=False, GAP, dropout 0.2, Dense,
Adam 1e-3, 10 epochs over the images. tuneflow runs with a cold feature cache.

    .venv/bin/python benchmarks/bench_recipes.py [DATA]   (default ../shared/datasets/ants_bees)
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path(sys.argv[1] if len(sys.argv) > 1 else HERE.parent.parent / "shared" / "datasets" / "ants_bees")


def baseline(data: Path) -> dict:
    import keras
    import tuneflow
    t0 = time.time()
    kw = dict(image_size=(224, 224), batch_size=32, label_mode="int", seed=0)
    train = keras.utils.image_dataset_from_directory(data / "train", shuffle=True, **kw)
    val = keras.utils.image_dataset_from_directory(data / "val", shuffle=False, **kw)
    aug = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.1)])
    base = tuneflow.build_backbone("efficientnet_lite0")  # preprocessing inside, as the guide's Xception
    base.trainable = False
    inputs = keras.Input((224, 224, 3))
    x = base(aug(inputs), training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(2, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    hist = model.fit(train, validation_data=val, epochs=10, verbose=2)
    return {"val_accuracy": float(hist.history["val_accuracy"][-1]), "wall_seconds": time.time() - t0}


def ours(data: Path) -> dict:
    import tuneflow
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TUNEFLOW_HOME"] = str(Path(tmp) / "home")  # cold: weights converted, cache filled
        t0 = time.time()
        res = tuneflow.finetune("small_similar", str(data), str(Path(tmp) / "run"), verbose=0)
        cold = {"val_accuracy": res.report["val_accuracy"], "wall_seconds": time.time() - t0}
        t0 = time.time()
        res = tuneflow.finetune("small_similar", str(data), str(Path(tmp) / "run2"), verbose=0)
        warm = {"val_accuracy": res.report["val_accuracy"], "wall_seconds": time.time() - t0}
        # A new dataset on a machine that has run tuneflow before: weights converted, no features.
        import shutil
        shutil.rmtree(Path(tmp) / "home" / "features")
        t0 = time.time()
        res = tuneflow.finetune("small_similar", str(data), str(Path(tmp) / "run3"), verbose=0)
        new_data = {"val_accuracy": res.report["val_accuracy"], "wall_seconds": time.time() - t0}
    return {"cold": cold, "new_data": new_data, "warm": warm}


def main():
    if not DATA.exists():
        print(f"skip: {DATA} not found")
        return
    b = baseline(DATA)
    o = ours(DATA)
    result = {"data": str(DATA.name), "baseline_keras_guide": b, "tuneflow_small_similar": o,
              "speedup_cold": b["wall_seconds"] / o["cold"]["wall_seconds"],
              "speedup_warm": b["wall_seconds"] / o["warm"]["wall_seconds"],
              "speedup_new_data": b["wall_seconds"] / o["new_data"]["wall_seconds"], "cpus": os.cpu_count()}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"recipes_{DATA.name}.json").write_text(json.dumps(result, indent=2))
    print("| run | val accuracy | wall s | speed-up |\n| --- | --- | --- | --- |")
    print(f"| Keras guide baseline | {b['val_accuracy']:.4f} | {b['wall_seconds']:.1f} | 1.0x |")
    for k in ("cold", "new_data", "warm"):
        print(f"| tuneflow small_similar ({k}) | {o[k]['val_accuracy']:.4f} | "
              f"{o[k]['wall_seconds']:.1f} | {result['speedup_' + k]:.1f}x |")


if __name__ == "__main__":
    main()
