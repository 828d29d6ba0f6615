"""tuneflow search: epochs saved by pruning (same sampler and seed, with and without pruning) and
the parent process's memory over many trials.

    .venv/bin/python benchmarks/bench_search.py [DATA] [--trials 20] [--rss-trials 50] [--jobs 1]
        [--sampler random] [--pruner median] [--set KEY=VALUE ...]
    (DATA defaults to ../shared/datasets/ants_bees; JSON in benchmarks/results/search_<data>.json)

The verdict compares the two arms' best trials on val accuracy, val loss and parameters
(``compare_best``): pruning kept the best trial only if all three agree. Both arms run
``tuneflow search small_similar`` with the default space, its head trained by its
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
NOT_PARAMS = ("round", "number", "state", "val_accuracy", "val_loss", "epochs", "seconds", "run")  # trials.csv


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_search(work: Path, name: str, data: str, trials: int, jobs: int, extra: list[str],
               overrides: list[str] = ()) -> dict:
    out = work / name
    from tuneflow.recipe import Recipe
    sgd = ["--set", "head_solver=sgd"] if "head_solver" in Recipe.__dataclass_fields__ else []
    sgd += [a for o in overrides for a in ("--set", o)]
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
    params = [k for k in rows[0] if k not in NOT_PARAMS]
    return {"command": command, "wall_seconds": round(wall, 1) if wall is not None else None, "trials": len(rows),
            "states": {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL")},
            "epochs": sum(int(r["epochs"] or 0) for r in rows),
            "best_val_accuracy": float(best["val_accuracy"]), "best_val_loss": float(best["val_loss"]),
            "best_params": {k: best[k] for k in params},
            "rss_after_first_trial_mb": round(first, 1) if first else None,
            "rss_peak_mb": round(peak, 1) if peak else None,
            "rss_growth_mb": round(peak - first, 1) if first else None,
            "per_trial": [{k: r[k] for k in ("number", "state", "val_accuracy", "epochs", "seconds")} for r in rows]}


LOSS_TOLERANCE = 0.01  # relative: best val losses this close are the same (thread-order rounding)


def compare_best(none: dict, pruned: dict) -> dict:
    """Whether pruning kept the search's best trial: the same (or better) best val accuracy, a best
    val loss no worse (within LOSS_TOLERANCE), and the same best parameters (with the random
    sampler both arms draw the same configurations, so the same best trial has the same ones)."""
    same_acc = pruned["best_val_accuracy"] >= none["best_val_accuracy"]
    same_loss = pruned["best_val_loss"] <= none["best_val_loss"] * (1 + LOSS_TOLERANCE)
    same_params = pruned["best_params"] == none["best_params"]
    differ = {k: [none["best_params"].get(k), pruned["best_params"].get(k)]
              for k in sorted(set(none["best_params"]) | set(pruned["best_params"]))
              if none["best_params"].get(k) != pruned["best_params"].get(k)}
    kept = same_acc and same_loss and same_params
    verdict = (f"best trial {'KEPT' if kept else 'NOT kept'} by pruning: val accuracy "
               f"{none['best_val_accuracy']:.4f} -> {pruned['best_val_accuracy']:.4f} "
               f"({'same' if same_acc else 'LOST'}), val loss {none['best_val_loss']:.4f} -> "
               f"{pruned['best_val_loss']:.4f} ({'same' if same_loss else 'WORSE'}), parameters "
               + ("the same" if same_params else f"differ: {differ}"))
    return {"same_best_accuracy": same_acc, "same_best_val_loss": same_loss, "same_best_params": same_params,
            "best_params_differ": differ, "best_trial_kept": kept, "verdict": verdict}


def replay_pruner(out: Path, startup: int, warmup: int, on: str = "val_loss") -> dict:
    """The median pruner replayed on a no-pruning search's recorded curves (each trial's
    metrics.csv, in trial order), comparing trials on ``on`` (val_loss, reported negated as the
    search does, or val_accuracy): the epochs and best accuracy it would have given, without the
    poll latency of a live search (which lets a killed trial run an epoch or two more)."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with open(out / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(
        n_startup_trials=startup, n_warmup_steps=warmup))
    epochs, best, pruned, kept = 0, None, 0, []
    for r in rows:
        with open(out / r["run"] / "metrics.csv", newline="") as f:
            curve = [float(m["val_accuracy"]) if on == "val_accuracy" else -float(m["val_loss"])
                     for m in csv.DictReader(f)]
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
            kept.append(r)
    # the best trial as the search ranks them (accuracy, then the lower loss): its loss and parameters too
    top = max(kept, key=lambda r: (float(r["val_accuracy"]), -float(r["val_loss"])), default=None)
    params = {k: v for k, v in (top or {}).items() if k not in NOT_PARAMS}
    return {"prune_on": on, "prune_startup": startup, "prune_warmup": warmup, "epochs": epochs, "pruned": pruned,
            "best_val_accuracy": best, "best_val_loss": float(top["val_loss"]) if top else None,
            "best_params": params}


