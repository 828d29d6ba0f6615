"""The LR range test: the learning rate grown exponentially over a few steps, loss recorded, a
suggestion; and ``lr=auto`` resolved by it before a run trains (``tuneflow lr-find`` reports it:
:mod:`tuneflow.workbench.lr_find`)."""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from ..backbones import apply_freeze
from ..data.pipeline import train_dataset
from ..errors import RecipeError
from .assemble import assemble, make_backbone
from .cached import cache_extractor, cache_trainer, cached_features, pooled_features, uses_cache
from .inputs import prepare, resolve_recipe
from .isolation import preserved_global_state
from .optim import make_optimizer
from .probe import fit_probe
from .standardise import StandardisedHead, standardises
from .taps import choose_tap

log = logging.getLogger("tuneflow")

START_LR, END_LR = 1e-7, 10.0  # the range swept; 10 is also the recipe's upper bound for an lr
STEPS = 100  # optimizer steps over the range: ~12 per decade, as fastai's default num_it
BETA = 0.98  # causal EMA of the loss (debiased): the divergence stop and fastai's valley rule
DIVERGE = 4.0  # stop once the EMA of the loss exceeds this many times its minimum (fastai's rule) ...
# ... and exceeds it by this many nats too: a model that already fits its batches (a probed head
# before an unfrozen stage: loss ~3e-4) has batch-to-batch noise of 4x and more at the smallest
# LR, which the ratio alone called divergence after 2 steps. A real blow-up rises by nats.
DIVERGE_MIN_RISE = 0.1
WINDOW = 0.25  # decades: the standard deviation, in log10(LR), of the smoother's Gaussian kernel
RULES = ("valley", "steep", "min")
# An inconclusive curve, judged on the zero-lag curve. The four readable recorded range tests
# (benchmarks/results/lr_find_ema.json) fall by 22-98% from their start (the mean of the first 10%
# of the steps) to their minimum, at step 72-78 of ~100; brain_mri_yn's flat one has its minimum at
# step 1. Flat curves (0.69, Gaussian noise sd 0.03 per step) fall by up to 9% by chance (200 seeds).
EARLY = 0.10  # the minimum in the first 10% of the steps (~0.8 decade by default): nothing fell
MIN_DROP = 0.15  # the minimum less than 15% below the start: no fall to read a rule from


def range_test(model, optimizer, loss_fn, batches, start_lr: float = START_LR, end_lr: float = END_LR,
               steps: int = STEPS, diverge: float = DIVERGE) -> dict:
    """Train ``model`` with ``optimizer`` on ``batches`` (an iterator of (x, y[, w])) while the LR
    grows from ``start_lr`` to ``end_lr`` by a constant factor per step; stop after ``steps`` or on
    divergence. Every model and optimizer variable (weights, BN statistics, moments, iteration
    count, learning rate) is put back afterwards, so the caller's objects are as they were.

    Returns ``{"lrs", "losses", "smoothed", "ema", "stopped"}``: the LR each step ran at, its raw
    loss, :func:`smooth` of the finite losses (computed after the run) and their causal EMA
    (:func:`ema`). The stop watches the EMA: it must decide from the steps seen so far.
    """
    train_vars = model.trainable_variables
    if not train_vars:
        raise RecipeError("The LR range test found nothing to train: every layer of the model is frozen.")
    if not optimizer.built:  # its moments must exist now, to be saved and put back
        optimizer.build(train_vars)
    saved = [(v, np.array(v.numpy(), copy=True)) for v in list(model.variables) + list(optimizer.variables)]
    saved_lr = float(np.asarray(optimizer.learning_rate))
    factor = (end_lr / start_lr) ** (1.0 / max(1, steps - 1))

    @tf.function
    def step(x, y, w):
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            loss = loss_fn(y, probs, sample_weight=w)
            if model.losses:  # L1/L2 of the new layers: part of what the optimizer minimises
                loss += tf.add_n([tf.cast(r, tf.float32) for r in model.losses])
        grads = tape.gradient(loss, train_vars)
        optimizer.apply_gradients(zip(grads, train_vars))
        return loss

    lrs, losses = [], []
    avg, best, stopped = 0.0, math.inf, "end of range"
    try:
        for i in range(steps):
            lr = start_lr * factor ** i
            optimizer.learning_rate = lr
            b = next(batches)
            w = b[2] if len(b) > 2 else tf.ones_like(tf.cast(b[1], tf.float32))
            loss = float(step(tf.convert_to_tensor(b[0]), tf.convert_to_tensor(b[1]), w))
            lrs.append(lr)
            losses.append(loss)
            if not math.isfinite(loss):
                stopped = f"NaN/Inf loss at lr {lr:.3g}"
                break
            avg = BETA * avg + (1 - BETA) * loss
            s = avg / (1 - BETA ** (i + 1))
            best = min(best, s)
            if s > diverge * best and s - best > DIVERGE_MIN_RISE:
                stopped = f"diverged at lr {lr:.3g} (loss EMA {s:.3g} > {diverge:g} x minimum {best:.3g})"
                break
    finally:
        for v, value in saved:
            v.assign(value)
        optimizer.learning_rate = saved_lr
    n = sum(1 for x in losses if math.isfinite(x))  # a NaN/Inf can only be the last step
    return {"lrs": lrs, "losses": losses, "smoothed": list(smooth(lrs[:n], losses[:n])),
            "ema": list(ema(losses[:n])), "stopped": stopped}


