"""TensorFlow training speed by precision on this CPU: Lite0 with its top 2 blocks trainable (the
large_similar fine-tuning stage's shape; the recipe now runs Lite1), 224 px, batch 32, random pixels, after one warm-up fit.
Each measurement in a fresh process; rounds alternate the policies, the fastest of each is kept.

    .venv/bin/python benchmarks/bench_precision.py [ROUNDS]   (default 2)
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = 8


def one(policy: str) -> dict:
    import keras
    import numpy as np
    keras.mixed_precision.set_global_policy(policy)
    from tuneflow import build_backbone
    bb = build_backbone("efficientnet_lite0", input_size=224, train="top:2")
    out = keras.layers.Dense(2, activation="softmax", dtype="float32")(
        keras.layers.GlobalAveragePooling2D()(bb.output))
    model = keras.Model(bb.input, out)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).integers(0, 256, (32 * STEPS, 224, 224, 3)).astype(np.float32)
    y = np.arange(len(x)) % 2
    model.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0)  # tracing and kernel set-up
    t = time.time()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    return {"policy": policy, "train_images_per_second": len(x) / (time.time() - t)}


def main():
    if "--only" in sys.argv:
        print(json.dumps(one(sys.argv[sys.argv.index("--only") + 1])))
        return
    from tuneflow.hardware import cpu_supports_bf16
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    policies = ["float32"] + (["mixed_bfloat16"] if cpu_supports_bf16() else [])
    samples = {p: [] for p in policies}
    for _ in range(rounds):
        for p in policies:
            done = subprocess.run([sys.executable, __file__, "--only", p], capture_output=True, text=True, check=True)
            samples[p].append(json.loads(done.stdout.strip().splitlines()[-1])["train_images_per_second"])
    best = {p: max(v) for p, v in samples.items()}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "precision_training.json").write_text(
        json.dumps({"best": best, "samples": samples, "cpus": os.cpu_count()}, indent=2))
    print("| policy | training img/s (best of rounds) | vs float32 |\n| --- | --- | --- |")
    for p in policies:
        print(f"| {p} | {best[p]:.1f} | {best[p] / best['float32']:.2f}x |")


if __name__ == "__main__":
    main()
