"""The doctor: data, label and model checks practitioners run before trusting a model, in one report."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from cleanlab.filter import find_label_issues
from scipy.stats import binomtest
from sklearn.model_selection import StratifiedKFold

from ..backbones import apply_freeze
from ..data import subsample
from ..runs.pictures import image_grid
from ..training.assemble import build
from ..training.isolation import preserved_global_state
from ..training.inputs import prepare
from ..training.lr_range import head_features, head_on_cache
from ..training.optim import make_optimizer
from ..training.probe import fit_probe

log = logging.getLogger("tuneflow")

IMBALANCE = 3.0  # largest / smallest class above this: the loss needs class weights or oversampling
LEAK_FAIL = 0.05  # share of val images duplicated in train above which the val accuracy means little
CONSTANT_STD = 1.0  # pixel std (0..255 units) below which an image is blank
MAX_LABEL_IMAGES = 600  # images through the backbone for the label check (subsampled, stratified)
SUSPECTS_SHOWN = 16
OVERFIT_IMAGES = 16  # the sanity check's tiny batch (10-20 examples, tuning notes section 8)
OVERFIT_STEPS = 150  # bounded: a working linear head fits 16 vectors in tens of Adam steps
GRAD_STEPS = 10  # first steps whose gradient norms are reported
# Update size per step relative to the weights (tuning notes section 3: the initial lr is often
# 1e-2..1e-6 of the parameters' magnitude). Adam at its 1e-3 default moves a fresh head's kernel
# by ~3% a step; above 30% a step (10x past the notes' ceiling) the lr is too high.
UPDATE_HIGH, UPDATE_LOW = 0.3, 1e-7
STATUS_ORDER = {"ok": 0, "warn": 1, "fail": 2}


def _check(name, status, detail, advice=""):
    return {"name": name, "status": status, "detail": detail, **({"advice": advice} if advice else {})}


def check_counts(bundle) -> dict:
    counts = bundle.counts("train")
    lo, hi = min(counts.values()), max(counts.values())
    text = ", ".join(f"{c} {n}" for c, n in counts.items())
    ratio = hi / max(lo, 1)
    if ratio > IMBALANCE:
        return _check("data.class_balance", "warn", f"train images per class: {text} (largest/smallest {ratio:.1f})",
                      "weight the loss (--set class_weight=balanced) or oversample the small classes "
                      "(--set sampling=balanced); judge by per-class recall, not accuracy")
    if lo < 5:
        return _check("data.class_balance", "warn", f"train images per class: {text}: a class has fewer than 5",
                      "collect more images of the small classes; expect a noisy validation accuracy")
    return _check("data.class_balance", "ok", f"train images per class: {text} (largest/smallest {ratio:.1f})")


def check_unreadable(bundle) -> dict:
    if bundle.skipped:
        more = f"; ... ({len(bundle.skipped)} in all)" if len(bundle.skipped) > 5 else ""
        shown = "; ".join(bundle.skipped[:5]) + more
        return _check("data.unreadable", "warn", f"{len(bundle.skipped)} files skipped: {shown}",
                      "repair or remove them (they are left out of training)")
    return _check("data.unreadable", "ok", "every image file decoded")


def check_leaks(bundle) -> dict:
    leaks = bundle.leaks
    if not leaks:
        return _check("data.train_val_duplicates", "ok", "no train image duplicates a validation image")
    share = len({b for _, b, _ in leaks}) / max(1, len(bundle.val))
    shown = "; ".join(f"{a} == {b} ({k})" for a, b, k in leaks[:3])
    return _check("data.train_val_duplicates", "fail" if share >= LEAK_FAIL else "warn",
                  f"{len(leaks)} validation images duplicate training images ({share:.0%} of val): {shown}",
                  "remove the duplicates from one split: the validation accuracy is inflated by them")


def check_pixels(bundle) -> dict:
    """Blank (constant, all-zero) images, and images whose values look scaled to 0..1."""
    x = np.concatenate([bundle.train.x, bundle.val.x])
    files = (bundle.train.files + bundle.val.files) if bundle.train.files else []
    flat = x.reshape(len(x), -1).astype(np.float32)
    lo, hi, std = flat.min(1), flat.max(1), flat.std(1)
    zero = np.where(hi == 0)[0]
    constant = np.where((std < CONSTANT_STD) & (hi > 0))[0]
    unit = np.where((hi <= 1.0) & (hi > 0))[0]
    name = (lambda i: files[i]) if files else (lambda i: f"image {i}")
    rng = f"pixel values {lo.min():g}..{hi.max():g} (median image max {np.median(hi):g})"
    if len(unit) > len(x) // 2 or (len(zero) + len(unit)) > len(x) // 2:
        return _check("data.pixel_range", "fail", f"{rng}: {len(unit)} of {len(x)} images look scaled to 0..1",
                      "pass pixels 0..255: the model's preprocessing expects them (multiply by 255)")
    problems = []
    if len(zero):
        problems.append(f"{len(zero)} all-zero (e.g. {name(int(zero[0]))})")
    if len(constant):
        problems.append(f"{len(constant)} constant (e.g. {name(int(constant[0]))})")
    if len(unit):
        problems.append(f"{len(unit)} with values in 0..1 (e.g. {name(int(unit[0]))})")
    if problems:
        return _check("data.pixel_range", "warn", f"{rng}; blank or odd images: {'; '.join(problems)}",
                      "look at them: blank files from a failed export or a wrong scaling should be removed or fixed")
    return _check("data.pixel_range", "ok", f"{rng}; no blank or 0..1-scaled images")


def _stratified(y, limit, seed):
    if len(y) <= limit:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        m = np.where(y == c)[0]
        keep.extend(rng.choice(m, max(1, int(round(limit * len(m) / len(y)))), replace=False))
    return np.sort(np.asarray(keep))


def label_features(plan, bundle, asm):
    """(rows, features, labels, names) the label check judges: a stratified sample of train and
    val (at most MAX_LABEL_IMAGES; ``rows`` index train then val) and the frozen backbone's pooled
    features of it, through the feature cache. A name is the image's file, or ``image N`` (its
    row) for in-memory data."""
    y_all = np.concatenate([bundle.train.y, bundle.val.y])
    files = bundle.train.files + bundle.val.files if bundle.train.files else []
    rows = _stratified(y_all, MAX_LABEL_IMAGES, plan.recipe.seed)
    apply_freeze(asm.backbone, plan.spec, "frozen", freeze_bn=plan.freeze_bn)
    ftr, fva = head_features(plan, bundle, asm)
    feats = np.concatenate([ftr, fva])[rows]
    names = [files[i] for i in rows] if files else [f"image {i}" for i in rows]
    return rows, feats.reshape(len(feats), -1), y_all[rows], names


def _images(bundle, rows):
    """The images at ``rows`` of train then val, without copying the whole set."""
    n = len(bundle.train)
    return np.stack([bundle.train.x[r] if r < n else bundle.val.x[r - n] for r in rows])


def out_of_fold_probs(features, y, n_classes, seed=0):
    """Class probabilities of each image from a linear probe that did not see it (stratified
    k-fold, k = 5 or the rarest class's count), or None when a class has fewer than 2 images."""
    folds = int(min(5, np.bincount(y, minlength=n_classes)[np.unique(y)].min()))
    if folds < 2:
        return None
    probs = np.zeros((len(y), n_classes))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, y):
        # A short C grid: the label check needs a reasonable probe, not the best one (it runs 5 times).
        probe = fit_probe(features[tr], y[tr], n_classes=n_classes, seed=seed, grid=(1e-2, 1e-1, 1.0))
        probs[te] = probe.predict_proba(features[te])
    return probs


