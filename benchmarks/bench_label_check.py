"""The doctor's label check: its hand-written confident learning against cleanlab's
``find_label_issues`` and against flagging every image the probe misclassifies, on planted flips.

    .venv/bin/python benchmarks/bench_label_check.py [--sets synthetic ants_bees ...] [--rates 0.05 0.1 0.2]
        [--seeds 0 1 2] [--jobs 2] [--out benchmarks/results/label_check.json]

Each set goes through the doctor's own path once (``small_similar``, the doctor's subsample of
at most 600 images, the frozen backbone's pooled features via ``doctor.label_features``; the
features are kept in ``$TUNEFLOW_HOME/bench_label_check/``). Then, for each noise rate and seed,
that share of the labels is flipped to another class drawn uniformly, the doctor's out-of-fold
probabilities (``doctor.out_of_fold_probs``: the same linear probe, the same 5 folds) are computed
on the noisy labels, and every method flags images from the same probabilities. A flag is right
when it names a planted flip: precision, recall and F1 of the flagged set against the flips. The
real sets' own label mistakes, if any, count against every method alike.

Methods:
- ``handwritten``: the confident-learning rule the doctor carried (threshold t_j = the mean p_j of
  the images labelled j; flag p_i < t_i with another class k at p_k >= t_k).
- ``cleanlab``: ``cleanlab.filter.find_label_issues`` at its defaults (``prune_by_noise_rate``).
- ``cleanlab_cl``: the same with ``filter_by="confident_learning"`` (the confident joint's
  off-diagonal, no pruning by the estimated noise rate).
- ``argmax``: flag every image whose out-of-fold predicted class differs from its label.

Default sets: ``synthetic`` is the doctor tests' planted-fault image generator (tests/conftest.py
``make_image_folder``: a coloured shape per class) with 5 classes x 40 images at the tests' 32 px;
``digits`` is data/digits (10 classes x 30); ``ants_bees`` and ``brain_mri_yn`` are
../shared/datasets (2 classes each), skipped when absent; ``--sets ... cats_dogs`` adds 600 of
its 3,000 images. Real ImageNet Lite0 weights (the offline package) throughout.
"""
import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
from cleanlab.filter import find_label_issues

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared" / "datasets"
METHODS = ("handwritten", "cleanlab", "cleanlab_cl", "argmax")


def handwritten(probs, y):
    """The doctor's hand-written rule before this benchmark (tuneflow 5a82f47..88a4d14)."""
    k = probs.shape[1]
    self_conf = probs[np.arange(len(y)), y]
    t = np.array([probs[y == j, j].mean() if np.any(y == j) else 1.0 for j in range(k)])
    other = probs >= t[None, :]
    other[np.arange(len(y)), y] = False
    flagged = np.where((self_conf < t[y]) & other.any(1))[0]
    return flagged[np.argsort(self_conf[flagged])]


def flag(method, probs, y):
    if method == "handwritten":
        return handwritten(probs, y)
    if method == "cleanlab":
        return find_label_issues(y, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    if method == "cleanlab_cl":
        return find_label_issues(y, probs, filter_by="confident_learning",
                                 return_indices_ranked_by="self_confidence", n_jobs=1)
    if method == "argmax":
        return np.where(probs.argmax(1) != y)[0]
    raise ValueError(method)


def plant(y, k, rate, seed):
    """(noisy labels, indices flipped): round(rate * n) labels moved to another class, uniformly."""
    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.choice(len(y), int(round(rate * len(y))), replace=False))
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, k, len(flipped))) % k
    return noisy, flipped


def score(flagged, flipped, seconds):
    hit = len(np.intersect1d(flagged, flipped))
    p = hit / len(flagged) if len(flagged) else 0.0
    r = hit / len(flipped) if len(flipped) else 1.0
    return {"flagged": int(len(flagged)), "hits": int(hit), "precision": p, "recall": r,
            "f1": 2 * p * r / (p + r) if p + r else 0.0, "seconds": seconds}


