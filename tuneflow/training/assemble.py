"""Model assembly: backbone, feature model at the chosen tap, head, and the whole classifier."""
from __future__ import annotations

from dataclasses import dataclass

import keras

from ..backbones import build_backbone
from .cached import uses_cache
from .heads import build_head, replace_batchnorm
from .plan import Plan
from .standardise import standardises


@dataclass
class Assembly:
    """The Keras pieces of one run (our object: nothing of ours is stored on the Keras models)."""
    backbone: keras.Model  # pixels 0..255 (S x S) -> final feature map
    feature_model: keras.Model  # pixels -> the tap's feature map
    head: keras.Model  # feature map -> probabilities
    model: keras.Model  # pixels -> probabilities (backbone + head)
    tap: str | None


def make_backbone(plan: Plan, weights="default") -> keras.Model:
    r = plan.recipe
    backbone = build_backbone(r.backbone, weights=r.weights if weights == "default" else weights,
                              input_size=plan.size, freeze_bn=plan.freeze_bn)
    if r.replace_backbone_bn:
        backbone = replace_batchnorm(backbone, r.replace_backbone_bn)
    return backbone


def assemble(plan: Plan, backbone: keras.Model, tap: str | None) -> Assembly:
    """Head on ``backbone`` at ``tap`` (None = the final feature map), seeded by the recipe: building
    the backbone may or may not draw random numbers (a cold weights cache does), and the head must
    not depend on that."""
    out = backbone.output if tap is None else backbone.get_layer(tap).output
    feature_model = keras.Model(backbone.input, out, name="features")
    keras.utils.set_random_seed(plan.recipe.seed)
    # A linear head trained on cached features is fitted standardised (L-BFGS, or SGD through
    # StandardisedHead) and folded: its penalty lives there, in standardised units, not on the
    # folded weights.
    folded = standardises(plan.recipe) and any(uses_cache(plan, st) for st in plan.recipe.stages)
    head = build_head(tuple(out.shape[1:]), len(plan.classes), plan.recipe, plan.norm,
                      classifier_penalty=not folded)
    model = keras.Model(backbone.input, head(feature_model.output), name=f"tuneflow_{plan.recipe.name}")
    return Assembly(backbone, feature_model, head, model, tap)


def build(plan: Plan, tap: str | None, weights="default") -> Assembly:
    """Backbone and head, inside the plan's strategy scope."""
    with plan.strategy.scope():
        return assemble(plan, make_backbone(plan, weights), tap)
