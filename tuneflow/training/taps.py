"""The depth probe: one forward pass for every tap, a linear probe per tap, keep the best depth."""
from __future__ import annotations

import logging

import keras
import numpy as np

from ..data import DataBundle
from ..features import cache as fcache
from ..features.extractor import FeatureExtractor
from .plan import Plan

log = logging.getLogger("tuneflow")


def probe_taps(plan: Plan, bundle: DataBundle, backbone: keras.Model, taps: list[str], scores: dict) -> str:
    """Fill ``scores`` (tap -> {"inner": cross-validated accuracy on the training images, "val": val
    accuracy}) and return the tap with the best inner accuracy (ties: the earlier, then val).

    The depth is chosen on the training data alone: choosing it by the validation accuracy of a
    few dozen images picks noise and makes the reported accuracy look better than it is."""
    r = plan.recipe
    pooled = keras.Model(backbone.input, [keras.layers.GlobalAveragePooling2D()(backbone.get_layer(t).output)
                                          for t in taps])
    extractor = FeatureExtractor(pooled, r.feature_engine)
    computed = {}

    def all_taps():  # runs at most once: every tap comes from the same forward pass
        if not computed:
            outs = extractor.run([bundle.train.x, bundle.val.x])
            computed.update({t: np.asarray(o, np.float32) for t, o in zip(taps, outs)})
        return computed

    n_tr = len(bundle.train)
    for t in taps:
        key = extractor.key(backbone=plan.spec.name, tap=t, data=bundle.fingerprint(), split="probe")
        f, _ = fcache.cached(key, lambda t=t: all_taps()[t], enabled=r.feature_cache)
        f = np.asarray(f, np.float32)
        scores[t] = _probe_scores(plan, f[:n_tr], bundle.train.y, f[n_tr:], bundle.val.y)
    best = max(taps, key=lambda t: (scores[t]["inner"], scores[t]["val"], -taps.index(t)))
    text = ", ".join(f"{t} {s['inner']:.3f} (val {s['val']:.3f})" for t, s in scores.items())
    log.info("depth probe (cross-validated on train): %s -> keeping %s", text, best)
    return best


def _probe_scores(plan: Plan, xtr, ytr, xva, yva) -> dict:
    from .probe import fit_probe
    w = None if plan.class_weights is None else plan.class_weights[ytr]
    probe = fit_probe(xtr, ytr, sample_weight=w, n_classes=len(plan.classes), seed=plan.recipe.seed)
    inner = probe.inner_accuracy
    val = float(np.mean(probe.predict_proba(xva).argmax(1) == yva))
    return {"inner": float(inner) if inner is not None else val, "val": val, "C": probe.chosen_C}
