"""``suggest``: pick the cell of the transfer-learning table from the data itself.

Size: training images per class (>= ``LARGE_PER_CLASS`` is "large").
Similarity to ImageNet: a cross-validated linear probe on the backbone's final pooled
features against probes on earlier taps. Where the final features win, the data
looks like ImageNet (its top-level features are what the task needs); where an
earlier depth wins by a margin, the data differs. The ImageNet head's mean top-1
confidence is reported as supporting evidence.
"""
from __future__ import annotations

import numpy as np

from .backbones import build_backbone, get_spec
from .features import infer
from .features.cache import weights_digest

LARGE_PER_CLASS = 300  # images per class; below this, fine-tuning deep blocks overfits
MARGIN = 0.02  # an earlier tap must beat the final one by 2 points to call the data "different"
SAMPLE_PER_CLASS = 60  # images per class the probe looks at (keeps suggest to seconds)


def suggest(data, backbone: str = "efficientnet_lite0", input_size: int = 0, seed: int = 0) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from .data import load_data

    spec = get_spec(backbone)
    size = input_size or spec.default_size
    bundle = load_data(data, size)
    counts = np.bincount(bundle.train.y, minlength=len(bundle.classes))
    per_class = float(counts.mean())
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.permutation(np.where(bundle.train.y == c)[0])[:SAMPLE_PER_CLASS]
                          for c in range(len(bundle.classes))])
    x, y = bundle.train.x[idx].astype(np.float32), bundle.train.y[idx]
    import keras
    model = build_backbone(backbone, weights="imagenet", input_size=size, include_top=False)
    taps = list(spec.taps)
    pooled = keras.Model(model.input, [keras.layers.GlobalAveragePooling2D()(model.get_layer(t).output)
                                       for t in taps])
    engine = infer.resolve_engine("auto")  # keyed by the weights: a converted model is reused from disk
    feats = infer.run(pooled, x, 32, engine, weights_key=weights_digest(pooled))
    k = int(min(5, np.bincount(y).min()))
    scores = {}
    for t, f in zip(taps, feats):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
        scores[t] = float(cross_val_score(clf, f, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed)).mean())
    final = scores[taps[-1]]
    best_early = max(scores[t] for t in taps[:-1])
    similar = final >= best_early - MARGIN
    confidence = None
    if spec.name == "efficientnet_lite0" and size == 224:
        top = build_backbone(backbone, weights="imagenet", include_top=True)
        confidence = float(infer.run(top, x, 32, engine, weights_key=weights_digest(top)).max(1).mean())
    large = per_class >= LARGE_PER_CLASS
    recipe = f"{'large' if large else 'small'}_{'similar' if similar else 'different'}"
    return {"recipe": recipe, "images_per_class": per_class, "large_threshold": LARGE_PER_CLASS,
            "num_classes": len(bundle.classes), "probe_accuracy": scores, "final_tap": taps[-1],
            "similar": bool(similar), "imagenet_confidence": confidence, "backbone": backbone,
            "reason": (f"{per_class:.0f} images/class ({'>=' if large else '<'} {LARGE_PER_CLASS}); "
                       f"final-layer probe {final:.3f} vs best earlier {best_early:.3f} "
                       f"({'final wins or ties: similar' if similar else 'earlier wins: different'})")}