def label_suspects(probs, y):
    """The images whose given label the out-of-fold probabilities doubt, most doubtful first.

    cleanlab's ``find_label_issues`` (confident learning, Northcutt et al. 2021): the confident
    joint of given and likely-true labels estimates how many images of each class carry each
    wrong label, and that many are flagged per pair, those with the largest margin first
    (``prune_by_noise_rate``). Ranked by self-confidence p_i, lowest first. It replaced a
    hand-written thresholds rule (cleanlab's ``filter_by="confident_learning"`` again): on labels
    flipped at 5-20% on four sets, F1 0.672 against 0.650, from higher recall
    (benchmarks/bench_label_check.py, docs/guide/doctor-label-check.md)."""
    # n_jobs=1: the doctor's few hundred images take milliseconds; no worker processes to start.
    return np.asarray(find_label_issues(y, probs, return_indices_ranked_by="self_confidence", n_jobs=1), int)


def check_labels(plan, bundle, asm, out_dir):
    rows, feats, y, all_names = label_features(plan, bundle, asm)
    k = len(plan.classes)
    probs = out_of_fold_probs(feats, y, k, plan.recipe.seed)
    if probs is None:
        return _check("labels.suspects", "warn", "too few images per class to cross-validate the labels",
                      "collect at least 2 images per class"), None
    flagged = label_suspects(probs, y)
    acc = float(np.mean(probs.argmax(1) == y))
    majority = float(np.bincount(y, minlength=k).max() / len(y))
    p = binomtest(int(round(acc * len(y))), len(y), majority, alternative="greater").pvalue
    png = None
    if len(flagged):
        shown = flagged[:SUSPECTS_SHOWN]
        names = [all_names[i] for i in shown]
        captions = [f"{Path(n).name[:24]}\ngiven {plan.classes[y[i]]} ({probs[i, y[i]]:.2f}), probe: "
                    f"{plan.classes[probs[i].argmax()]} ({probs[i].max():.2f})" for n, i in zip(names, shown)]
        png = image_grid(_images(bundle, rows[shown]), captions, Path(out_dir) / "suspects.png",
                         "Images most likely mislabelled (cross-validated linear probe)")
    detail = (f"cross-validated linear probe on the frozen features: accuracy {acc:.3f} on {len(y)} images "
              f"(majority class {majority:.3f}); {len(flagged)} suspected label errors"
              + (f", worst: {', '.join(Path(n).name for n in names[:3])}" if len(flagged) else ""))
    if p > 0.05:
        return _check("labels.suspects", "fail", detail + f"; no better than chance (binomial p={p:.2f})",
                      "the labels carry nothing the backbone can see: check that each folder holds its "
                      "class (shuffled or swapped labels?), or the data is far from the backbone's"), png
    if len(flagged) > 0.1 * len(y):
        return _check("labels.suspects", "warn", detail, "look at suspects.png: relabel or remove the true "
                      "mistakes; many suspects can also mean look-alike classes"), png
    return _check("labels.suspects", "ok", detail), png


