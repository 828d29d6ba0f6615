"""small_similar vs the Keras transfer-learning guide's recipe, same backbone and data, one process.

The baseline is written as a user following the guide would: image_dataset_from_directory,
flip + rotation layers, the frozen base called with training=False, GAP, dropout 0.2, Dense,
Adam 1e-3, 10 epochs over the images. tuneflow runs cold (weights converted, feature cache
empty), on a new dataset (weights converted before, no features) and warm (features cached).
Each side runs in a fresh process; wall time is measured inside, after the imports.

    .venv/bin/python benchmarks/bench_recipes.py [DATA]   (default ../shared/datasets/ants_bees)

``--goals [ROW ...] [--precision float32|auto]``: the accuracy-per-CPU-minute goals, each row a
recipe run in a fresh process from a cold feature cache (converted weights kept), beside
scikit-learn's default logistic regression (lbfgs, C=1, max_iter 5000) on the same backbone's
ImageNet pooled features at the recipe's size and resize, of the same train/val split, measured
in the same process after the run (its time is not in the run's). Rows: ants_bees
(small_similar), brain_mri_yn (small_different), cats_dogs (large_similar), large_different
(cats_dogs' 3,000 images as one folder, tuneflow's own split). JSON in
benchmarks/results/goals.json (rows merged by name and precision).

``--folds K ROW [ROW ...] [--precision float32]``: each row's recipe over K stratified folds of all
its images (train and val of the set pooled; fold k is the validation set, the rest training,
seed 0): per fold the run's val accuracy beside scikit-learn's logistic regression on the same
features, then mean and spread. One fresh process per fold, converted weights and engines kept
across a row's folds (features are computed anew: each fold is new data). Rows as for --goals,
plus ``digits`` (data/digits) and ``digits_lite0``. JSON in benchmarks/results/folds_ROW.json.
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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


SHARED = HERE.parent.parent / "shared" / "datasets"
GOALS = {  # name: (data, recipe, goal accuracy, goal seconds[, overrides])
    "ants_bees": ("ants_bees", "small_similar", 0.960, 30),  # #30's goal (the default: backbone=auto)
    # the same command with the backbone the default used before backbone=auto, in the same run
    "ants_bees_lite0": ("ants_bees", "small_similar", None, None, {"backbone": "efficientnet_lite0"}),
    "ants_bees_fast": ("ants_bees", "small_similar", None, None, {}, "fast"),  # --quality fast
    "digits": ("@digits", "small_similar", None, None),  # the project's own data/digits
    "digits_lite0": ("@digits", "small_similar", None, None, {"backbone": "efficientnet_lite0"}),
    "brain_mri_yn_similar": ("brain_mri_yn", "small_similar", None, None),
    "brain_mri_yn_similar_lite0": ("brain_mri_yn", "small_similar", None, None, {"backbone": "efficientnet_lite0"}),
    "brain_mri_yn": ("brain_mri_yn", "small_different", 0.80, None),
    "cats_dogs": ("cats_dogs", "large_similar", 0.995, 300),
    "large_different": ("cats_dogs:merged", "large_different", None, 1200),
}


def _goal_data(spec: str, tmp: Path) -> Path:
    """A dataset folder; ``NAME:merged``: its train and val class folders as one (symlinks in tmp)."""
    name, _, how = spec.partition(":")
    src = HERE.parent / "data" / name[1:] if name.startswith("@") else SHARED / name
    if how != "merged":
        return src
    root = tmp / f"{name}_merged"
    for split in ("train", "val"):
        for cls in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            (root / cls.name).mkdir(parents=True, exist_ok=True)
            for f in cls.iterdir():
                os.symlink(f.resolve(), root / cls.name / f"{split}_{f.name}")
    return root


def goal_row(name: str, data: Path, out: Path, precision: str) -> dict:
    """One goal row, in this (fresh) process: the recipe, then sklearn on the same split's features."""
    import warnings

    import keras
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    import tuneflow
    from tuneflow import build_backbone
    from tuneflow.data import load_data
    from tuneflow.features.extractor import FeatureExtractor
    from bench_scale import Peak  # its /proc/self/status reader
    _, recipe, goal_acc, goal_s, *extra = GOALS[name]
    overrides = {"precision": precision, **(extra[0] if extra else {})}
    quality = extra[1] if len(extra) > 1 else None
    t0 = time.time()
    res = tuneflow.finetune(recipe, str(data), str(out), overrides=overrides, verbose=0, quality=quality)
    wall = time.time() - t0
    rep = res.report
    r = tuneflow.recipes.get(recipe)
    size = rep.get("input_size") or r.input_size
    t1 = time.time()
    b = load_data(data, size, resize=rep.get("resize") or r.resize, val_fraction=r.val_fraction, seed=r.seed)
    bb = build_backbone(rep["backbone"], input_size=size)
    pooled = keras.Model(bb.input, keras.layers.GlobalAveragePooling2D()(bb.output))
    f = np.asarray(FeatureExtractor(pooled, "auto").run([b.train.x, b.val.x]), np.float32)
    ftr, fva = f[:len(b.train)], f[len(b.train):]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk = float(LogisticRegression(max_iter=5000).fit(ftr, b.train.y).score(fva, b.val.y))
    same_split = (len(b.train), len(b.val)) == (rep["num_train"], rep["num_val"])
    return {"row": name, "data": str(data), "recipe": recipe, "precision": precision,
            "precision_used": rep.get("precision"), "val_accuracy": rep["val_accuracy"],
            "majority_rate": rep.get("majority_rate"), "wall_seconds": round(wall, 1),
            "stages": rep["stages"], "overrides": overrides, "quality": quality or "balanced",
            "backbone": rep["backbone"], "backbone_choice": rep.get("backbone_choice"),
            "artifact_seconds": rep.get("artifact_seconds"), "goal_accuracy": goal_acc, "goal_seconds": goal_s,
            "sklearn_logreg_val_accuracy": sk, "sklearn_features": f"{rep['backbone']} pooled, {size} px, {rep.get('resize') or r.resize}",
            "sklearn_seconds": round(time.time() - t1, 1), "same_split": same_split,
            # this process's peak resident memory (the row runs in a process of its own)
            "vmhwm_mb": round(Peak.now()["VmHWM"] / 1024, 1), "cpus": os.cpu_count()}


