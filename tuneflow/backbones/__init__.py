"""Pretrained CNN backbones: registry, factory, freezing specs and in-model preprocessing."""
from .factory import WeightsUnavailableError, build_backbone, keras_cache_dir, save_backbone
from .freeze import FreezeSpec, apply_freeze
from .preprocess import Preprocess
from .registry import BACKBONES, BackboneSpec, block_of, get_spec, layers_by_block

__all__ = ["BACKBONES", "BackboneSpec", "FreezeSpec", "Preprocess", "WeightsUnavailableError",
           "apply_freeze", "block_of", "build_backbone", "get_spec", "keras_cache_dir",
           "layers_by_block", "save_backbone"]
