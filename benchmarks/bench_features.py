"""The frozen-feature pass (most of a cached recipe's wall time): TensorFlow against OpenVINO,
float32 and bfloat16 (where the CPU has AVX512-BF16/AMX), Lite0 pooled features.

Each configuration runs in a fresh process; "first" includes tracing (TensorFlow) or tracing +
conversion + compilation (OpenVINO, nothing cached on disk), "steady" is a second pass.

    .venv/bin/python benchmarks/bench_features.py [N_IMAGES] [SIZE ...]   (default 256, 224 288)
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one(engine: str, policy: str, size: int, n: int) -> dict:
    import keras
    import numpy as np

    from tuneflow import build_backbone
    from tuneflow.features import infer
    from tuneflow.features.cache import weights_digest
    keras.mixed_precision.set_global_policy(policy)
    bb = build_backbone("efficientnet_lite0", input_size=size)
    model = keras.Model(bb.input, keras.layers.GlobalAveragePooling2D()(bb.output))
    x = np.random.default_rng(0).integers(0, 256, (n, size, size, 3)).astype(np.uint8)
    key = weights_digest(model)  # the second pass reuses the first one's conversion
    t = time.time()
    infer.run(model, x, 64, engine, weights_key=key)
    first = time.time() - t
    t = time.time()
    out = infer.run(model, x, 64, engine, weights_key=key)
    steady = time.time() - t
    return {"engine": infer.describe(engine), "size": size, "images": n, "first_seconds": first,
            "steady_seconds": steady, "steady_images_per_second": n / steady, "features": int(out.shape[-1])}


def main():
    if "--only" in sys.argv:
        i = sys.argv.index("--only")
        engine, policy, size, n = sys.argv[i + 1], sys.argv[i + 2], int(sys.argv[i + 3]), int(sys.argv[i + 4])
        print(json.dumps(one(engine, policy, size, n)))
        return
    args = sys.argv[1:]
    n = int(args[0]) if args else 256
    sizes = [int(a) for a in args[1:]] or [224, 288]
    from tuneflow.hardware import cpu_supports_bf16
    policies = ["float32"] + (["mixed_bfloat16"] if cpu_supports_bf16() else [])
    rows = []
    with tempfile.TemporaryDirectory() as home:  # converted weights shared; each line converts anew
        env = dict(os.environ, TUNEFLOW_HOME=home)
        for size in sizes:
            for policy in policies:
                for engine in ("tensorflow", "openvino"):
                    cmd = [sys.executable, __file__, "--only", engine, policy, str(size), str(n)]
                    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(rows[-1], flush=True)
    base = {r["size"]: r["steady_images_per_second"] for r in rows if r["engine"] == "tensorflow/float32"}
    out = {"rows": rows, "cpus": os.cpu_count()}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "features_lite0.json").write_text(json.dumps(out, indent=2))
    print("| engine | size | first pass s | steady img/s | vs TensorFlow float32 |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['engine']} | {r['size']} | {r['first_seconds']:.1f} | {r['steady_images_per_second']:.1f} | "
              f"{r['steady_images_per_second'] / base[r['size']]:.2f}x |")


if __name__ == "__main__":
    main()