def ema(losses, beta: float = BETA) -> np.ndarray:
    """fastai's smoothing of the loss: the causal exponential moving average per step, debiased
    (divided by 1 - beta**(i+1)) so the first steps are not pulled toward zero."""
    out, avg = np.empty(len(losses)), 0.0
    for i, v in enumerate(losses):
        avg = beta * avg + (1 - beta) * float(v)
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def smooth(lrs, losses, window: float = WINDOW) -> np.ndarray:
    """The loss curve smoothed with no lag: at each LR, a straight line fitted to the losses by
    least squares weighted with a Gaussian in log10(LR) of standard deviation ``window`` decades
    (local linear regression, LOWESS-like), and its value there.

    Why not the EMA per step that fastai smooths with (:func:`ema`): a causal average trails the
    curve. With beta 0.98 its mean lag is ~50 steps, ~4 decades over 100 steps spanning 8, so its
    minimum and its steepest fall sit to the right of the raw loss's. The steepest-slope and
    minimum/10 rules read this curve; the valley rule keeps the EMA it was defined on. Here each
    point is weighted symmetrically, and the local line keeps a straight stretch (even at either
    end of the range) where it is instead of pulling it toward the middle. The window is in
    decades, not steps, so it means the same for any number of steps.
    """
    x = np.log10(np.asarray(lrs, np.float64))
    y = np.asarray(losses, np.float64)
    if len(y) < 3:
        return y.copy()
    d = x[None, :] - x[:, None]  # row i: each step's distance from step i, in decades
    w = np.exp(-0.5 * (d / window) ** 2)
    s0, s1, s2 = w.sum(1), (w * d).sum(1), (w * d * d).sum(1)
    t0, t1 = (w * y).sum(1), (w * d * y).sum(1)
    det = s0 * s2 - s1 ** 2
    flat = det <= 1e-12 * s0 * s2  # a window with one point in it: its weighted mean
    return np.where(flat, t0 / s0, (s2 * t0 - s1 * t1) / np.where(flat, 1.0, det))


def valley(lrs, losses) -> float:
    """fastai's "valley" rule: the longest run of steps over which the smoothed loss keeps falling
    (the longest decreasing subsequence of the curve, O(n^2) for n <= a few hundred), and the LR
    at about half-way into its middle third (start + len/3 + len/6): inside the steep descent, safely
    before the minimum, where the loss is still falling fastest for a whole stretch.

    fastai defines this rule on its causal EMA (beta 0.98, :func:`ema`) and chose the offsets on
    that curve, whose lag they absorb; :func:`suggest` therefore applies it to the EMA. On the
    zero-lag curve the same offsets land earlier: 0 of 5 benchmark pairs within half a decade of
    the best grid LR, against 3 of 5 on the EMA (benchmarks/results/lr_find_ema.json)."""
    n = len(losses)
    lds, max_start, max_end = [1] * n, 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end, max_start = i, i - lds[i]
    sections = (max_end - max_start) / 3
    return float(lrs[min(n - 1, max_start + int(sections) + int(sections / 2))])


