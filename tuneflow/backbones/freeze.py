"""Freezing specs: which named blocks of a backbone train.

Spec strings (also what recipes store):
  ``frozen``         nothing trains (a fixed feature extractor)
  ``all``            every block trains
  ``top:N``          the top N named blocks train
  ``from:BLOCK``     BLOCK and every block above it train

BatchNormalization layers inside a pretrained backbone stay frozen (inference
mode, fixed moving statistics) unless ``freeze_bn=False``: in Keras 3 a nested
``training=False`` does not protect them once the outer model trains
(keras-team/keras#20285), but a non-trainable BN layer always runs in inference mode.
"""
from __future__ import annotations

from dataclasses import dataclass

import keras

from .registry import BackboneSpec, layers_by_block

FORMS = "'frozen', 'all', 'top:N' or 'from:BLOCK'"


@dataclass(frozen=True)
class FreezeSpec:
    kind: str  # frozen | all | top | from
    n: int = 0
    block: str = ""

    @classmethod
    def parse(cls, text: str) -> "FreezeSpec":
        text = str(text).strip()
        if text in ("frozen", "all"):
            return cls(text)
        kind, _, arg = text.partition(":")
        if kind == "top":
            try:
                n = int(arg)
            except ValueError:
                n = -1
            if n < 0:
                raise ValueError(f"Bad freeze spec {text!r}: top:N needs N >= 0 blocks; use {FORMS}.")
            return cls("top", n=n)
        if kind == "from" and arg:
            return cls("from", block=arg)
        raise ValueError(f"Bad freeze spec {text!r}; use {FORMS}.")

    def trainable_blocks(self, spec: BackboneSpec) -> list[str]:
        names = spec.block_names
        if self.kind == "frozen":
            return []
        if self.kind == "all":
            return list(names)
        if self.kind == "top":
            if self.n > len(names):
                raise ValueError(
                    f"top:{self.n} asks for more blocks than {spec.name} has ({len(names)}: "
                    f"{', '.join(names)}).")
            return names[len(names) - self.n:] if self.n else []
        if self.block not in names:
            raise ValueError(
                f"from:{self.block}: {spec.name} has no block {self.block!r}; its blocks are "
                f"{', '.join(names)}.")
        return names[names.index(self.block):]

    def __str__(self):
        return {"top": f"top:{self.n}", "from": f"from:{self.block}"}.get(self.kind, self.kind)


def apply_freeze(model: keras.Model, spec: BackboneSpec, train: str | FreezeSpec = "frozen",
                 freeze_bn: bool = True) -> list[str]:
    """Set ``trainable`` on every layer of a backbone; return the names of the trainable blocks."""
    fs = train if isinstance(train, FreezeSpec) else FreezeSpec.parse(train)
    blocks = fs.trainable_blocks(spec)
    model.trainable = True
    for block, layers in layers_by_block(spec, model).items():
        for layer in layers:
            is_bn = isinstance(layer, keras.layers.BatchNormalization)
            layer.trainable = block in blocks and not (is_bn and freeze_bn)
    return blocks
