"""Linear probes on frozen Lite0 features: how resize mode and input size change what a converged
logistic regression gets (the evidence behind ``resize=crop`` and the 288 px similar recipes).

    .venv/bin/python benchmarks/bench_probe.py DATA [size:resize ...]
    (default configurations: 224:squash 224:crop 288:crop)
"""
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CS = (0.03, 0.1, 0.3, 1.0)  # inverse L2 strengths tried for the logistic regression


def probe(data: Path, size: int, resize: str) -> dict:
    import keras
    from sklearn.linear_model import LogisticRegression

    from tuneflow import build_backbone
    from tuneflow.data import load_data
    from tuneflow.training.distribute import predict
    b = load_data(data, size, resize=resize)
    bb = build_backbone("efficientnet_lite0", input_size=size)
    pooled = keras.Model(bb.input, keras.layers.GlobalAveragePooling2D()(bb.output))
    f = np.asarray(predict(pooled, [b.train.x, b.val.x], 64), np.float32)
    ftr, fva = f[:len(b.train)], f[len(b.train):]
    acc = {C: float(LogisticRegression(C=C, max_iter=5000).fit(ftr, b.train.y).score(fva, b.val.y)) for C in CS}
    return {"size": size, "resize": resize, "val_accuracy_by_C": acc, "best": max(acc.values())}


def main():
    data = Path(sys.argv[1])
    if not data.exists():
        print(f"skip: {data} not found")
        return
    configs = sys.argv[2:] or ["224:squash", "224:crop", "288:crop"]
    rows = []
    for c in configs:
        size, resize = c.split(":")
        rows.append(probe(data, int(size), resize))
        r = rows[-1]
        print(f"{data.name:10s} {r['size']} {r['resize']:6s} " +
              "  ".join(f"C={C}: {a:.4f}" for C, a in r["val_accuracy_by_C"].items()), flush=True)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"probe_{data.name}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
