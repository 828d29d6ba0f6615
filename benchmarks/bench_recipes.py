"""small_similar vs the Keras transfer-learning guide's recipe, same backbone and data, one process.

The baseline is written as a user following the guide would: image_dataset_from_directory,
flip + rotation layers, the frozen base called with training=False, GAP, dropout 0.2, Dense,
Adam 1e-3, 10 epochs over the images. tuneflow runs cold (weights converted, feature cache
empty), on a new dataset (weights converted before, no features) and warm (features cached).
Each side runs in a fresh process; wall time is measured inside, after the imports.

    .venv/bin/python benchmarks/bench_recipes.py [DATA]   (default ../shared/datasets/ants_bees)
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path(sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--")
            else HERE.parent.parent / "shared" / "datasets" / "ants_bees")


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
    hist = model.fit(train, validation_data=val, epochs=10, verbose=0)
    return {"val_accuracy": float(hist.history["val_accuracy"][-1]), "wall_seconds": time.time() - t0}


def one_run(data: Path, out: Path) -> dict:
    import tuneflow
    t0 = time.time()
    res = tuneflow.finetune("small_similar", str(data), str(out), verbose=0)
    return {"val_accuracy": res.report["val_accuracy"], "wall_seconds": time.time() - t0}


def ours(data: Path) -> dict:
    """Three fresh processes sharing one TUNEFLOW_HOME: cold, then a new dataset, then warm."""
    import shutil
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        cold = _in_fresh_process("tuneflow", home, Path(tmp) / "run1")  # weights converted, cache filled
        shutil.rmtree(home / "features")  # as if the data were new: converted weights, no features
        new_data = _in_fresh_process("tuneflow", home, Path(tmp) / "run2")
        warm = _in_fresh_process("tuneflow", home, Path(tmp) / "run3")
    return {"cold": cold, "new_data": new_data, "warm": warm}


def _in_fresh_process(which: str, home: Path | None = None, out: Path | None = None) -> dict:
    """Each run in its own process, as a user runs it: in one shared process the leftovers of
    earlier runs (tf.data threads, graphs) measurably slowed whatever ran next."""
    import subprocess
    env = dict(os.environ, **({"TUNEFLOW_HOME": str(home)} if home else {}))
    cmd = [sys.executable, __file__, str(DATA), "--only", which] + ([str(out)] if out else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    if not DATA.exists():
        print(f"skip: {DATA} not found")
        return
    if "--only" in sys.argv:
        which = sys.argv[sys.argv.index("--only") + 1]
        print(json.dumps(baseline(DATA) if which == "baseline" else
                         one_run(DATA, Path(sys.argv[sys.argv.index("--only") + 2]))))
        return
    # Rounds alternate the contenders; each figure is the fastest of its rounds (the machine is
    # shared and noisy; the fastest run is the one least disturbed). All samples go in the JSON.
    rounds = int(os.environ.get("BENCH_ROUNDS", "2"))
    samples_b, samples_o = [], []
    for _ in range(rounds):
        samples_b.append(_in_fresh_process("baseline"))
        samples_o.append(ours(DATA))
    b = min(samples_b, key=lambda r: r["wall_seconds"])
    o = {k: min((r[k] for r in samples_o), key=lambda r: r["wall_seconds"]) for k in samples_o[0]}
    result = {"data": str(DATA.name), "baseline_keras_guide": b, "tuneflow_small_similar": o,
              "rounds": rounds, "samples": {"baseline": samples_b, "tuneflow": samples_o},
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