def replay_searches(dirs: list[Path]):
    """The median pruner (5 startup trials) replayed on each search folder's curves, on both
    signals and at warm-ups 1, 2, 3 and 6 and after the first stage's LR rise: epochs saved against
    the unpruned search, and whether the best trial survived."""
    from tuneflow.recipe import Recipe
    from tuneflow.workbench.search import default_prune_warmup
    out = {"command": "benchmarks/bench_search.py " + " ".join(sys.argv[1:]), "searches": []}
    for d in dirs:
        recipe = Recipe.from_json((d / "base_recipe.json").read_text())
        done = summarize(d, str(d), None, None, None)
        total, best = done["epochs"], done["best_val_accuracy"]
        after_rise = default_prune_warmup(recipe, "val_accuracy")
        rows = []
        for on in ("val_loss", "val_accuracy"):
            for w in sorted({1, 2, 3, 6, after_rise}):
                r = replay_pruner(d, 5, w, on)
                r["saved"] = round(1 - r["epochs"] / total, 3)
                r["same_best"] = r["best_val_accuracy"] >= best  # accuracy; loss and parameters below
                r["same_best_val_loss"] = r["best_val_loss"] is not None and (
                    r["best_val_loss"] <= done["best_val_loss"] * (1 + LOSS_TOLERANCE))
                r["same_best_params"] = r["best_params"] == done["best_params"]
                r["default"] = w == default_prune_warmup(recipe, on) and on == "val_loss"
                rows.append(r)
                print(f"{d.name}: {on} from epoch {w}: {100 * r['saved']:.0f}% saved, best "
                      f"{r['best_val_accuracy']:.4f} ({'same' if r['same_best'] else 'LOST'} as {best:.4f}), "
                      f"its val loss {r['best_val_loss']} ({'same' if r['same_best_val_loss'] else 'WORSE'} as "
                      f"{done['best_val_loss']:.4f}), parameters {'same' if r['same_best_params'] else 'DIFFER'}")
        stage = recipe.stages[0]
        first = json.loads((d / "trials" / "0000" / "report.json").read_text())
        out["searches"].append({"folder": str(d), "data": first["data"], "schedule": stage.schedule,
                                "rise_epochs": stage.rise_epochs,
                                "trials": done["trials"], "epochs": total, "best_val_accuracy": best, "replays": rows})
    target = HERE / "results" / "search_replays.json"
    target.write_text(json.dumps(out, indent=2))
    print(target)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?", default=str(HERE.parent.parent / "shared" / "datasets" / "ants_bees"))
    ap.add_argument("--trials", type=int, default=20, help="trials per arm of the pruning comparison (0: skip)")
    ap.add_argument("--rss-trials", type=int, default=50, help="trials of the memory run (0: skip)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--sampler", default="random")
    ap.add_argument("--pruner", default="median")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                    help="recipe overrides for every arm (after head_solver=sgd)")
    ap.add_argument("--replay", nargs="+", metavar="SEARCH_DIR",
                    help="only replay the median pruner on these finished unpruned searches' curves "
                         "(JSON in benchmarks/results/search_replays.json)")
    args = ap.parse_args()
    if args.replay:
        return replay_searches([Path(d) for d in args.replay])
    data = str(Path(args.data).resolve())
    work = Path(tempfile.mkdtemp(prefix="bench_search-"))
    result = {"data": data, "jobs": args.jobs, "sampler": args.sampler, "pruner": args.pruner,
              "command": "benchmarks/bench_search.py " + " ".join(sys.argv[1:])}
    target = HERE / "results" / f"search_{Path(data).name}.json"
    target.parent.mkdir(exist_ok=True)
    try:
        if args.trials:
            base = ["--sampler", args.sampler]
            none = run_search(work, "no_pruning", data, args.trials, args.jobs, base + ["--pruner", "none"], args.overrides)
            pruned = run_search(work, "pruning", data, args.trials, args.jobs, base + ["--pruner", args.pruner], args.overrides)
            result["no_pruning"], result["pruning"] = none, pruned
            result["epochs_saved"] = round(1 - pruned["epochs"] / none["epochs"], 3)
            result["wall_saved"] = round(1 - pruned["wall_seconds"] / none["wall_seconds"], 3)
            result.update(compare_best(none, pruned))
            print(f"epochs: {none['epochs']} without pruning, {pruned['epochs']} with "
                  f"({100 * result['epochs_saved']:.0f}% saved); wall {none['wall_seconds']} s vs "
                  f"{pruned['wall_seconds']} s", flush=True)
            print(result["verdict"], flush=True)
            import tuneflow.recipes as registry
            from tuneflow.workbench.search import default_prune_warmup
            recipe = registry.get("small_similar").override("head_solver=sgd", *args.overrides)
            result["default_prune_warmup"] = {on: default_prune_warmup(recipe, on) for on in ("val_loss", "val_accuracy")}
            after_rise = default_prune_warmup(recipe, "val_accuracy")
            result["replay_median_pruner"] = [replay_pruner(work / "no_pruning", s, w, on)
                                              for on in ("val_loss", "val_accuracy") for s in (3, 5, 10)
                                              for w in sorted({1, 2, 3, 6, after_rise})]
            target.write_text(json.dumps(result, indent=2))  # the comparison survives a stopped memory run
        if args.rss_trials:
            mem = run_search(work, "memory", data, args.rss_trials, args.jobs, ["--sampler", args.sampler], args.overrides)
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
