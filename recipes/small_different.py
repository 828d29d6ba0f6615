"""Little data, unlike ImageNet: linear heads on features tapped at several depths; keep the best.

Earlier layers hold more generic features (edges, textures), which transfer better to
data unlike ImageNet. All taps come from one forward pass; each tap gets its own head,
trained on the cache, and the depth that validates best is kept.
"""
from tuneflow.recipe import Recipe, Stage

recipe = Recipe(
    name="small_different",
    description="Linear heads on several depths of the frozen backbone; the best depth wins.",
    taps=("auto",),  # the registry's taps for the backbone (e.g. Lite0: stage 4, stage 6, head)
    augment="light",
    dropout=0.2,
    l2=1e-4,
    stages=(
        # one-cycle for SGD-trained heads: the schedule lr-find's suggestion is a peak LR for (small_similar.py)
        Stage("head", train="frozen", epochs=60, optimizer="adam", lr=1e-3, patience=15, schedule="one_cycle"),
    ),
)