def features(name):
    """(features, labels, classes) of a set through the doctor's label path, cached on disk."""
    from tuneflow.home import tuneflow_home
    cache = tuneflow_home() / "bench_label_check" / f"{name}.npz"
    if cache.exists():
        z = np.load(cache)
        return z["features"], z["y"], list(z["classes"])
    from tuneflow.data import subsample
    from tuneflow.training.assemble import build
    from tuneflow.training.isolation import preserved_global_state
    from tuneflow.training.inputs import prepare
    from tuneflow.workbench.doctor import MAX_LABEL_IMAGES, label_features
    overrides = {"precision": "float32"}
    with tempfile.TemporaryDirectory() as tmp:
        if name == "synthetic":
            sys.path.insert(0, str(REPO / "tests"))
            from conftest import make_image_folder
            data = make_image_folder(Path(tmp) / "synthetic", classes=("a", "b", "c", "d", "e"), per_class=40)
            overrides["input_size"] = 32  # the doctor tests' size
        else:
            data = REPO / "data" / "digits" if name == "digits" else SHARED / name
        with preserved_global_state():
            recipe, bundle, plan = prepare("small_similar", data, overrides, one_device=True)
            asm = build(plan, plan.taps()[0])
            total = len(bundle.train) + len(bundle.val)
            if total > MAX_LABEL_IMAGES:  # as the doctor does
                bundle = subsample(replace(bundle), MAX_LABEL_IMAGES / total, seed=recipe.seed)
            _, feats, y, _ = label_features(plan, bundle, asm)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, features=feats, y=y, classes=np.asarray(plan.classes))
    return feats, y, list(plan.classes)


def summarise(rows):
    """Mean and std over seeds per (set, rate, method), and each method's mean over all cells
    with the paired F1 difference against the hand-written rule (mean, standard error)."""
    table = {}
    for r in rows:
        for m in METHODS:
            table.setdefault((r["set"], r["rate"], m), []).append(r[m])
    cells = [{"set": s, "rate": rate, "method": m,
              **{f"{q}_mean": float(np.mean([v[q] for v in vs])) for q in ("precision", "recall", "f1", "flagged", "seconds")},
              "f1_std": float(np.std([v["f1"] for v in vs]))} for (s, rate, m), vs in table.items()]
    overall = {}
    for m in METHODS:
        d = np.array([r[m]["f1"] - r["handwritten"]["f1"] for r in rows])
        overall[m] = {"f1_mean": float(np.mean([r[m]["f1"] for r in rows])),
                      "precision_mean": float(np.mean([r[m]["precision"] for r in rows])),
                      "recall_mean": float(np.mean([r[m]["recall"] for r in rows])),
                      "f1_minus_handwritten_mean": float(d.mean()),
                      "f1_minus_handwritten_se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0,
                      "cells_better_same_worse": [int((d > 1e-9).sum()), int((abs(d) <= 1e-9).sum()), int((d < -1e-9).sum())],
                      "seconds_mean": float(np.mean([r[m]["seconds"] for r in rows]))}
    return cells, overall


def cell(name, feats, y, k, rate, seed):
    """One (set, rate, seed): plant flips, the doctor's out-of-fold probabilities, every method."""
    from tuneflow.workbench.doctor import out_of_fold_probs
    noisy, flipped = plant(y, k, rate, seed)
    t0 = time.time()
    probs = out_of_fold_probs(feats, noisy, k, seed=0)  # the doctor's recipe seed
    row = {"set": name, "n": len(y), "classes": k, "rate": rate, "seed": seed, "planted": len(flipped),
           "oof_seconds": time.time() - t0, "oof_accuracy_vs_noisy": float(np.mean(probs.argmax(1) == noisy)),
           "oof_accuracy_vs_clean": float(np.mean(probs.argmax(1) == y))}
    for m in METHODS:
        t0 = time.time()
        flagged = flag(m, probs, noisy)
        row[m] = score(np.asarray(flagged), flipped, time.time() - t0)
    return row


