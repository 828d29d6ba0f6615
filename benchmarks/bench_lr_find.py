"""tuneflow lr-find: is the range test's suggestion near the best LR of a grid of full runs?

    .venv/bin/python benchmarks/bench_lr_find.py [--pairs DATA:RECIPE[:k=v,k=v] ...] [--grid 1e-4 3e-4 ...]
        [--set k=v ...] [--grid-from OLD.json] [--seeds 0 1 2] [--out FILE]
    (default pairs: data/digits and ../shared/datasets/ants_bees with small_similar, when present;
     JSON in benchmarks/results/lr_find.json, rewritten after each pair)

For each dataset/recipe pair: the suggestion (valley rule, and the steepest-slope and minimum/10
rules beside it) for stage 0, then one full ``finetune`` per grid LR (same seed, data and split),
each scored by its reported val loss (ties: accuracy). The pair passes when the suggestion lies
within half a decade (a factor 10**0.5 = 3.16) of the best grid LR and the range test did not
call its curve inconclusive (an inconclusive pair is a miss, whatever its number). Each row also
gives the regret: the val loss of the grid run nearest the suggestion over the best run's. Recipes whose linear head is
fitted by L-BFGS (no LR) run with ``head_solver=sgd``: their optimizer and epochs are then used.
Overrides after the recipe (``:fraction=0.2``) apply to that pair's range test and grid alike.

The grid does not depend on how the range test picks its LR, so ``--grid-from`` takes the grid
runs of an earlier result file for every pair with the same data, recipe, overrides and grid LRs
(the row then says ``"grid_from"``); the range test itself always runs afresh.

``--seeds 0 1 2`` runs each grid LR once per seed and scores it by the mean val loss over the
seeds (each seed's figures kept under ``"seeds"``): one run per LR on 57-200 validation images
picks an argmin that noise moves. The recipe's ``seed`` also draws the split of a folder without
one (brain_mri_yn, data/digits) and the ``fraction`` subsample, so there the mean is over splits
too: the reference becomes the dataset's best LR rather than one draw's. The range test runs at
seed 0, the recipe's own (what a user gets); seed 0's runs are reused from ``--grid-from``. The raw curve
(LR and loss per step) is kept in each row, so the rules can be re-scored without re-running.
"""
import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def bench(data, recipe, grid, fixed, old_grid=None, seeds=(0,)) -> dict:
    from tuneflow.fit.finetune import finetune
    from tuneflow.training.lr_range import lr_find
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        found = lr_find(recipe, data, stage=0, overrides=fixed, out=tmp)
        lr_seconds = time.time() - t0
        stage = found["stage"]
        runs = []
        for lr in grid:
            per_seed = {}
            for seed in seeds:
                reused = [r for r in (old_grid or []) if seed == 0 and r["lr"] == lr]
                if reused:  # seed 0 is the recipe's own seed: an earlier single-seed grid's run
                    per_seed[seed] = {k: reused[0][k] for k in ("val_loss", "val_accuracy", "seconds")}
                    continue
                t0 = time.time()
                extra = [f"seed={seed}"] if seed else []
                res = finetune(recipe, data, Path(tmp) / f"lr{lr:g}-s{seed}",
                               overrides=fixed + [f"{stage}.lr={lr:g}"] + extra, verbose=0)
                per_seed[seed] = {"val_loss": res.report["val_loss"], "val_accuracy": res.report["val_accuracy"],
                                  "seconds": round(time.time() - t0, 1)}
            row = {"lr": lr, **{k: sum(r[k] for r in per_seed.values()) / len(per_seed)
                                for k in ("val_loss", "val_accuracy")},
                   "seconds": round(sum(r["seconds"] for r in per_seed.values()), 1)}
            if list(seeds) != [0]:
                row["seeds"] = {str(k): v for k, v in per_seed.items()}
            runs.append(row)
    row = score({"suggested_lr": found["suggested_lr"], "steep": found["steep"], "min": found["min"],
                 "inconclusive": found.get("inconclusive"), "grid": runs}, data, recipe, fixed, stage,
                found["stopped"], lr_seconds)
    row["tap"] = found.get("tap")
    row["curve"] = {"lrs": found["lrs"], "losses": found["losses"]}
    return row


