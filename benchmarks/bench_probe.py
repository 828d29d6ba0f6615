"""Linear probes on frozen Lite0 features: how resize mode and input size change what a converged
logistic regression gets (the evidence behind ``resize=crop`` and the 288 px similar recipes),
and (``--probe``) how tuneflow's probe (tuneflow.training.probe) compares with scikit-learn's
default logistic regression at each of the registry's depths.

    .venv/bin/python benchmarks/bench_probe.py DATA [size:resize ...]
    (default configurations: 224:squash 224:crop 288:crop)
    .venv/bin/python benchmarks/bench_probe.py --probe DATA [size:resize ...]   (default 224:crop)
    .venv/bin/python benchmarks/bench_probe.py --backbones DATA [backbone:size ...]
    (the ceiling of linear probing: tuneflow's probe on each backbone's pooled features, with
     horizontal flips as extra training vectors and as test-time averaging, and on pairs of
     backbones' features concatenated; which validation images each gets wrong. Default
     configurations: efficientnet_lite0:288 efficientnet_lite1:240 efficientnet_lite1:280
     efficientnet_lite2:260 efficientnet_lite2:320; JSON in results/probe_backbones_NAME.json)
    .venv/bin/python benchmarks/bench_probe.py --timing DATA [backbone:size ...] [--images N] [--repeats R]
    (the feature pass's speed alone, as runs compute it (FeatureExtractor, engine auto, float32):
     each configuration over the same N training images (default 128), R rounds (default 5) taken
     in turn across the configurations after one untimed warm-up pass each, so a slow spell of the
     machine falls on all of them; median and spread per configuration, and each one's time
     relative to the first. JSON in results/probe_timing_NAME.json)

Timing note: a single wall-clock pass is not a measurement on this kind of machine. On the shared
2-core machine the same pass of 300 images through one model takes either ~6 s or ~10.3 s from one
call to the next (seen for Lite0 288 and Lite1 240 alike, through tuneflow's predict, a plain
tf.function and keras' own predict), which is why the ``extract_seconds`` of the --backbones runs
repeated 10.3 s across different models. --timing is the figure to cite; ``extract_seconds``
(the first pass, including graph tracing and OpenVINO conversion) is kept as what a first run pays.
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
    from tuneflow.features.predict import predict
    b = load_data(data, size, resize=resize)
    bb = build_backbone("efficientnet_lite0", input_size=size)
    pooled = keras.Model(bb.input, keras.layers.GlobalAveragePooling2D()(bb.output))
    f = np.asarray(predict(pooled, [b.train.x, b.val.x], 64), np.float32)
    ftr, fva = f[:len(b.train)], f[len(b.train):]
    acc = {C: float(LogisticRegression(C=C, max_iter=5000).fit(ftr, b.train.y).score(fva, b.val.y)) for C in CS}
    return {"size": size, "resize": resize, "val_accuracy_by_C": acc, "best": max(acc.values())}


SPLITS = 10  # repeated stratified 80/20 splits of train+val: the 49-image val set alone is too noisy


def learn(data: Path, size: int, resize: str) -> dict:
    """fit_probe against scikit-learn's default LogisticRegression at each Lite0 tap: on the
    dataset's own split, and averaged over SPLITS random stratified splits of all its images."""
    import time
    import warnings

    import keras
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedShuffleSplit
    from threadpoolctl import threadpool_limits

    from tuneflow import build_backbone
    from tuneflow.backbones import get_spec
    from tuneflow.data import load_data
    from tuneflow.runs.report import majority_baseline
    from tuneflow.features.predict import predict
    from tuneflow.training.probe import fit_probe
    b = load_data(data, size, resize=resize)
    bb = build_backbone("efficientnet_lite0", input_size=size)
    taps = list(get_spec("efficientnet_lite0").taps)
    pooled = keras.Model(bb.input, [keras.layers.GlobalAveragePooling2D()(bb.get_layer(t).output) for t in taps])
    feats = [np.asarray(f, np.float32) for f in predict(pooled, [b.train.x, b.val.x], 64)]
    n = len(b.train)
    y_all = np.concatenate([b.train.y, b.val.y])

    def sk(xtr, ytr, xte, yte):  # the default, as a user would call it (one BLAS thread, as ours)
        with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"):
            warnings.simplefilter("ignore", ConvergenceWarning)
            return float(LogisticRegression().fit(xtr, ytr).score(xte, yte))

    rows = {}
    for t, f in zip(taps, feats):
        t0 = time.time()
        probe = fit_probe(f[:n], b.train.y)
        fit_s = time.time() - t0
        ours = probe.score(f[n:], b.val.y)
        base = majority_baseline(b.val.y, probe.predict(f[n:]), b.classes)
        rep_ours, rep_sk = [], []
        for tr, te in StratifiedShuffleSplit(SPLITS, test_size=0.2, random_state=0).split(f, y_all):
            rep_ours.append(fit_probe(f[tr], y_all[tr]).score(f[te], y_all[te]))
            rep_sk.append(sk(f[tr], y_all[tr], f[te], y_all[te]))
        rows[t] = {"val_accuracy": ours, "chosen_C": probe.chosen_C, "inner_accuracy": probe.inner_accuracy,
                   "fit_seconds": round(fit_s, 3), "converged": probe.converged,
                   "binomial_p_vs_majority": base["p_value"],
                   "sklearn_default_val_accuracy": sk(f[:n], b.train.y, f[n:], b.val.y),
                   "splits_mean": float(np.mean(rep_ours)), "splits_se": float(np.std(rep_ours) / np.sqrt(SPLITS)),
                   "sklearn_default_splits_mean": float(np.mean(rep_sk)),
                   "sklearn_default_splits_se": float(np.std(rep_sk) / np.sqrt(SPLITS))}
    return {"size": size, "resize": resize, "num_train": n, "num_val": len(b.val),
            "majority_rate": base["majority_rate"], "needed_correct": base["needed_correct"], "taps": rows,
            "best_tap_by_val": max(taps, key=lambda t: rows[t]["val_accuracy"]),
            "best_tap_by_inner": max(taps, key=lambda t: rows[t]["inner_accuracy"] or 0),
            "best_tap_by_splits": max(taps, key=lambda t: rows[t]["splits_mean"])}