def _cold_home(tmp: Path, src_home: Path) -> Path:
    """A TUNEFLOW_HOME under ``tmp`` with the converted weights of ``src_home`` and nothing else."""
    home = tmp / "home"
    home.mkdir()
    if (src_home / "weights").exists():
        os.symlink(src_home / "weights", home / "weights")
    return home


def _row_in_fresh_process(name: str, data: Path, out: Path, precision: str, home: Path, what: str) -> dict:
    """:func:`goal_row` in a process of its own (its run folder removed after); exits on failure."""
    import shutil
    import subprocess
    env = dict(os.environ, TUNEFLOW_HOME=str(home), TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, __file__, "--goal-row", name, str(data), str(out), precision]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{what} failed:\n{done.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def goals_main(args):
    precision = args[args.index("--precision") + 1] if "--precision" in args else "float32"
    names = [a for a in args if a in GOALS] or list(GOALS)
    out_path = HERE / "results" / "goals.json"
    rows = json.loads(out_path.read_text())["rows"] if out_path.exists() else []
    src_home = Path(os.environ.get("TUNEFLOW_HOME") or Path("~/.keras/tuneflow").expanduser())
    for name in names:
        if not (SHARED / GOALS[name][0].split(":")[0]).exists():
            print(f"skip {name}: {SHARED / GOALS[name][0]} not found")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            home = _cold_home(tmp, src_home)  # no features, no image store; converted weights reused
            row = _row_in_fresh_process(name, _goal_data(GOALS[name][0], tmp), tmp / "run", precision, home, name)
        row["command"] = f"benchmarks/bench_recipes.py --goals {name} --precision {precision}"
        rows = [r for r in rows if (r["row"], r["precision"]) != (name, precision)] + [row]
        out_path.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
        print(json.dumps(row), flush=True)
    print("| row | recipe | precision | val accuracy | goal | wall s | goal s | sklearn LR (same features) |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['row']} | {r['recipe']} | {r['precision_used']} | {r['val_accuracy']:.4f} | "
              f"{r['goal_accuracy'] or ''} | {r['wall_seconds']} | {r['goal_seconds'] or ''} | "
              f"{r['sklearn_logreg_val_accuracy']:.4f} |")


def _images_by_class(root: Path) -> dict:
    """class -> sorted image files, over a folder's train/val/test splits or its class folders."""
    splits = [root / s for s in ("train", "val", "test") if (root / s).is_dir()] or [root]
    out: dict = {}
    for split in splits:
        for cls in sorted(p for p in split.iterdir() if p.is_dir()):
            out.setdefault(cls.name, []).extend(sorted(f for f in cls.iterdir() if f.is_file()))
    return out


def folds_main(args):
    import shutil
    import statistics

    from sklearn.model_selection import StratifiedKFold
    k = int(args[0])
    precision = args[args.index("--precision") + 1] if "--precision" in args else "float32"
    names = [a for a in args[1:] if a in GOALS]
    src_home = Path(os.environ.get("TUNEFLOW_HOME") or Path("~/.keras/tuneflow").expanduser())
    for name in names:
        spec = GOALS[name][0]
        base = HERE.parent / "data" / spec[1:] if spec.startswith("@") else SHARED / spec
        if not base.exists():
            print(f"skip {name}: {base} not found")
            continue
        files = _images_by_class(base)
        paths = [f for c in sorted(files) for f in files[c]]
        labels = [c for c in sorted(files) for _ in files[c]]
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            home = _cold_home(tmp, src_home)
            splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=0)
            for fold, (tr, va) in enumerate(splitter.split(paths, labels)):
                data = tmp / f"fold{fold}"
                for split, idx in (("train", tr), ("val", va)):
                    for i in idx:
                        d = data / split / labels[i]
                        d.mkdir(parents=True, exist_ok=True)
                        os.symlink(paths[i].resolve(), d / f"{i:05d}_{paths[i].name}")
                row = _row_in_fresh_process(name, data, tmp / "run", precision, home, f"{name} fold {fold}")
                shutil.rmtree(data, ignore_errors=True)
                rows.append({"fold": fold, "val_accuracy": row["val_accuracy"], "num_val": len(va),
                             "sklearn_logreg_val_accuracy": row["sklearn_logreg_val_accuracy"],
                             "wall_seconds": row["wall_seconds"], "backbone": row["backbone"],
                             "majority_rate": row["majority_rate"]})
                print(json.dumps(rows[-1]), flush=True)
        accs = [r["val_accuracy"] for r in rows]
        sks = [r["sklearn_logreg_val_accuracy"] for r in rows]
        summary = {"row": name, "recipe": GOALS[name][1], "overrides": (GOALS[name][4:5] or [{}])[0],
                   "folds": k, "precision": precision, "mean_val_accuracy": statistics.mean(accs),
                   "stdev_val_accuracy": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                   "min_val_accuracy": min(accs), "sklearn_mean_val_accuracy": statistics.mean(sks),
                   "mean_wall_seconds": statistics.mean(r["wall_seconds"] for r in rows),
                   "backbones": [r["backbone"] for r in rows], "rows": rows,
                   "command": f"benchmarks/bench_recipes.py --folds {k} {name} --precision {precision}"}
        (HERE / "results" / f"folds_{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"{name}: {k}-fold mean {summary['mean_val_accuracy']:.4f} +- {summary['stdev_val_accuracy']:.4f} "
              f"(min {summary['min_val_accuracy']:.4f}); sklearn LR {summary['sklearn_mean_val_accuracy']:.4f}; "
              f"{summary['mean_wall_seconds']:.1f} s a fold; backbones {summary['backbones']}", flush=True)


def main():
    if "--folds" in sys.argv:
        return folds_main(sys.argv[sys.argv.index("--folds") + 1:])
    if "--goal-row" in sys.argv:
        i = sys.argv.index("--goal-row")
        name, data, out, precision = sys.argv[i + 1:i + 5]
        print(json.dumps(goal_row(name, Path(data), Path(out), precision)))
        return
    if "--goals" in sys.argv:
        return goals_main(sys.argv[sys.argv.index("--goals") + 1:])
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
