"""Lots of data, unlike ImageNet: head first, then most of the network at a higher LR, longer.

Training from scratch is one setting away: ``--set weights=None`` (BN then trains too).
"""
from tuneflow.recipe import Recipe, Stage

recipe = Recipe(
    name="large_different",
    description="Head first, then everything above the stem fine-tuned with SGD momentum + cosine.",
    augment="medium",
    dropout=0.3,
    l2=1e-4,
    clipnorm=10.0,  # global norm: deep fine-tuning at a higher LR can spike
    stages=(
        # one-cycle for SGD-trained heads: the schedule lr-find's suggestion is a peak LR for (small_similar.py)
        Stage("head", train="frozen", epochs=20, optimizer="adam", lr=1e-3, patience=6, schedule="one_cycle"),
        # SGD + momentum with cosine decay generalises well for long fine-tuning.
        Stage("finetune", train="top:6", epochs=10, optimizer="momentum", lr=1e-3,
              schedule="warmup_cosine", warmup_epochs=1, patience=4),
    ),
)
