"""Which backbone a ``backbone=auto`` run trains: each candidate's features probed on the training
images, within a time bound, the cheapest of the best kept.

The candidates (``Recipe.backbone_candidates``, cheapest first) run side by side over the training
images in a class-interleaved random order, one round of a few dozen images each, until
``Recipe.backbone_probe_seconds`` have passed (or every image is seen; at least
:data:`MIN_PER_CLASS` images of each class are always seen). Each sees the same images, through the
same model the run's head stage would read (the recipe's tap and the head's pooling, the feature
cache's engine and precision), so the probe measures what the run trains on. A linear probe with
its L2 strength chosen by stratified k-fold on those images scores each (the validation images are
never looked at); the cheapest within :data:`MARGIN` (or one probed image, whichever is larger) of
the best wins: accuracy per second.

The winner's features of the probed images are not thrown away: they are written into the feature
cache under the key the head stage reads, with the rest of the training images computed then, so no
image goes through the winner twice. Under ``strategy=multiworker`` every worker must choose alike,
so the sample there is fixed (:data:`FIXED_PER_CLASS` a class), not sized by a clock.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from ..data import DataBundle
from ..errors import RecipeError
from ..features import cache as fcache
from ..recipe import Recipe
from .assemble import build
from .cached import cache_extractor, cache_trainer, pooled_features, train_key
from .plan import Plan
from .probe import fit_probe

log = logging.getLogger("tuneflow")

MARGIN = 0.005  # a costlier candidate must probe more than half a point above a cheaper one
MIN_PER_CLASS = 8  # images of each class every candidate sees, whatever the clock says
FIXED_PER_CLASS = 60  # the sample per class where the clock may not decide (several workers)
ROUND = 32  # images per candidate per round


def resolve_backbone(recipe: Recipe, bundle: DataBundle, strategy, precision: str, *,
                     stored: str | None = None, verbose: int = 1) -> tuple[Recipe, dict | None]:
    """``(recipe with a concrete backbone, what the probe found or None)``.

    A recipe that names its backbone comes back as it is. ``stored``: the backbone an interrupted
    run chose (a resumed run trains the same one without probing again)."""
    if recipe.backbone != "auto":
        return recipe, None
    cands = list(recipe.backbone_candidates)
    if stored:
        return recipe.override(backbone=stored), {"backbone": stored, "reason": "chosen when the run started"}
    if recipe.weights is None:
        return recipe.override(backbone=cands[0]), {
            "backbone": cands[0], "candidates": cands,
            "reason": f"weights=None (trained from scratch): no pretrained features to compare, so the "
                      f"cheapest candidate, {cands[0]}"}
    if recipe.weights != "imagenet":
        raise RecipeError(f"backbone=auto compares ImageNet-pretrained candidates, but weights={recipe.weights!r} "
                          "fits one backbone only: name it, e.g. --set backbone=efficientnet_lite0.")
    if len(cands) == 1:
        return recipe.override(backbone=cands[0]), {"backbone": cands[0], "candidates": cands,
                                                    "reason": "the only candidate"}
    fixed = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    return _probe(recipe, bundle, strategy, precision, cands, fixed, verbose)


def cheapest_of_best(probes: dict, margin: float = MARGIN) -> str:
    """The first (cheapest) of ``probes`` (name -> {"accuracy", ...}, cheapest first) whose
    accuracy is within ``margin`` of the best: the one rule ``auto`` and ``suggest`` choose by."""
    best = max(p["accuracy"] for p in probes.values())
    return next(n for n, p in probes.items() if p["accuracy"] >= best - margin)


def probe_order(y: np.ndarray, n_classes: int, seed: int) -> np.ndarray:
    """Every training row once, classes interleaved (each class's rows in a seeded random order):
    any prefix is a class-stratified sample of about its length."""
    rng = np.random.default_rng(seed)
    members = [rng.permutation(np.where(y == c)[0]) for c in range(n_classes)]
    longest = max((len(m) for m in members), default=0)
    # Row i of class c goes at position i / len(c): each class spread evenly over the order.
    keys = np.concatenate([(np.arange(len(m)) + 0.5) / len(m) * longest for m in members if len(m)])
    rows = np.concatenate([m for m in members if len(m)])
    return rows[np.argsort(keys, kind="stable")]


def _minimum(y_order: np.ndarray, n_classes: int) -> int:
    """The shortest prefix of the order holding min(MIN_PER_CLASS, class size) of every class."""
    need = np.minimum(np.bincount(y_order, minlength=n_classes), MIN_PER_CLASS)
    seen = np.zeros(n_classes, np.int64)
    for i, c in enumerate(y_order):
        seen[c] += 1
        if (seen >= need).all():
            return i + 1
    return len(y_order)


def _probe(recipe, bundle, strategy, precision, cands, fixed, verbose):
    t_start = time.time()
    k = len(bundle.classes)
    order = probe_order(bundle.train.y, k, recipe.seed)
    if fixed:
        per = np.minimum(np.bincount(bundle.train.y, minlength=k), FIXED_PER_CLASS)
        keep = np.concatenate([order[bundle.train.y[order] == c][:per[c]] for c in range(k)])
        order = order[np.isin(order, keep)]
    limit = len(order)
    floor = _minimum(bundle.train.y[order], k)
    runners = []
    for name in cands:
        r = recipe.override(backbone=name)
        plan = Plan.make(r, bundle, strategy, precision)
        tap = plan.taps()[0] if len(plan.taps()) == 1 else None
        asm = build(plan, tap)
        _, pool = cache_trainer(r, asm.head, int(asm.feature_model.output.shape[-1]))
        feat = pooled_features(asm, pool)
        if len(feat.output.shape) != 2:  # a conv head caches whole maps: probe on their average
            import keras
            feat = keras.Model(feat.input, keras.layers.GlobalAveragePooling2D()(feat.output))
        runners.append({"name": name, "recipe": r, "plan": plan, "tap": tap, "extractor": cache_extractor(r, feat),
                        "reusable": pool is not None and len(plan.taps()) == 1 and r.cache_views == 1,
                        "feats": [], "seconds": 0.0})
    done = 0
    bar = tqdm(total=limit, desc="backbone probe", unit="img", disable=verbose == 0, leave=False)
    while done < limit:
        if not fixed and done >= floor and time.time() - t_start > recipe.backbone_probe_seconds:
            break
        rows = order[done:done + ROUND]
        x = _rows(bundle.train.x, rows)
        for run in runners:
            t0 = time.time()
            run["feats"].append(np.asarray(run["extractor"].run(x), np.float32))
            run["seconds"] += time.time() - t0
            if "first" not in run:  # the first round pays for tracing and the engine's conversion
                run["first"] = (len(rows), run["seconds"])
        done += len(rows)
        bar.update(len(rows))
    bar.close()
    rows = order[:done]
    y = bundle.train.y[rows]
    cw = Plan.make(runners[0]["recipe"], bundle, strategy, precision).class_weights
    results = {}
    for run in runners:
        f = np.concatenate(run["feats"])
        probe = fit_probe(f, y, sample_weight=None if cw is None else cw[y], n_classes=k, seed=recipe.seed)
        acc = probe.inner_accuracy if probe.inner_accuracy is not None else probe.score(f, y)
        n0, s0 = run["first"]
        steady = (done - n0) / max(run["seconds"] - s0, 1e-9) if done > n0 else done / max(run["seconds"], 1e-9)
        results[run["name"]] = {"accuracy": round(float(acc), 4), "seconds": round(run["seconds"], 2),
                                "images_per_second": round(steady, 1),  # after the first round (warm)
                                "first_round_seconds": round(s0, 2), "C": probe.chosen_C}
    margin = max(MARGIN, 1.0 / done)
    chosen = cheapest_of_best(results, margin)
    best = max(r["accuracy"] for r in results.values())
    winner = next(r for r in runners if r["name"] == chosen)
    seeded = None
    if winner["reusable"] and winner["recipe"].feature_cache and not recipe.folds:  # k-fold: other bundles
        seeded = _seed_cache(winner, bundle, rows, np.concatenate(winner["feats"]))
    tried = ", ".join(f"{n} {r['accuracy']:.3f} ({r['seconds']:.1f} s)" for n, r in results.items())
    sample = (f"all {done} training images" if done == len(bundle.train)
              else f"a class-stratified sample of {done} of {len(bundle.train)} training images"
                   + (" (fixed size: several workers must choose alike)" if fixed
                      else f" (as many as {recipe.backbone_probe_seconds:g} s allowed)"))
    why = (f"cross-validated linear probe on {sample} at {runners[0]['plan'].size} px: {tried}; {chosen} is the "
           f"cheapest within {margin:.3f} of the best ({best:.3f})")
    log.info("backbone: %s", why)
    info = {"backbone": chosen, "candidates": cands, "probes": results, "images": int(done),
            "train_images": int(len(bundle.train)), "size": int(runners[0]["plan"].size), "margin": round(margin, 4),
            "seconds": round(time.time() - t_start, 2), "reason": why,
            # the winner's whole training set is in the cache; its speed over the rest, when measured
            "train_cached": seeded is not None,
            "winner_images_per_second": round(seeded[0] / seeded[1], 1) if seeded and seeded[0] and seeded[1] > 0
            else results[chosen]["images_per_second"]}
    return winner["recipe"], info


def _rows(x, rows: np.ndarray) -> np.ndarray:
    """The images of ``rows`` (in that order) from an array or a lazy store."""
    srt = np.argsort(rows)
    got = x.take(rows[srt]) if hasattr(x, "take") and not isinstance(x, np.ndarray) else x[np.sort(rows)]
    got = np.asarray(got)
    out = np.empty_like(got)
    out[srt] = got
    return out


def _seed_cache(winner: dict, bundle: DataBundle, rows: np.ndarray, feats: np.ndarray) -> tuple[int, float]:
    """The winner's training features into the cache under the key its head stage reads: the
    probed rows from ``feats``, the others computed now, written in row order a block at a time.
    Returns (rows computed, seconds) -- a warm measurement of the winner's speed."""
    plan, ext = winner["plan"], winner["extractor"]
    key = train_key(plan, bundle, ext, winner["tap"])
    if fcache.exists(key):
        return 0, 0.0
    n = len(bundle.train)
    where = np.full(n, -1, np.int64)
    where[rows] = np.arange(len(rows))
    block = 1024

    def fill(out):  # out: a writer of shape (1, n, d)
        for lo in range(0, n, block):
            idx = np.arange(lo, min(n, lo + block))
            got = np.empty((len(idx),) + feats.shape[1:], np.float32)
            have = where[idx] >= 0
            got[have] = feats[where[idx[have]]]
            if (~have).any():
                got[~have] = np.asarray(ext.run(_rows(bundle.train.x, idx[~have])), np.float32)
            out[0][lo:lo + len(idx)] = got

    t0 = time.time()
    fcache.cached_into(key, (1, n) + feats.shape[1:], np.float32, fill, enabled=True)
    seconds = time.time() - t0
    log.info("feature cache: %s's features of the %d probed training images kept, %d more computed (%.1f s)",
             plan.spec.name, len(rows), n - len(rows), seconds)
    return n - len(rows), seconds