def check_model(plan, bundle, asm, stage_index=0):
    """Initial loss vs ln K, activation statistics of the new layers, overfitting one tiny batch,
    gradient norms over the first steps, NaN/Inf: the head on cached features of a stratified
    16-image batch, trained with the stage's optimizer at its lr."""
    import keras
    import tensorflow as tf

    r = plan.recipe
    k = len(plan.classes)
    st = r.stages[stage_index]
    trainer, ftr, _ = head_on_cache(plan, bundle, asm)
    y = bundle.train.y
    rng = np.random.default_rng(r.seed)
    pick = [rng.choice(np.where(y == c)[0]) for c in np.unique(y)]
    rest = rng.permutation(np.setdiff1d(np.arange(len(y)), pick))
    pick = np.asarray(list(pick) + list(rest[:max(0, OVERFIT_IMAGES - len(pick))]))
    fx, fy = ftr[pick], y[pick]
    checks = []
    p0 = np.asarray(trainer(fx, training=False), np.float64)
    loss0 = float(-np.mean(np.log(np.clip(p0[np.arange(len(fy)), fy], 1e-12, 1))))
    ln_k = math.log(k)
    bad = abs(loss0 - ln_k) > max(0.5, 0.5 * ln_k)
    checks.append(_check("model.initial_loss", "warn" if bad else "ok",
                         f"initial loss {loss0:.3f} vs ln(K) = {ln_k:.3f} for {k} classes",
                         "the head starts confident: shrink the classifier's initial weights or check the "
                         "features' scale" if bad else ""))
    checks.append(_activations(trainer, fx))
    opt = make_optimizer(replace(st, schedule="constant"), plan.stage_lr(st), 1, r.clipnorm)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    tx, ty = tf.constant(fx), tf.constant(fy)
    variables = trainer.trainable_variables

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(ty, tf.cast(trainer(tx, training=True), tf.float32))
            total = loss + (tf.add_n([tf.cast(v, tf.float32) for v in trainer.losses]) if trainer.losses else 0.0)
        grads = tape.gradient(total, variables)
        opt.apply_gradients(zip(grads, variables))
        return loss, tf.linalg.global_norm(grads)

    saved = [np.array(v.numpy(), copy=True) for v in trainer.variables]
    losses, norms, ratios = [], [], []
    kernels = [v for v in variables if len(v.shape) > 1]  # biases start at 0: no ratio to take
    t0 = time.time()
    try:
        for i in range(OVERFIT_STEPS):
            before = [np.array(v.numpy(), np.float64) for v in kernels] if i < GRAD_STEPS else None
            loss, norm = (float(v) for v in step())
            if before is not None:
                moved = math.sqrt(sum(float(np.sum((np.asarray(v.numpy(), np.float64) - b) ** 2))
                                      for v, b in zip(kernels, before)))
                size = math.sqrt(sum(float(np.sum(b ** 2)) for b in before))
                ratios.append(moved / size if size > 0 else math.inf)
            losses.append(loss)
            norms.append(norm)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                break
        p = np.asarray(trainer(fx, training=False), np.float64)
        finite = bool(np.isfinite(p).all()) and all(np.isfinite(v.numpy()).all() for v in variables)
    finally:
        for v, s in zip(trainer.variables, saved):
            v.assign(s)
    acc = float(np.mean(p.argmax(1) == fy)) if finite else 0.0
    lr = plan.stage_lr(st)
    what = f"{len(fy)} images, head on cached features, {st.optimizer} at lr {lr:g}"
    nonfinite = not finite or not all(math.isfinite(v) for v in losses + norms)
    checks.append(_check("model.nan_inf", "fail" if nonfinite else "ok",
                         f"NaN/Inf in the loss, gradients or weights within {len(losses)} steps" if nonfinite
                         else "loss, gradients and weights finite",
                         "lower the lr (x0.1), clip gradients (--set clipnorm=5), check the inputs' scale"
                         if nonfinite else ""))
    peak = max(losses) if losses else math.nan
    spiky = math.isfinite(peak) and peak > 3 * max(losses[0], ln_k)
    if acc < 0.99:
        status, detail = "fail", (f"overfitting one batch ({what}): training accuracy {acc:.2f} after "
                                  f"{len(losses)} steps (loss {losses[0]:.3f} -> {losses[-1]:.3f}); pipeline broken")
        advice = ("a correct pipeline fits 16 examples: check the labels and inputs; if the loss jumps "
                  "around, the lr is too high (run `tuneflow lr-find`)")
    elif spiky:
        status, detail = "warn", (f"overfitting one batch ({what}): accuracy {acc:.2f}, but the loss spiked to "
                                  f"{peak:.3g} (from {losses[0]:.3f}): the lr looks too high")
        advice = "lower the lr: `tuneflow lr-find` suggests one"
    else:
        status, detail, advice = "ok", (f"overfitting one batch ({what}): accuracy {acc:.2f} after {len(losses)} "
                                        f"steps, loss {losses[0]:.3f} -> {losses[-1]:.3g} "
                                        f"({time.time() - t0:.1f} s)"), ""
    checks.append(_check("model.overfit_one_batch", status, detail, advice))
    first = norms[:GRAD_STEPS]
    text = ", ".join(f"{v:.3g}" for v in first)
    if not first or not all(math.isfinite(v) for v in first):
        checks.append(_check("model.gradient_norms", "fail", f"global gradient norm over the first steps: {text}",
                             "NaN/Inf gradients: lower the lr, clip (--set clipnorm=5)"))
    elif max(first) > 10 * first[0] or max(first) > 1e3:
        checks.append(_check("model.gradient_norms", "warn", f"global gradient norm over the first steps: {text} "
                             "(growing: the updates overshoot)", "lower the lr or clip (--set clipnorm=5)"))
    elif max(first) < 1e-7:
        checks.append(_check("model.gradient_norms", "warn", f"global gradient norm over the first steps: {text} "
                             "(vanishing)", "check the head's initialisation and the features' scale"))
    else:
        checks.append(_check("model.gradient_norms", "ok", f"global gradient norm over the first steps: {text}"))
    checks.append(_update_check(ratios, st.optimizer, lr))
    return checks


