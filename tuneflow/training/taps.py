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
    """Fill ``scores`` (tap -> val accuracy of its probe) and return the best tap (ties: the earlier)."""
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
        scores[t] = _probe_accuracy(plan, f[:n_tr], bundle.train.y, f[n_tr:], bundle.val.y)
    best = max(taps, key=lambda t: (scores[t], -taps.index(t)))
    log.info("depth probe: %s -> %s", ", ".join(f"{t} {a:.3f}" for t, a in scores.items()), best)
    print("depth probe (val accuracy): " + ", ".join(f"{t} {a:.3f}" for t, a in scores.items())
          + f" -> keeping {best}")
    return best


def _probe_accuracy(plan: Plan, xtr, ytr, xva, yva) -> float:
    from .probe import fit_probe
    w = None if plan.class_weights is None else plan.class_weights[ytr]
    probe = fit_probe(xtr, ytr, sample_weight=w, seed=plan.recipe.seed)
    return float(np.mean(probe.predict_proba(xva).argmax(1) == yva))