def markdown(result) -> str:
    """The docs page's table: F1 (mean +- std over seeds) per set and rate, precision/recall
    beside it, and the overall means."""
    by = {(c["set"], c["rate"], c["method"]): c for c in result["cells"]}
    order = list(dict.fromkeys(r["set"] for r in result["rows"]))
    keys = sorted({(c["set"], c["rate"]) for c in result["cells"]}, key=lambda k: (order.index(k[0]), k[1]))
    head = "| set | flips | " + " | ".join(f"{m} F1 (P/R)" for m in METHODS) + " |"
    lines = [head, "|" + " --- |" * (2 + len(METHODS))]
    for s, rate in keys:
        lines.append(f"| {s} | {rate:.0%} | " + " | ".join(
            f"{by[s, rate, m]['f1_mean']:.3f} +- {by[s, rate, m]['f1_std']:.3f} "
            f"({by[s, rate, m]['precision_mean']:.2f}/{by[s, rate, m]['recall_mean']:.2f})" for m in METHODS) + " |")
    o = result["overall"]
    lines.append("| **all** | | " + " | ".join(
        f"**{o[m]['f1_mean']:.3f}** ({o[m]['precision_mean']:.2f}/{o[m]['recall_mean']:.2f})" for m in METHODS) + " |")
    lines.append("| F1 - handwritten | | " + " | ".join(
        f"{o[m]['f1_minus_handwritten_mean']:+.3f} +- {o[m]['f1_minus_handwritten_se']:.3f} "
        f"(better/same/worse {'/'.join(map(str, o[m]['cells_better_same_worse']))})" for m in METHODS) + " |")
    lines.append("| ms to flag | | " + " | ".join(f"{o[m]['seconds_mean'] * 1e3:.2f}" for m in METHODS) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=["synthetic", "digits", "ants_bees", "brain_mri_yn"])
    ap.add_argument("--rates", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="cells fitted at once (one BLAS thread each)")
    ap.add_argument("--out", default=str(HERE / "results" / "label_check.json"))
    ap.add_argument("--markdown", metavar="JSON", help="print the docs table of an earlier result file and stop")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="join the rows of result files (runs over different "
                    "sets, e.g. in parallel) into --out, summarised again, and stop")
    args = ap.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = [r for part in parts for r in part["rows"]]
        cells, overall = summarise(rows)
        result = {"command": [part["command"] for part in parts], "cleanlab": parts[0]["cleanlab"],
                  "methods": list(METHODS), "seconds": sum(part["seconds"] for part in parts),
                  "overall": overall, "cells": cells, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(markdown(result))
        return
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    import cleanlab
    rows, t_start = [], time.time()
    command = "python benchmarks/bench_label_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for name in args.sets:
        if name not in ("synthetic", "digits") and not (SHARED / name).exists():
            print(f"{name}: absent, skipped", flush=True)
            continue
        t0 = time.time()
        feats, y, classes = features(name)
        print(f"{name}: {len(y)} images, {len(classes)} classes, features {feats.shape[1]} "
              f"({time.time() - t0:.1f} s)", flush=True)
        # spawn, not fork: the parent may hold TensorFlow's threads (it computed the features)
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            todo = [pool.submit(cell, name, feats, y, len(classes), rate, seed)
                    for rate in args.rates for seed in args.seeds]
            for fut in todo:
                row = fut.result()
                rows.append(row)
                print(f"  rate {row['rate']:.2f} seed {row['seed']}: {row['planted']} planted; " + "; ".join(
                    f"{m} F1 {row[m]['f1']:.3f} ({row[m]['flagged']} flagged)" for m in METHODS), flush=True)
        cells, overall = summarise(rows)  # written after each set: a long run keeps what it has
        result = {"command": command, "cleanlab": cleanlab.__version__, "methods": list(METHODS),
                  "seconds": time.time() - t_start, "overall": overall, "cells": cells, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for m, o in overall.items():
        print(f"{m:12s} F1 {o['f1_mean']:.3f} (P {o['precision_mean']:.3f} R {o['recall_mean']:.3f}); vs handwritten "
              f"{o['f1_minus_handwritten_mean']:+.3f} +- {o['f1_minus_handwritten_se']:.3f}; cells better/same/worse "
              f"{o['cells_better_same_worse']}; {o['seconds_mean'] * 1e3:.1f} ms")
    print(f"wrote {args.out} ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