def _update_check(ratios, optimizer, lr):
    finite = [r for r in ratios if math.isfinite(r)]
    if not finite:
        return _check("model.update_size", "fail", "no finite update in the first steps",
                      "lower the lr, clip gradients (--set clipnorm=5)")
    # The largest of the first steps: a too-high lr shows at once (the first step of Adam moves
    # every weight by lr), then the grown weights hide it.
    mid = float(np.max(finite))
    detail = (f"{optimizer} at lr {lr:g} moves the new layers' kernels by up to {mid:.2g} of their norm per "
              f"step (first {len(finite)} steps; the notes give 1e-6..1e-2 as typical, above "
              f"{UPDATE_HIGH:g} is too high)")
    if mid > UPDATE_HIGH:
        return _check("model.update_size", "warn", detail + ": the lr is too high",
                      f"lower the lr (about {lr * 1e-2 / mid:.2g} gives 1e-2 a step) or run `tuneflow lr-find`")
    if mid < UPDATE_LOW:
        return _check("model.update_size", "warn", detail + ": the lr is too low to move the weights",
                      "raise the lr or run `tuneflow lr-find`")
    return _check("model.update_size", "ok", detail)


def _activations(trainer, fx):
    """Mean/std of each new layer's output at initialisation (inference mode), dead ReLU units,
    and the classifier's logits (collapsed to a constant, or saturating the softmax)."""
    x = fx
    parts, dead, saturated = [], [], False
    for layer in trainer.layers:
        if layer.name.endswith("classifier"):
            kernel, bias = (np.asarray(w, np.float64) for w in layer.get_weights())
            logits = x.reshape(len(x), -1) @ kernel + bias
            parts.append(f"logits mean {logits.mean():.3g} std {logits.std():.3g}")
            saturated = float(np.abs(logits - logits.mean(1, keepdims=True)).max()) > 20
            break
        x = np.asarray(layer(x, training=False), np.float64)
        if "dropout" in layer.name:
            continue
        parts.append(f"{layer.name} mean {x.mean():.3g} std {x.std():.3g}")
        if "relu" in layer.name:
            d = float(np.mean((x.reshape(len(x), -1) <= 0).all(0)))
            parts.append(f"{d:.0%} dead units")
            dead.append(d)
    detail = "at initialisation: " + "; ".join(parts)
    if saturated or any(d > 0.5 for d in dead):
        return _check("model.activations", "warn", detail, "the new layers start saturated or dead: check the "
                      "initialisation (He for ReLU) and the features' scale")
    return _check("model.activations", "ok", detail)