def steepest(lrs, losses) -> float:
    """The LR where the smoothed loss falls fastest per unit of log(LR)."""
    if len(losses) < 2:
        return float(lrs[0])
    g = np.diff(losses) / np.diff(np.log(lrs))
    return float(lrs[int(np.argmin(g))])


def minimum_tenth(lrs, losses) -> float:
    """One tenth of the LR at the smoothed loss's minimum (Smith's rule of thumb)."""
    return float(lrs[int(np.argmin(losses))] / 10)


def inconclusive(lrs, smoothed) -> str | None:
    """Why a (zero-lag) smoothed curve has no fall to read an LR from, or None: its minimum lies in
    the first ``EARLY`` of the steps, or is less than ``MIN_DROP`` below its start (the mean over
    those first steps: one end point of a smoothed curve is the noisiest)."""
    s = np.asarray(smoothed, np.float64)
    i = int(np.argmin(s))
    start = float(np.mean(s[:max(1, int(EARLY * len(s)))]))
    drop = (start - s[i]) / max(abs(start), 1e-12)
    if i < EARLY * len(s):
        return (f"the smoothed loss is lowest at the start of the range (step {i + 1} of {len(s)}, "
                f"lr {lrs[i]:.2g}): it never fell; start the range lower (--min-lr) or check the data "
                "(labels, too few or duplicated images, a task the frozen features already fit)")
    if drop < MIN_DROP:
        return (f"the smoothed loss falls only {100 * drop:.1f}% from its start to its minimum "
                f"(lr {lrs[i]:.2g}; under {100 * MIN_DROP:g}%); try a larger end of the range (--max-lr), "
                "more --steps, or check the data (labels, class balance)")
    return None


ADVICE = "no LR can be read from this curve: its three numbers are not a suggestion"


def suggest(curve: dict, rule: str = "valley") -> dict:
    """The three rules on the raw losses of ``curve`` (a NaN/Inf step and the step that set off the
    divergence stop excluded): valley on their causal EMA (:func:`ema`, as fastai defines it),
    steepest slope and minimum/10 on :func:`smooth`. ``"inconclusive"`` is None, or the reason
    (:func:`inconclusive`) the curve has no fall to read the rules from."""
    if rule not in RULES:
        raise RecipeError(f"rule={rule!r}: choose one of {', '.join(RULES)}.")
    n = sum(1 for x in curve["losses"] if math.isfinite(x))
    if "diverged" in curve["stopped"]:
        n -= 1
    if n < 3:
        raise RecipeError(f"The LR range test stopped after {len(curve['losses'])} steps ({curve['stopped']}): "
                          "too few to suggest an LR. Lower the start of the range (--min-lr, start_lr) or check the data.")
    lrs = curve["lrs"][:n]
    s = smooth(lrs, curve["losses"][:n])
    found = {"valley": valley(lrs, ema(curve["losses"][:n])), "steep": steepest(lrs, s), "min": minimum_tenth(lrs, s)}
    return {"suggested_lr": found[rule], "rule": rule, "steep": found["steep"], "min": found["min"],
            "inconclusive": inconclusive(lrs, s)}


