"""Head input on cached features: ``from_tensor_slices`` + tf.data shuffle against the NumPy
generator that gathers each batch by index (cached.cached_dataset's two paths), seconds an epoch.

    .venv/bin/python benchmarks/bench_head_input.py [N ...]      (default 2000 10000 20000)

1280-d float32 vectors (Lite0's pooled features), batch 32, shuffled; mean of 3 epochs after one
warm-up. Decides ``cached.SLICES_MAX_BYTES``.
"""
import sys
import time
from types import SimpleNamespace

import numpy as np

import tuneflow.training.stages as st


def main():
    sizes = [int(a) for a in sys.argv[1:]] or [2000, 10000, 20000]
    plan = SimpleNamespace(global_batch=32, class_weights=None, replicas=1, recipe=SimpleNamespace(sampling="shuffle"))
    print("| vectors | MB | from_tensor_slices s/epoch | generator s/epoch |\n|---|---|---|---|")
    for n in sizes:
        x = np.random.default_rng(0).normal(size=(n, 1280)).astype(np.float32)
        y = (np.arange(n) % 10).astype(np.int32)
        got = []
        for limit in (1 << 40, 0):  # every array through slices; none
            st.SLICES_MAX_BYTES = limit
            ds, _ = st.cached_dataset(plan, x, y, 0)
            for _ in ds:
                pass
            t = time.time()
            for _ in range(3):
                for _ in ds:
                    pass
            got.append((time.time() - t) / 3)
        print(f"| {n} | {x.nbytes / 2**20:.0f} | {got[0]:.3f} | {got[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
