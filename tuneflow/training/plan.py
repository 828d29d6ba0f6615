"""The plan of a run: everything decided from the recipe and the data before any model exists."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backbones import BackboneSpec, get_spec
from ..data import DataBundle
from ..data.pipeline import class_weights
from ..recipe import Recipe
from .heads import choose_norm


@dataclass
class Plan:
    recipe: Recipe
    spec: BackboneSpec
    size: int  # input pixels (square)
    strategy: object  # tf.distribute.Strategy
    precision: str  # the Keras dtype policy training runs under
    classes: list[str]
    class_weights: np.ndarray | None
    norm: str  # normalisation in new layers
    freeze_bn: bool  # backbone BN in inference mode while its blocks train
    backbone_choice: dict | None = None  # what the probe found when the recipe said backbone=auto
    deadline: object = None  # a tuneflow.training.budget.Deadline when the run has a time budget

    @classmethod
    def make(cls, recipe: Recipe, bundle: DataBundle, strategy, precision: str) -> "Plan":
        spec = get_spec(recipe.backbone)
        return cls(recipe=recipe, spec=spec, size=recipe.pixels, strategy=strategy,
                   precision=precision, classes=list(bundle.classes),
                   class_weights=class_weights(bundle.train.y, len(bundle.classes), recipe.class_weight),
                   norm=choose_norm(recipe.norm, recipe.batch_size),
                   # From scratch, BN must learn its statistics; replaced BN layers have none to keep.
                   freeze_bn=recipe.freeze_bn and recipe.weights is not None and not recipe.replace_backbone_bn)

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    @property
    def global_batch(self) -> int:
        return self.recipe.batch_size * self.replicas

    @property
    def from_scratch(self) -> bool:
        """``weights=None``: nothing pretrained to keep frozen, so every stage trains every layer."""
        return self.recipe.weights is None

    def stage_train(self, stage) -> str:
        return "all" if self.from_scratch else stage.train

    def stage_lr(self, stage) -> float:
        return stage.lr * (self.global_batch / self.recipe.batch_size if self.recipe.scale_lr else 1.0)

    def taps(self) -> list[str | None]:
        r = self.recipe
        if not r.taps:
            return [None]
        if list(r.taps) == ["auto"]:
            return list(self.spec.taps)
        return list(r.taps)