def plot(curve: dict, found: dict, path: Path, title: str = "") -> Path:
    """Loss against LR (log x): raw loss faint, the zero-lag curve, the causal EMA thin and dashed,
    each suggestion marked on the curve its rule read; a note when the curve is inconclusive."""
    import textwrap

    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 4.4), dpi=110, layout="constrained")  # room for every label and the title
    ax = fig.subplots()
    n = len(curve["smoothed"])
    lrs = np.asarray(curve["lrs"][:n])
    ax.plot(curve["lrs"][:len(curve["losses"])], curve["losses"], color="0.75", lw=0.8, label="loss per batch")
    ax.plot(lrs, curve["smoothed"], color="C0", lw=1.8, label=f"zero-lag (local linear, {WINDOW:g}-decade window)")
    avg = curve["ema"] if "ema" in curve else list(ema(curve["losses"][:n]))
    ax.plot(lrs, avg, color="C4", lw=1.0, ls="--", label=f"causal EMA (beta {BETA:g})")
    marks = (("valley", "C3", "o", avg, "on EMA"), ("steep", "C2", "^", curve["smoothed"], "on zero-lag"),
             ("min", "C1", "s", curve["smoothed"], "on zero-lag"))
    for key, color, marker, on, which in marks:
        lr = found["suggested_lr"] if key == found["rule"] else found[key]
        y = float(np.interp(np.log(lr), np.log(lrs), on))
        label = {"valley": "valley", "steep": "steepest slope", "min": "minimum / 10"}[key]
        ax.plot([lr], [y], marker=marker, color=color, ms=9, ls="none",
                label=f"{label} ({which}): {lr:.2g}" + (" (suggested)" if key == found["rule"] else ""))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    raw = np.asarray(curve["losses"][:n])
    lo = min(min(curve["smoothed"]), float(np.percentile(raw, 5)))  # the raw dip shows too, not only the mean
    hi = max(curve["smoothed"][:max(1, n // 10)])
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), max(hi, lo) + 0.6 * (hi - lo + 1e-9))
    ax.set_title("\n".join(textwrap.wrap(title or "LR range test", 70)), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    if found.get("inconclusive"):  # above the axes, where no curve or legend can hide it
        fig.suptitle("\n".join(textwrap.wrap(f"INCONCLUSIVE: {found['inconclusive']}", 90)), fontsize=8, color="C3")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return path


def _batches(arrays, batch: int, seed: int):
    """Endless shuffled mini-batches of in-memory arrays (new order every pass)."""
    rng = np.random.default_rng(seed)
    n = len(arrays[1])
    while True:
        idx = rng.permutation(n)
        for b in range(0, n - (n % batch if n > batch else 0), batch):
            sel = idx[b:b + batch]
            yield tuple(a[sel] for a in arrays)


def _stage_index(recipe, stage) -> int:
    names = [s.name for s in recipe.stages]
    if isinstance(stage, str) and not stage.isdigit():
        if stage not in names:
            raise RecipeError(f"stage={stage!r}: {recipe.name} has stages {', '.join(names)}.")
        return names.index(stage)
    i = int(stage)
    if not 0 <= i < len(names):
        raise RecipeError(f"stage={stage}: {recipe.name} has stages 0..{len(names) - 1} ({', '.join(names)}).")
    return i


def _cached_head(plan, bundle, asm):
    """(the plain head on cached vectors, train features (views, N, C), val features), from the
    cache the run's head stage uses (same pooling, engine and precision)."""
    plain, pool = cache_trainer(plan.recipe, asm.head, int(asm.feature_model.output.shape[-1]))
    ftr, fva = cached_features(plan, bundle, cache_extractor(plan.recipe, pooled_features(asm, pool)), asm.tap)
    return plain, ftr, fva


def head_features(plan, bundle, asm):
    """(train features, val features) as float32 arrays, the first view of the training cache."""
    _, ftr, fva = _cached_head(plan, bundle, asm)
    return np.asarray(ftr[0], np.float32), np.asarray(fva, np.float32)


def head_on_cache(plan, bundle, asm):
    """(trainer, train features, val features) for the head on cached pooled features: the same
    trainer the stage trains (a linear head on standardised features, see
    :mod:`~tuneflow.training.standardise`), on the same cache."""
    trainer, ftr, fva = _cached_head(plan, bundle, asm)
    if standardises(plan.recipe):
        with plan.strategy.scope():
            trainer = StandardisedHead(plan.recipe, trainer, ftr).trainer
    return trainer, np.asarray(ftr[0], np.float32), np.asarray(fva, np.float32)


def lr_find(recipe, data, stage=0, overrides=(), out=None, *, start_lr: float = START_LR,
            end_lr: float = END_LR, steps: int = STEPS, rule: str = "valley", plot_name: str = "lr_find.png") -> dict:
    """Run the LR range test for one stage of ``recipe`` on ``data``; write ``lr_find.png`` in ``out``.

    A frozen stage trains the head on cached pooled features (seconds); any other stage applies its
    freeze spec and trains the whole model on image batches. The head sits on the depth ``finetune``
    would keep: with several taps (``taps=auto``), the same depth probe, cached, so a later finetune
    does not pay for it again; the result names it (``"tap"``). For a stage after the first, the
    head is first set by a linear probe on the frozen features (what the head stage would leave),
    so the test measures the stage itself, not a random head.

    >>> lr_find("small_similar", "data/digits", overrides={"head_solver": "sgd"})  # doctest: +SKIP
    {'suggested_lr': 0.0025, 'rule': 'valley', 'steep': ..., 'min': ..., 'inconclusive': None, ...}

    ``"inconclusive"`` is None, or why the curve has no fall to read an LR from (the numbers are
    then not to be trusted; a warning is logged).
    """
    if not 0 < start_lr < end_lr:
        raise RecipeError(f"start_lr={start_lr:g}, end_lr={end_lr:g} (--min-lr, --max-lr): need "
                          f"0 < start_lr < end_lr; the default range is {START_LR:g} to {END_LR:g}.")
    if steps < 5:
        raise RecipeError(f"steps={steps} (--steps): the range test needs at least 5 steps (default {STEPS}).")
    with preserved_global_state():
        return _lr_find(recipe, data, stage, overrides, out, start_lr, end_lr, steps, rule, plot_name)


def _lr_find(recipe, data, stage, overrides, out, start_lr, end_lr, steps, rule, plot_name) -> dict:

    recipe, bundle, plan = prepare(recipe, data, overrides, one_device=True)
    si = _stage_index(recipe, stage)
    st = recipe.stages[si]
    asm = _assemble_at_finetunes_tap(plan, bundle)
    cached = uses_cache(plan, st)
    if si > 0 and recipe.head == "linear":
        _probe_head(plan, bundle, asm)
    w_all = plan.class_weights
    if cached:
        trainer, ftr, _ = head_on_cache(plan, bundle, asm)
        y = bundle.train.y
        arrays = (ftr, y) if w_all is None else (ftr, y, w_all[y].astype(np.float32))
        batches = _batches(arrays, plan.global_batch, recipe.seed)
        what = f"stage {st.name!r}: head on cached features"
    else:
        apply_freeze(asm.backbone, plan.spec, plan.stage_train(st), freeze_bn=plan.freeze_bn)
        trainer = asm.model
        ds = train_dataset(bundle.train, plan.global_batch, augment=recipe.augment, backend=recipe.augment_backend,
                           sampling=recipe.sampling, weights=w_all, seed=recipe.seed + si, repeat=True)
        batches = iter(ds)
        what = f"stage {st.name!r}: train={plan.stage_train(st)} on images"
    opt = make_optimizer(replace(st, schedule="constant"), start_lr, 1, recipe.clipnorm)
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing)
    k = len(plan.classes)

    def loss_fn(y, p, sample_weight=None):
        return loss(tf.one_hot(tf.cast(y, tf.int32), k), tf.cast(p, tf.float32), sample_weight=sample_weight)

    log.info("LR range test, %s, lr %.1e..%.1e over %d steps", what, start_lr, end_lr, steps)
    curve = range_test(trainer, opt, loss_fn, batches, start_lr, end_lr, steps)
    found = suggest(curve, rule)
    if found["inconclusive"]:
        log.warning("LR range test inconclusive: %s (%s)", found["inconclusive"], ADVICE)
    # The recipe's lr is multiplied by global_batch / batch_size under scale_lr; the suggestion is for the field.
    out_dir = Path(out) if out is not None else Path.cwd()
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(curve, found, out_dir / plot_name,
               f"{recipe.name}, {what} ({len(curve['lrs'])} steps; {curve['stopped']})")
    log.info("LR range test: %s; suggested lr %.3g (%s), steepest %.3g, minimum/10 %.3g -> %s",
             curve["stopped"], found["suggested_lr"], rule, found["steep"], found["min"], png)
    return {**found, "stage": st.name, "tap": asm.tap, "backbone": recipe.backbone, "stopped": curve["stopped"], "lrs": curve["lrs"],
            "losses": curve["losses"], "smoothed": curve["smoothed"], "ema": curve["ema"], "plot": str(png),
            "note": ("the stage's linear head is fitted by L-BFGS (head_solver=auto/lbfgs), which uses no lr; "
                     "the suggestion applies with --set head_solver=sgd")
            if cached and recipe.head == "linear" and recipe.head_solver in ("auto", "lbfgs") else ""}


def _assemble_at_finetunes_tap(plan, bundle):
    """The model ``finetune`` would train: with several taps, the one its depth probe keeps."""
    with plan.strategy.scope():
        backbone = make_backbone(plan)
    tap = choose_tap(plan, bundle, backbone, {})
    with plan.strategy.scope():
        return assemble(plan, backbone, tap)


def _probe_head(plan, bundle, asm) -> None:
    """Set the linear head to a probe fitted on the frozen backbone's pooled features."""
    apply_freeze(asm.backbone, plan.spec, "frozen", freeze_bn=plan.freeze_bn)
    ftr, _ = head_features(plan, bundle, asm)
    w = None if plan.class_weights is None else plan.class_weights[bundle.train.y]
    probe = fit_probe(ftr, bundle.train.y, sample_weight=w, n_classes=len(plan.classes), seed=plan.recipe.seed)
    probe.write_into(asm.head.get_layer(asm.head.layers[-1].name))


def is_auto_lr(key: str, value) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto" and key.replace("__", ".").endswith(".lr")


def resolve_auto_lr(recipe, data, overrides=(), out=None):
    """``overrides`` with every ``STAGE.lr=auto`` (or ``stages.N.lr=auto``, ``head__lr="auto"``)
    replaced by the LR range test's suggestion for that stage, the other overrides applied first.
    Returns the same form it was given (a list of ``key=value`` strings or a dict). Each stage's
    plot is written to ``out`` (default: the current folder) as ``lr_find_<stage>.png``. Where the
    range test calls its curve inconclusive, the stage keeps the recipe's own LR (with a warning
    saying why): its numbers are not a suggestion.

    >>> resolve_auto_lr("large_similar", "data/digits", ["head.lr=auto", "batch_size=16"])  # doctest: +SKIP
    ['head.lr=0.0021', 'batch_size=16']
    """
    as_dict = isinstance(overrides, dict)
    items = list(overrides.items()) if as_dict else [tuple(p.split("=", 1)) if "=" in p else (p, None)
                                                    for p in overrides]
    auto = [i for i, (k, v) in enumerate(items) if is_auto_lr(k, v)]
    if not auto:
        return overrides
    fixed = [(k, v) for k, v in items if not is_auto_lr(k, v)]
    fixed_form = dict(fixed) if as_dict else [f"{k}={v}" for k, v in fixed]
    base = resolve_recipe(recipe, fixed_form)
    for i in auto:
        key = items[i][0].replace("__", ".")
        head = key.rsplit(".", 1)[0]
        stage = head.split(".", 1)[1] if head.startswith("stages.") else head
        name = base.stages[_stage_index(base, stage)].name
        found = lr_find(base, data, stage=stage, out=out, plot_name=f"lr_find_{name}.png")
        if base.backbone == "auto":  # probed once, for this and every later stage and the run itself
            base = base.override(backbone=found["backbone"])
            items.append(("backbone", found["backbone"]))
        if found.get("inconclusive"):  # no LR can be read from the curve: keep the recipe's own
            lr = float(base.stages[_stage_index(base, stage)].lr)
            log.warning("%s=auto -> %g, the recipe's own value: the LR range test was inconclusive (%s)",
                        items[i][0], lr, found["inconclusive"])
        else:
            lr = float(f"{min(found['suggested_lr'], END_LR):.3g}")
            log.info("%s=auto -> %g (LR range test, %s rule)", items[i][0], lr, found["rule"])
        items[i] = (items[i][0], lr if as_dict else f"{lr:g}")
    return dict(items) if as_dict else [f"{k}={v}" for k, v in items]