def doctor(data, recipe=None, out=None, overrides=(), stage: int = 0) -> dict:
    """Run every check on ``data`` (for ``recipe``, default small_similar); write ``doctor.md``
    (and ``suspects.png``) in ``out`` (default: the current folder). Returns
    ``{"checks": [{"name", "status", "detail"[, "advice"]}], "verdict", "next", "report"}``.

    >>> doctor("data/digits")["verdict"]              # doctest: +SKIP
    """
    with preserved_global_state():
        return _doctor(data, recipe or "small_similar", out, overrides, stage)


def _doctor(data, recipe, out, overrides, stage) -> dict:
    t0 = time.time()
    recipe, bundle, plan = prepare(recipe, data, overrides, one_device=True)
    out_dir = Path(out) if out is not None else Path.cwd()
    out_dir.mkdir(parents=True, exist_ok=True)
    checks = [check_counts(bundle), check_unreadable(bundle), check_leaks(bundle), check_pixels(bundle)]
    asm = build(plan, plan.taps()[0])
    # Model and label checks on a stratified subsample: seconds, whatever the folder's size.
    total = len(bundle.train) + len(bundle.val)
    if total > MAX_LABEL_IMAGES:
        bundle = subsample(replace(bundle), MAX_LABEL_IMAGES / total, seed=recipe.seed)
    label, png = check_labels(plan, bundle, asm, out_dir)
    checks.append(label)
    checks += check_model(plan, bundle, asm, stage)
    worst = max(checks, key=lambda c: STATUS_ORDER[c["status"]])["status"]
    n_fail = sum(c["status"] == "fail" for c in checks)
    n_warn = sum(c["status"] == "warn" for c in checks)
    verdict = {"ok": "healthy: train it",
               "warn": f"usable, with {n_warn} warning(s): read them before trusting the accuracy",
               "fail": f"not ready: {n_fail} check(s) failed; fix them before training"}[worst]
    todo = [f"{c['name']}: {c['advice']}" for c in sorted(checks, key=lambda c: -STATUS_ORDER[c["status"]])
            if c["status"] != "ok" and c.get("advice")]
    if worst == "ok":
        todo = [f"`tuneflow lr-find {recipe.name} --data {bundle.source}` for the learning rate, then "
                f"`tuneflow finetune {recipe.name} --data {bundle.source}`"]
    report = out_dir / "doctor.md"
    lines = [f"# tuneflow doctor: {bundle.source or 'data'} ({recipe.name})", "",
             f"{len(bundle.train)} train / {len(bundle.val)} val images, {len(bundle.classes)} classes, "
             f"{plan.size} px; {time.time() - t0:.1f} s", "", f"**Verdict: {verdict}**", "",
             "| check | status | detail |", "| --- | --- | --- |"]
    lines += [f"| {c['name']} | {c['status']} | {c['detail'].replace('|', '/')} |" for c in checks]
    lines += ["", "## What to do next", ""] + [f"- {t}" for t in todo]
    if png is not None:
        lines += ["", "## Suspected label errors", "", f"![suspects]({png.name})"]
    tmp = report.with_name(report.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(report)
    return {"checks": checks, "verdict": verdict, "next": todo, "report": str(report),
            "suspects": str(png) if png else None}


def cli_doctor(args) -> int:
    result = doctor(args.data, args.recipe, args.out, args.overrides)
    if args.json:
        print(json.dumps({"checks": [{k: c[k] for k in ("name", "status", "detail")} for c in result["checks"]],
                          "verdict": result["verdict"]}))
        return 0
    for c in result["checks"]:
        print(f"{c['status']:4s}  {c['name']:26s} {c['detail']}")
    print(f"verdict: {result['verdict']}")
    for t in result["next"]:
        print(f"  - {t}")
    print(f"report: {result['report']}")
    return 0
