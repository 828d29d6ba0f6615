"""``suggest``: pick the cell of the transfer-learning table, and the backbone, from the data itself.

Backbone: a cross-validated linear probe (L-BFGS, :mod:`tuneflow.training.probe`) on the final pooled
features of each offline EfficientNet-Lite (cheapest first, within a time budget); the cheapest one
within ``BACKBONE_MARGIN`` of the most accurate is named: accuracy per second. The named recipe
keeps its own backbone unless a candidate probes clearly above it (:func:`prefer_recipe_backbone`).
The recipe itself (similar/different) is read from the first chosen backbone's taps
(``probe_backbone`` in the result).

Size: training images per class (>= ``LARGE_PER_CLASS`` is "large").
Similarity to ImageNet: a cross-validated linear probe on the backbone's final pooled
features against probes on earlier taps. Where the final features win, the data
looks like ImageNet (its top-level features are what the task needs); where an
earlier depth wins by a margin, the data differs. The ImageNet head's mean top-1
confidence is reported as supporting evidence.
"""
from __future__ import annotations

import numpy as np

from . import recipes as registry
from .backbones import build_backbone, get_spec
from .data import load_data
from .features import infer
from .features.cache import weights_digest
from .features.extractor import FeatureExtractor
from .training.backbone_probe import MARGIN as BACKBONE_MARGIN
from .training.backbone_probe import cheapest_of_best
from .training.probe import fit_probe

LARGE_PER_CLASS = 300  # images per class; below this, fine-tuning deep blocks overfits
MARGIN = 0.02  # an earlier tap must beat the final one by 2 points to call the data "different"
SAMPLE_PER_CLASS = 60  # images per class the probe looks at (keeps suggest to seconds)


CANDIDATES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")  # cheapest first
BUDGET_SECONDS = 180.0  # the backbone comparison stops trying costlier candidates after this


def choose_backbone(x, y, candidates=CANDIDATES, budget_seconds: float = BUDGET_SECONDS, seed: int = 0) -> dict:
    """Probe each candidate's final pooled features on images ``x`` (already at one size); return
    ``{"backbone", "reason", "probes": {name: {"accuracy", "seconds", "images_per_second"}}}``."""
    import time

    import keras

    probes, t_start = {}, time.time()
    for name in candidates:
        if probes and time.time() - t_start > budget_seconds:
            break
        t0 = time.time()
        bb = build_backbone(name, weights="imagenet", input_size=int(x.shape[1]))
        pooled = keras.Model(bb.input, keras.layers.GlobalAveragePooling2D()(bb.output))
        feats = np.asarray(FeatureExtractor(pooled, "auto").run(x), np.float32)
        probe = fit_probe(feats, y, seed=seed)
        acc = probe.inner_accuracy if probe.inner_accuracy is not None else probe.score(feats, y)
        secs = time.time() - t0
        probes[name] = {"accuracy": float(acc), "seconds": round(secs, 2),
                        "images_per_second": round(len(x) / max(secs, 1e-9), 1)}
    chosen = cheapest_of_best(probes, BACKBONE_MARGIN)
    tried = ", ".join(f"{n} {p['accuracy']:.3f} in {p['seconds']:.1f} s" for n, p in probes.items())
    skipped = [n for n in candidates if n not in probes]
    return {"backbone": chosen, "probes": probes, "images": int(len(x)),
            "reason": f"cross-validated probe accuracy: {tried}; {chosen} is the cheapest within "
                      f"{BACKBONE_MARGIN:.3f} of the best" + (f" (not tried within the {budget_seconds:.0f} s "
                                                               f"budget: {', '.join(skipped)})" if skipped else "")}


def prefer_recipe_backbone(choice: dict, recipe: str) -> tuple[str, str]:
    """The backbone a run of ``recipe`` should use, given :func:`choose_backbone`'s ``choice``.

    The recipe's own backbone was chosen with its input size and stages on full runs
    (``large_similar``'s Lite1 at 280 px beat Lite0 on cats_dogs by 3 images of 1,000), a
    difference a probe on 60 images per class cannot see. So it stays unless another candidate
    probes clearly better: more than the tie margin above it, the margin being ``BACKBONE_MARGIN``
    or one probed image's worth (1 / ``choice["images"]``), whichever is larger. Then the cheapest
    such candidate within that margin of the best is named. When the time budget stopped the
    probe before the recipe's own backbone, it stays too (nothing measured argues against it).
    Returns ``(backbone, reason suffix)``; the suffix is empty when the choice was already the
    recipe's own."""
    own = registry.get(recipe).backbone
    probes = choice["probes"]
    if own == "auto":  # the recipe would probe its candidates itself: this probe already did
        return choice["backbone"], ""
    if own == choice["backbone"]:
        return own, ""
    if own not in probes:
        return own, (f"; {recipe}'s own backbone {own} was not probed within the time budget, "
                     "so the recipe keeps it")
    images = int(choice.get("images") or 0)
    margin = max(BACKBONE_MARGIN, 1.0 / images) if images else BACKBONE_MARGIN
    mine = probes[own]["accuracy"]
    best = max(p["accuracy"] for p in probes.values())
    better = [n for n in probes if probes[n]["accuracy"] - mine > margin and probes[n]["accuracy"] >= best - margin]
    if not better:
        above = "no candidate probes above it" if mine >= best else (
            f"it is within {margin:.3f} (a tie at this sample size) of every candidate that probes above it")
        return own, f"; {recipe}'s own backbone {own} ({mine:.3f}): {above}, so the recipe keeps it"
    return better[0], (f"; {better[0]} probes more than {margin:.3f} above {recipe}'s own backbone {own} "
                       f"({probes[better[0]]['accuracy']:.3f} vs {mine:.3f}), so it replaces it")


