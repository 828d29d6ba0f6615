"""The depth probe: one forward pass for every tap, a linear probe per tap, keep the best depth.

The probe only ranks depths, so it runs on at most ``PROBE_MAX_TRAIN`` training and
``PROBE_MAX_VAL`` validation images (a class-stratified, seeded sample): its memory (every tap's
features at once) and its time stay bounded whatever the dataset size; the chosen depth's
features for all the images then come from the streamed feature pass."""
from __future__ import annotations

import logging

import keras
import numpy as np

from ..data import DataBundle
from ..data.sources import stratified_pick
from ..features import cache as fcache
from ..features.extractor import FeatureExtractor
from .plan import Plan
from .probe import fit_probe

log = logging.getLogger("tuneflow")
PROBE_MAX_TRAIN = 5000  # training images the depth probe looks at (stratified sample above this)
PROBE_MAX_VAL = 2000


def probe_sample(split, n_classes: int, limit: int, seed: int):
    """``split`` itself when it has at most ``limit`` images, else a class-stratified sample of
    about ``limit`` (every class keeps at least one), drawn with ``seed``."""
    if len(split) <= limit:
        return split
    idx = stratified_pick(split.y, n_classes, limit / len(split), np.random.default_rng(seed))
    return split.take(idx)


def choose_tap(plan: Plan, bundle: DataBundle, backbone: keras.Model, scores: dict, stored: str | None = None) -> str:
    """The depth a run trains at: its only tap, or ``stored`` (the tap an interrupted run chose)
    when it is one of the plan's, or the one :func:`probe_taps` keeps (filling ``scores``)."""
    taps = plan.taps()
    if len(taps) == 1:
        return taps[0]
    return stored if stored in taps else probe_taps(plan, bundle, backbone, taps, scores)


def probe_taps(plan: Plan, bundle: DataBundle, backbone: keras.Model, taps: list[str], scores: dict) -> str:
    """Fill ``scores`` (tap -> {"inner": cross-validated accuracy on the training images, "val": val
    accuracy}) and return the tap with the best inner accuracy (ties: the earlier, then val).

    The depth is chosen on the training data alone: choosing it by the validation accuracy of a
    few dozen images picks noise and makes the reported accuracy look better than it is."""
    r = plan.recipe
    train = probe_sample(bundle.train, len(bundle.classes), PROBE_MAX_TRAIN, r.seed)
    val = probe_sample(bundle.val, len(bundle.classes), PROBE_MAX_VAL, r.seed + 1)
    sampled = len(train) < len(bundle.train) or len(val) < len(bundle.val)
    if sampled:
        log.info("depth probe on a stratified sample: %d of %d training and %d of %d validation images",
                 len(train), len(bundle.train), len(val), len(bundle.val))
    pooled = keras.Model(backbone.input, [keras.layers.GlobalAveragePooling2D()(backbone.get_layer(t).output)
                                          for t in taps])
    extractor = FeatureExtractor(pooled, r.feature_engine)
    computed = {}

    def all_taps():  # runs at most once: every tap comes from the same forward pass
        if not computed:
            outs = extractor.run([train.x, val.x])
            computed.update({t: np.asarray(o, np.float32) for t, o in zip(taps, outs)})
        return computed

    n_tr = len(train)
    split = "probe" if not sampled else f"probe-{len(train)}-{len(val)}-{r.seed}"
    for t in taps:
        key = extractor.key(backbone=plan.spec.name, tap=t, data=bundle.fingerprint(), split=split)
        f, _ = fcache.cached(key, lambda t=t: all_taps()[t], enabled=r.feature_cache)
        f = np.asarray(f, np.float32)
        scores[t] = _probe_scores(plan, f[:n_tr], train.y, f[n_tr:], val.y)
    best = max(taps, key=lambda t: (scores[t]["inner"], scores[t]["val"], -taps.index(t)))
    text = ", ".join(f"{t} {s['inner']:.3f} (val {s['val']:.3f})" for t, s in scores.items())
    log.info("depth probe (cross-validated on train): %s -> keeping %s", text, best)
    return best


def _probe_scores(plan: Plan, xtr, ytr, xva, yva) -> dict:
    w = None if plan.class_weights is None else plan.class_weights[ytr]
    probe = fit_probe(xtr, ytr, sample_weight=w, n_classes=len(plan.classes), seed=plan.recipe.seed)
    inner = probe.inner_accuracy
    val = float(np.mean(probe.predict_proba(xva).argmax(1) == yva))
    return {"inner": float(inner) if inner is not None else val, "val": val, "C": probe.chosen_C}
