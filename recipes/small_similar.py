"""Little data, similar to ImageNet: a linear classifier on the frozen backbone's pooled features.

The backbone runs once per image (feature cache), so each head epoch costs milliseconds.
"""
from tuneflow.recipe import Recipe, Stage

recipe = Recipe(
    name="small_similar",
    description="Frozen backbone, linear head on pooled features (cached).",
    backbone="auto",  # Lite0/1/2 probed on the folder's own training images; --set backbone=NAME pins one
    # 288 px, not the 224 of ImageNet training: the backbone was trained on random-resized crops,
    # which show objects larger than a centre crop at the same size does; testing at a higher
    # resolution matches the apparent object size ("FixRes", Touvron et al. 2019). Measured with
    # a Lite0 linear probe: ants_bees 94.8% -> 95.4%, cats_dogs 99.0% -> 99.3%, for 1.65x compute
    # (benchmarks/bench_probe.py).
    input_size=288,
    augment="light",  # used only when cache_views > 1; the cache holds un-augmented features
    dropout=0.2,  # before the linear layer; little data overfits
    l2=1e-4,  # on the head's kernel
    stages=(
        # Adam at 1e-3 is the practitioners' default; 60 epochs over ~250 cached vectors take ~1 s.
        # (Used by SGD heads: head_solver=sgd, mlp/conv heads, caches too large for L-BFGS.)
        # One-cycle (fastai's fit_one_cycle): lr is the peak, and the LR range test's suggestion
        # (`tuneflow lr-find`, the "valley" rule) is a peak LR for exactly this schedule: over three
        # seeds it lay within half a decade of the best grid LR on 4 of 5 data/recipe pairs, against
        # 2 of 5 at a constant LR, where the best sat about half a decade below it; best val losses
        # equal within noise either way (benchmarks/bench_lr_find.py; README, "Tuning workbench").
        Stage("head", train="frozen", epochs=60, optimizer="adam", lr=1e-3, patience=15, schedule="one_cycle"),
    ),
)