def probe_choices(overrides) -> dict:
    """What ``auto`` probes with, from a run's overrides (``["key=value", ...]`` or a dict): the
    backbone and input size they pin (the run's own), else ``{}`` (compare the candidates at
    their default size). ``suggest(data, **probe_choices(overrides))``."""
    pairs = overrides.items() if isinstance(overrides, dict) else (
        p.split("=", 1) for p in overrides if "=" in p)
    pinned = {k.strip(): str(v).strip() for k, v in pairs}
    out = {}
    if pinned.get("backbone"):
        out["backbone"] = pinned["backbone"]
    if pinned.get("input_size", "0").isdigit() and int(pinned.get("input_size", "0")):
        out["input_size"] = int(pinned["input_size"])
    return out


def apply_suggestion(suggestion: dict, overrides):
    """``(recipe name, overrides)`` for a run of ``auto``: the suggested recipe, and the suggested
    backbone before the user's overrides (a backbone they name comes later and wins)."""
    if isinstance(overrides, dict):
        return suggestion["recipe"], {"backbone": suggestion["backbone"], **overrides}
    return suggestion["recipe"], [f"backbone={suggestion['backbone']}", *overrides]


def suggest(data, backbone: str | None = None, input_size: int = 0, seed: int = 0,
            candidates=CANDIDATES, budget_seconds: float = BUDGET_SECONDS) -> dict:
    """Name the recipe (and, unless ``backbone`` is given, the backbone) for ``data``."""


    size = get_spec(backbone or candidates[0]).input_size(input_size)
    bundle = load_data(data, size)
    counts = np.bincount(bundle.train.y, minlength=len(bundle.classes))
    per_class = float(counts.mean())
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.permutation(np.where(bundle.train.y == c)[0])[:SAMPLE_PER_CLASS]
                          for c in range(len(bundle.classes))])
    x, y = bundle.train.x[idx].astype(np.float32), bundle.train.y[idx]
    choice = None
    if backbone is None:
        choice = choose_backbone(x, y, candidates, budget_seconds, seed)
        backbone = choice["backbone"]
    spec = get_spec(backbone)
    import keras
    model = build_backbone(backbone, weights="imagenet", input_size=size, include_top=False)
    taps = list(spec.taps)
    pooled = keras.Model(model.input, [keras.layers.GlobalAveragePooling2D()(model.get_layer(t).output)
                                       for t in taps])
    engine = infer.resolve_engine("auto")  # keyed by the weights: a converted model is reused from disk
    feats = infer.run(pooled, x, 32, engine, weights_key=weights_digest(pooled))
    scores = {}
    for t, f in zip(taps, feats):  # probes that converge, L2 chosen by inner cross-validation
        probe = fit_probe(np.asarray(f, np.float32), y, seed=seed)
        scores[t] = float(probe.inner_accuracy if probe.inner_accuracy is not None else probe.score(f, y))
    final = scores[taps[-1]]
    best_early = max(scores[t] for t in taps[:-1])
    similar = final >= best_early - MARGIN
    confidence = None
    if spec.name == "efficientnet_lite0" and size == 224:
        top = build_backbone(backbone, weights="imagenet", include_top=True)
        confidence = float(infer.run(top, x, 32, engine, weights_key=weights_digest(top)).max(1).mean())
    large = per_class >= LARGE_PER_CLASS
    recipe = f"{'large' if large else 'small'}_{'similar' if similar else 'different'}"
    probe_backbone = backbone
    if choice is not None:
        backbone, why = prefer_recipe_backbone(choice, recipe)
        choice = {**choice, "backbone": backbone, "reason": choice["reason"] + why}
    return {"recipe": recipe, "images_per_class": per_class, "large_threshold": LARGE_PER_CLASS,
            "num_classes": len(bundle.classes), "probe_accuracy": scores, "final_tap": taps[-1],
            "similar": bool(similar), "imagenet_confidence": confidence, "backbone": backbone,
            "probe_backbone": probe_backbone, "probe_size": int(size),
            "backbone_probes": choice["probes"] if choice else None,
            "backbone_reason": choice["reason"] if choice else f"backbone {backbone} given",
            "reason": (f"{per_class:.0f} images/class ({'>=' if large else '<'} {LARGE_PER_CLASS}); "
                       f"final-layer probe {final:.3f} vs best earlier {best_early:.3f} "
                       f"({'final wins or ties: similar' if similar else 'earlier wins: different'})")}