def score(found, data, recipe, fixed, stage, stopped, lr_seconds) -> dict:
    """Decades between each rule's LR and the best grid LR; and the regret: the val loss of the grid
    run nearest the suggestion (in log LR) over the best run's (1.0 = as good as the best). An
    inconclusive range test is not within half a decade, whatever its number."""
    runs = found["grid"]
    best = min(runs, key=lambda r: (r["val_loss"], -r["val_accuracy"]))
    off = {k: abs(math.log10(found[k] / best["lr"])) for k in ("suggested_lr", "steep", "min")}
    near = min(runs, key=lambda r: abs(math.log10(r["lr"] / found["suggested_lr"])))
    return {"data": str(data), "recipe": recipe, "overrides": fixed, "stage": stage,
            "suggested_lr": found["suggested_lr"], "steep": found["steep"], "min": found["min"],
            "stopped": stopped, "lr_find_seconds": round(lr_seconds, 1), "grid": runs,
            "nearest_grid_lr": near["lr"], "val_loss_vs_best": round(near["val_loss"] / best["val_loss"], 3),
            "best_lr": best["lr"], "decades_off": {k: round(v, 2) for k, v in off.items()},
            "inconclusive": found.get("inconclusive"),
            "within_half_decade": off["suggested_lr"] <= 0.5 and not found.get("inconclusive")}


def parse_pair(pair: str):
    """``DATA:RECIPE`` or ``DATA:RECIPE:k=v,k=v`` -> (data, recipe, [k=v, ...])."""
    parts = pair.split(":")
    if len(parts) >= 3 and "=" in parts[-1]:
        return ":".join(parts[:-2]), parts[-2], [kv for kv in parts[-1].split(",") if kv]
    data, recipe = pair.rsplit(":", 1)
    return data, recipe, []


def reusable_grid(path, data, recipe, fixed, grid):
    """The grid runs of a row of an earlier result file made with the same settings, or None."""
    if not path:
        return None
    for row in json.loads(Path(path).read_text())["pairs"]:
        if (Path(row["data"]).resolve() == Path(data).resolve() and row["recipe"] == recipe
                and row["overrides"] == fixed and [r["lr"] for r in row["grid"]] == list(grid)):
            return row["grid"]
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", nargs="+", help="DATA:RECIPE[:k=v,...] (default: digits and ants_bees with small_similar)")
    p.add_argument("--grid", nargs="+", type=float, default=list(GRID))
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--grid-from", help="an earlier result file whose matching grid runs are reused")
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="run each grid LR once per seed and score it by the mean val loss (seed 0 is the "
                        "recipe's own; with --grid-from, its runs are reused). The range test runs at seed 0")
    p.add_argument("--out", default=str(HERE / "results" / "lr_find.json"))
    args = p.parse_args(argv)
    default = (REPO / "data" / "digits", REPO.parent / "shared" / "datasets" / "ants_bees")
    pairs = args.pairs or [f"{d}:small_similar" for d in default if d.exists()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["benchmarks/bench_lr_find.py"] + (argv or sys.argv[1:]))
    rows = []
    for pair in pairs:
        data, recipe, extra = parse_pair(pair)
        fixed = ["head_solver=sgd"] + args.overrides + extra
        old = reusable_grid(args.grid_from, data, recipe, fixed, args.grid)
        row = bench(data, recipe, args.grid, fixed, old, tuple(args.seeds))
        if list(args.seeds) != [0]:
            row["seeds"] = list(args.seeds)
        if old is not None:
            row["grid_from"] = args.grid_from
        rows.append(row)
        print(f"{Path(data).name:12s} {recipe:16s} {','.join(extra):14s} suggested {row['suggested_lr']:.2g} "
              f"(steep {row['steep']:.2g}, min/10 {row['min']:.2g}); best grid lr {row['best_lr']:g}; "
              f"{row['decades_off']['suggested_lr']:.2f} decades off -> "
              f"{'ok' if row['within_half_decade'] else 'MISS'}"
              f"{' (inconclusive: ' + row['inconclusive'] + ')' if row['inconclusive'] else ''}; "
              f"val loss at the nearest grid lr {row['val_loss_vs_best']:.2f}x the best", flush=True)
        out.write_text(json.dumps({"command": command, "seeds": list(args.seeds), "pairs": rows,
                                   "within_half_decade": sum(r["within_half_decade"] for r in rows),
                                   "inconclusive": sum(bool(r["inconclusive"]) for r in rows),
                                   "val_loss_vs_best": [r["val_loss_vs_best"] for r in rows],
                                   "of": len(rows)}, indent=2))
    ratios = ", ".join(f"{r['val_loss_vs_best']:.2f}" for r in rows)
    print(f"{sum(r['within_half_decade'] for r in rows)} of {len(rows)} within half a decade "
          f"({sum(bool(r['inconclusive']) for r in rows)} inconclusive, counted as misses); "
          f"val loss at the nearest grid lr / best: {ratios}; {out}")


if __name__ == "__main__":
    main()
