"""tuneflow search: epochs saved by pruning (same sampler and seed, with and without pruning) and
the parent process's memory over many trials.

    .venv/bin/python benchmarks/bench_search.py [DATA] [--trials 20] [--rss-trials 50] [--jobs 1]
        [--sampler random] [--pruner median]
    (DATA defaults to ../shared/datasets/ants_bees; JSON in benchmarks/results/search_<data>.json)

Both arms run ``tuneflow search small_similar`` with the default space, its head trained by its
optimizer over epochs (``head_solver=sgd`` where recipes have that field: an L-BFGS head has no
epochs to prune). With ``--sampler random``
(the default here) both arms draw the same configurations, so "same best accuracy" means the best
configuration was not pruned. ``replay_median_pruner`` replays the median pruner at other
n_startup_trials / n_warmup_steps on the no-pruning arm's recorded curves (what each setting would
have saved on the same trials). Parent RSS is sampled every 0.2 s from /proc; its growth is the
peak after the first trial finished minus the value at that moment (imports done by then).
"""
import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_search(work: Path, name: str, data: str, trials: int, jobs: int, extra: list[str]) -> dict:
    out = work / name
    from tuneflow.recipe import Recipe
    sgd = ["--set", "head_solver=sgd"] if "head_solver" in Recipe.__dataclass_fields__ else []
    cmd = [sys.executable, "-m", "tuneflow", "search", "small_similar", "--data", data, "--trials", str(trials),
           "--jobs", str(jobs), "--out", str(out), "--seed", "0", *sgd, *extra]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        first = peak = None
        while proc.poll() is None:
            try:
                rss = rss_mb(proc.pid)
            except OSError:
                break
            if first is None and (out / "trials.csv").exists():
                first = peak = rss
            elif first is not None:
                peak = max(peak, rss)
            time.sleep(0.2)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}); see {work / (name + '.log')}:\n"
                 + (work / f"{name}.log").read_text()[-3000:])
    return summarize(out, " ".join(cmd[1:]), wall, first, peak)


def summarize(out: Path, command: str, wall: float | None, first: float | None, peak: float | None) -> dict:
    """One arm's figures from its search folder's trials.csv (and the RSS samples taken while it ran)."""
    with open(out / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    best = max(complete, key=lambda r: (float(r["val_accuracy"]), -float(r["val_loss"])))
    params = [k for k in rows[0] if k not in ("round", "number", "state", "val_accuracy", "val_loss", "epochs",
                                             "seconds", "run")]
    return {"command": command, "wall_seconds": round(wall, 1) if wall is not None else None, "trials": len(rows),
            "states": {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL")},
            "epochs": sum(int(r["epochs"] or 0) for r in rows),
            "best_val_accuracy": float(best["val_accuracy"]), "best_val_loss": float(best["val_loss"]),
            "best_params": {k: best[k] for k in params},
            "rss_after_first_trial_mb": round(first, 1) if first else None,
            "rss_peak_mb": round(peak, 1) if peak else None,
            "rss_growth_mb": round(peak - first, 1) if first else None,
            "per_trial": [{k: r[k] for k in ("number", "state", "val_accuracy", "epochs", "seconds")} for r in rows]}


def replay_pruner(out: Path, startup: int, warmup: int) -> dict:
    """The median pruner replayed on a no-pruning search's recorded curves (each trial's
    metrics.csv, in trial order): the epochs and best accuracy it would have given, without the
    poll latency of a live search (which lets a killed trial run an epoch or two more)."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with open(out / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(
        n_startup_trials=startup, n_warmup_steps=warmup))
    epochs, best, pruned = 0, None, 0
    for r in rows:
        with open(out / r["run"] / "metrics.csv", newline="") as f:
            curve = [float(m["val_accuracy"]) for m in csv.DictReader(f)]
        trial = study.ask()
        for step, acc in enumerate(curve, start=1):
            trial.report(acc, step)
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                epochs, pruned = epochs + step, pruned + 1
                break
        else:
            study.tell(trial, float(r["val_accuracy"]))
            epochs, best = epochs + len(curve), max(best or 0.0, float(r["val_accuracy"]))
    return {"prune_startup": startup, "prune_warmup": warmup, "epochs": epochs, "pruned": pruned,
            "best_val_accuracy": best}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?", default=str(HERE.parent.parent / "shared" / "datasets" / "ants_bees"))
    ap.add_argument("--trials", type=int, default=20, help="trials per arm of the pruning comparison (0: skip)")
    ap.add_argument("--rss-trials", type=int, default=50, help="trials of the memory run (0: skip)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--sampler", default="random")
    ap.add_argument("--pruner", default="median")
    args = ap.parse_args()
    data = str(Path(args.data).resolve())
    work = Path(tempfile.mkdtemp(prefix="bench_search-"))
    result = {"data": data, "jobs": args.jobs, "sampler": args.sampler, "pruner": args.pruner,
              "command": "benchmarks/bench_search.py " + " ".join(sys.argv[1:])}
    target = HERE / "results" / f"search_{Path(data).name}.json"
    target.parent.mkdir(exist_ok=True)
    try:
        if args.trials:
            base = ["--sampler", args.sampler]
            none = run_search(work, "no_pruning", data, args.trials, args.jobs, base + ["--pruner", "none"])
            pruned = run_search(work, "pruning", data, args.trials, args.jobs, base + ["--pruner", args.pruner])
            result["no_pruning"], result["pruning"] = none, pruned
            result["epochs_saved"] = round(1 - pruned["epochs"] / none["epochs"], 3)
            result["wall_saved"] = round(1 - pruned["wall_seconds"] / none["wall_seconds"], 3)
            result["same_best_accuracy"] = pruned["best_val_accuracy"] >= none["best_val_accuracy"]
            print(f"epochs: {none['epochs']} without pruning, {pruned['epochs']} with "
                  f"({100 * result['epochs_saved']:.0f}% saved); wall {none['wall_seconds']} s vs "
                  f"{pruned['wall_seconds']} s; best val accuracy {none['best_val_accuracy']:.4f} vs "
                  f"{pruned['best_val_accuracy']:.4f}", flush=True)
            result["replay_median_pruner"] = [replay_pruner(work / "no_pruning", s, w)
                                              for s in (3, 5, 10) for w in (1, 2, 3, 6)]
            target.write_text(json.dumps(result, indent=2))  # the comparison survives a stopped memory run
        if args.rss_trials:
            mem = run_search(work, "memory", data, args.rss_trials, args.jobs, ["--sampler", args.sampler])
            result["memory"] = {k: mem[k] for k in ("command", "trials", "states", "wall_seconds",
                                                    "rss_after_first_trial_mb", "rss_peak_mb", "rss_growth_mb")}
            print(f"parent RSS over {mem['trials']} trials: {mem['rss_after_first_trial_mb']} MB after the first, "
                  f"peak {mem['rss_peak_mb']} MB (+{mem['rss_growth_mb']} MB)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    target.write_text(json.dumps(result, indent=2))
    print(target)


if __name__ == "__main__":
    main()