def main_learn(args):
    data = Path(args[0])
    if not data.exists():
        print(f"skip: {data} not found")
        return
    rows = []
    for c in args[1:] or ["224:crop"]:
        size, resize = c.split(":")
        r = learn(data, int(size), resize)
        rows.append(r)
        print(f"{data.name} {size} {resize}: {r['num_train']} train / {r['num_val']} val, majority "
              f"{r['majority_rate']:.4f} (binomial test needs {r['needed_correct']} correct)")
        for t, m in r["taps"].items():
            print(f"  {t:20s} probe val {m['val_accuracy']:.4f} (C={m['chosen_C']:g}, inner "
                  f"{m['inner_accuracy']:.4f}, {m['fit_seconds']:.2f} s, p={m['binomial_p_vs_majority']:.3f})"
                  f"  sklearn default val {m['sklearn_default_val_accuracy']:.4f} | {SPLITS} splits: probe "
                  f"{m['splits_mean']:.4f}±{m['splits_se']:.4f}  sklearn {m['sklearn_default_splits_mean']:.4f}"
                  f"±{m['sklearn_default_splits_se']:.4f}", flush=True)
        print(f"  best depth: by val {r['best_tap_by_val']}, by inner folds {r['best_tap_by_inner']}, "
              f"by {SPLITS} splits {r['best_tap_by_splits']}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"probe_learn_{data.name}.json").write_text(json.dumps(rows, indent=2))


def _name(split, i) -> str:
    """A validation image's name: class folder and file (row number for array sources)."""
    if not split.files:
        return f"row {i}"
    f = Path(split.files[i])
    return f"{f.parent.name}/{f.name}"


BACKBONES = ("efficientnet_lite0:288", "efficientnet_lite1:240", "efficientnet_lite1:280", "efficientnet_lite2:260",
             "efficientnet_lite2:320")


def main_backbones(args):
    import time

    import keras

    from tuneflow import build_backbone
    from tuneflow.data import load_data
    from tuneflow.features.predict import predict
    from tuneflow.training.probe import fit_probe
    data = Path(args[0])
    if not data.exists():
        print(f"skip: {data} not found")
        return
    rows, feats = [], {}
    for c in args[1:] or BACKBONES:
        name, size = c.split(":")
        b = load_data(data, int(size), resize="crop")
        bb = build_backbone(name, input_size=int(size))
        pooled = keras.Model(bb.input, keras.layers.GlobalAveragePooling2D()(bb.output))
        t = time.time()
        f = np.asarray(predict(pooled, [b.train.x, b.val.x], 32), np.float32)
        seconds = time.time() - t
        flip = np.asarray(predict(pooled, [b.train.x[:, :, ::-1], b.val.x[:, :, ::-1]], 32), np.float32)
        n, ytr, yva = len(b.train), b.train.y, b.val.y
        feats[c] = (f[:n], f[n:])
        plain = fit_probe(f[:n], ytr)
        both = fit_probe(np.concatenate([f[:n], flip[:n]]), np.concatenate([ytr, ytr]))
        tta = (both.predict_proba(f[n:]) + both.predict_proba(flip[n:])) / 2
        pred = plain.predict(f[n:])
        row = {"config": c, "extract_seconds": round(seconds, 1), "images_per_second": round(len(f) / seconds, 1),
               "probe_val_accuracy": plain.score(f[n:], yva), "chosen_C": plain.chosen_C,
               "inner_accuracy": plain.inner_accuracy,
               "flip_train_val_accuracy": both.score(f[n:], yva),
               "flip_train_and_tta_val_accuracy": float(np.mean(tta.argmax(1) == yva)),
               "wrong": sorted(_name(b.val, i) for i in np.where(pred != yva)[0])}
        rows.append(row)
        print(f"{c}: features {seconds:.1f} s ({row['images_per_second']} img/s); probe val "
              f"{row['probe_val_accuracy']:.4f} (C={plain.chosen_C:g}, inner {plain.inner_accuracy:.3f}); "
              f"+flipped training vectors {row['flip_train_val_accuracy']:.4f}; +flip test-time average "
              f"{row['flip_train_and_tta_val_accuracy']:.4f}; {len(row['wrong'])} wrong", flush=True)
    keys = list(feats)
    pairs = []
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            (a_tr, a_va), (b_tr, b_va) = feats[keys[i]], feats[keys[j]]
            p = fit_probe(np.concatenate([a_tr, b_tr], 1), ytr)
            pairs.append({"configs": [keys[i], keys[j]], "val_accuracy": p.score(np.concatenate([a_va, b_va], 1), yva),
                          "inner_accuracy": p.inner_accuracy})
            print(f"concatenated {keys[i]} + {keys[j]}: val {pairs[-1]['val_accuracy']:.4f} "
                  f"(inner {p.inner_accuracy:.3f})", flush=True)
    wrong_everywhere = sorted(set.intersection(*(set(r["wrong"]) for r in rows))) if rows else []
    print(f"wrong under every backbone: {len(wrong_everywhere)}: {wrong_everywhere}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    if wrong_everywhere:  # what they look like: a person judges at a glance whether they can be learned
        from tuneflow.runs.pictures import image_grid
        names = [_name(b.val, i) for i in range(len(b.val))]
        idx = [names.index(w) for w in wrong_everywhere]
        png = image_grid([b.val.x[i] for i in idx], [f"{w}\nlabelled {b.classes[yva[i]]}" for w, i in zip(wrong_everywhere, idx)],
                         out / f"probe_backbones_{data.name}_wrong.png",
                         title=f"{data.name}: validation images every probe gets wrong", cols=len(idx))
        print(png)
    (out / f"probe_backbones_{data.name}.json").write_text(json.dumps(
        {"command": "benchmarks/bench_probe.py --backbones " + " ".join(args), "rows": rows, "concatenated": pairs,
         "num_val": int(len(yva)), "wrong_under_every_backbone": wrong_everywhere}, indent=2))


def main_timing(args):
    """Interleaved, repeated timing of the feature pass for each backbone:size configuration."""
    import statistics
    import time

    import keras

    from tuneflow import build_backbone
    from tuneflow.data import load_data
    from tuneflow.features.extractor import FeatureExtractor
    images, repeats = 128, 5
    rest = []
    it = iter(args)
    for a in it:
        if a == "--images":
            images = int(next(it))
        elif a == "--repeats":
            repeats = int(next(it))
        else:
            rest.append(a)
    data = Path(rest[0])
    if not data.exists():
        print(f"skip: {data} not found")
        return
    configs = rest[1:] or list(BACKBONES)
    runners = {}
    for c in configs:
        name, size = c.split(":")
        b = load_data(data, int(size), resize="crop")
        x = np.asarray(b.train.x[:images])
        bb = build_backbone(name, input_size=int(size))
        pooled = keras.Model(bb.input, keras.layers.GlobalAveragePooling2D()(bb.output))
        ext = FeatureExtractor(pooled, "auto", precision="float32")
        t = time.perf_counter()
        ext.run(x)  # warm-up: tracing, OpenVINO conversion and compilation
        runners[c] = {"ext": ext, "x": x, "warmup_seconds": time.perf_counter() - t, "times": []}
        print(f"{c}: warm-up {runners[c]['warmup_seconds']:.1f} s ({ext.used})", flush=True)
    for r in range(repeats):
        for c, run in runners.items():
            t = time.perf_counter()
            run["ext"].run(run["x"])
            run["times"].append(time.perf_counter() - t)
        print(f"round {r + 1}: " + ", ".join(f"{c} {run['times'][-1]:.2f} s" for c, run in runners.items()), flush=True)
    first = statistics.median(runners[configs[0]]["times"])
    rows = []
    for c, run in runners.items():
        med = statistics.median(run["times"])
        rows.append({"config": c, "engine": run["ext"].used, "images": int(len(run["x"])),
                     "median_seconds": round(med, 3), "min_seconds": round(min(run["times"]), 3),
                     "max_seconds": round(max(run["times"]), 3), "repeats_seconds": [round(t, 3) for t in run["times"]],
                     "images_per_second": round(len(run["x"]) / med, 1), "relative_to_first": round(med / first, 2),
                     "warmup_seconds": round(run["warmup_seconds"], 2)})
        print(f"{c}: median {med:.2f} s for {len(run['x'])} images ({rows[-1]['images_per_second']} img/s, "
              f"{rows[-1]['relative_to_first']}x the first), min {min(run['times']):.2f}, max {max(run['times']):.2f}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"probe_timing_{data.name}.json").write_text(json.dumps(
        {"command": "benchmarks/bench_probe.py --timing " + " ".join(args), "rows": rows}, indent=2))


def main():
    if sys.argv[1:2] == ["--timing"]:
        return main_timing(sys.argv[2:])
    if sys.argv[1:2] == ["--probe"]:
        return main_learn(sys.argv[2:])
    if sys.argv[1:2] == ["--backbones"]:
        return main_backbones(sys.argv[2:])
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
