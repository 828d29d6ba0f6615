"""A recipe is data: a frozen, validated dataclass written as JSON into every run.

Overrides are ``key=value`` strings (``--set`` on the CLI) or keyword arguments,
type-checked against the field types. Stage fields are addressed by stage name or
index: ``finetune.lr=3e-5`` or ``stages.1.epochs=4``.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, fields, replace

from .errors import RecipeError

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "adamw")
SCHEDULES = ("constant", "step", "plateau", "exponential", "inverse_time", "cosine", "warmup_cosine")
NORMS = ("auto", "batch", "instance", "group", "layer")
HEADS = ("linear", "mlp", "conv")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "default", "mirrored", "multiworker")
SAMPLINGS = ("shuffle", "balanced")
BACKENDS = ("keras", "albumentations")
FEATURE_ENGINES = ("auto", "tensorflow", "openvino")




@dataclass(frozen=True)
class Stage:
    name: str
    train: str = "frozen"  # freeze spec: frozen | all | top:N | from:BLOCK
    epochs: int = 10  # passes over the training images (or the feature cache)
    optimizer: str = "adam"
    lr: float = 1e-3  # peak learning rate, before linear batch scaling
    schedule: str = "constant"
    warmup_epochs: float = 0.0  # linear warm-up from lr/100, for warmup_cosine
    momentum: float = 0.9  # sgd-family only
    weight_decay: float = 0.0  # decoupled (adamw) or optimizer weight decay
    patience: int = 0  # early-stopping patience in epochs (0 = off); best weights restored


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    backbone: str = "efficientnet_lite0"  # Lite0: ImageNet weights offline, ~10x cheaper than ResNet50 on CPU
    weights: str | None = "imagenet"  # imagenet | None (from scratch) | path
    input_size: int = 0  # pixels; 0 = the backbone's default (224)
    resize: str = "crop"  # crop (shorter side to input_size, centre square) | squash (stretch)
    batch_size: int = 32  # per replica; the global batch is this x replicas
    scale_lr: bool = False  # multiply lr by global_batch / batch_size (linear scaling rule)
    val_fraction: float = 0.2  # share held out when the data has no val/ split
    fraction: float = 1.0  # share of images kept, for fast tuning
    classes: tuple[str, ...] = ()  # class subset ('' = all)
    folds: int = 0  # K-fold cross-validation when >= 2
    augment: str = "light"  # none | light | medium | heavy
    augment_backend: str = "keras"  # keras | albumentations
    sampling: str = "shuffle"  # shuffle | balanced (oversample minority classes)
    class_weight: str = "none"  # none | balanced
    head: str = "linear"  # linear (GAP+Dense) | mlp | conv (1x1 conv + norm at the tap)
    head_hidden: int = 256  # units of the mlp/conv head
    dropout: float = 0.2  # before the classifier: 0.2 for small models, 0.5 for big heads
    spatial_dropout: float = 0.0  # on the feature map (conv head only)
    l1: float = 0.0  # on new layers
    l2: float = 0.0  # on new layers
    label_smoothing: float = 0.0
    clipnorm: float = 0.0  # global-norm gradient clipping; 0 = off (5-15 against explosions)
    norm: str = "auto"  # normalisation in new layers; auto = BN if per-replica batch >= 10 else instance
    replace_backbone_bn: str = ""  # '' keeps the backbone's BN; instance|group|layer replaces it
    freeze_bn: bool = True  # backbone BN stays in inference mode while fine-tuning
    taps: tuple[str, ...] = ()  # backbone layers to probe; () = the final feature map
    feature_cache: bool = True  # frozen stages train on cached backbone features
    cache_views: int = 1  # augmented views per image in the cache (1 = un-augmented)
    feature_engine: str = "auto"  # auto | tensorflow | openvino: runs the frozen-feature pass (auto: OpenVINO on CPUs)
    precision: str = "auto"
    strategy: str = "auto"
    seed: int = 0
    stages: tuple[Stage, ...] = (Stage("head"),)

    def validate(self) -> "Recipe":
        from .backbones import BACKBONES, FreezeSpec
        from .data.augment import PRESETS

        def choose(key, value, options):
            if value not in options:
                raise RecipeError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, options))}.")

        choose("backbone", self.backbone, sorted(BACKBONES))
        choose("augment", self.augment, list(PRESETS))
        choose("augment_backend", self.augment_backend, BACKENDS)
        choose("sampling", self.sampling, SAMPLINGS)
        choose("resize", self.resize, ("crop", "squash"))
        choose("class_weight", self.class_weight, ("none", "balanced"))
        choose("head", self.head, HEADS)
        choose("norm", self.norm, NORMS)
        choose("replace_backbone_bn", self.replace_backbone_bn, ("", "instance", "group", "layer"))
        choose("precision", self.precision, PRECISIONS)
        choose("strategy", self.strategy, STRATEGIES)
        choose("feature_engine", self.feature_engine, FEATURE_ENGINES)
        _range("batch_size", self.batch_size, 1, 65536)
        _range("input_size", self.input_size, 0, 2048)
        if self.input_size and self.input_size < 32:
            raise RecipeError(f"input_size={self.input_size} is too small; use 0 (default) or >= 32.")
        _range("val_fraction", self.val_fraction, 0.0, 1.0, open_ends=True)
        if not 0 < self.fraction <= 1:
            raise RecipeError(f"fraction={self.fraction} must be in (0, 1].")
        if self.folds == 1 or self.folds < 0:
            raise RecipeError(f"folds={self.folds}: use 0 (off) or >= 2.")
        for k in ("dropout", "spatial_dropout", "label_smoothing"):
            _range(k, getattr(self, k), 0.0, 0.99)
        for k in ("l1", "l2", "clipnorm"):
            _range(k, getattr(self, k), 0.0, 1e6)
        _range("cache_views", self.cache_views, 1, 64)
        if not self.stages:
            raise RecipeError("A recipe needs at least one stage.")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise RecipeError(f"Stage names must be unique: {names}.")
        for i, s in enumerate(self.stages):
            where = f"stage {s.name!r}"
            try:
                FreezeSpec.parse(s.train)
            except ValueError as exc:
                raise RecipeError(f"{where}: {exc}") from None
            choose(f"{s.name}.optimizer", s.optimizer, OPTIMIZERS)
            choose(f"{s.name}.schedule", s.schedule, SCHEDULES)
            _range(f"{s.name}.epochs", s.epochs, 1, 100000)
            _range(f"{s.name}.lr", s.lr, 1e-12, 10.0)
            _range(f"{s.name}.warmup_epochs", s.warmup_epochs, 0.0, s.epochs)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise RecipeError(f"Unknown recipe keys {unknown}; valid keys: {', '.join(valid_keys())}.")
        d["stages"] = tuple(Stage(**s) for s in d.get("stages", ()))
        if "classes" in d:
            d["classes"] = tuple(d["classes"])
        if "taps" in d:
            d["taps"] = tuple(d["taps"])
        return cls(**d).validate()

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        return cls.from_dict(json.loads(text))

    def override(self, *pairs: str, **kwargs) -> "Recipe":
        """Return a copy with ``key=value`` strings and/or keyword overrides applied and validated.

        >>> from tuneflow.recipes import small_similar
        >>> small_similar.override("batch_size=16", "head.lr=3e-3").batch_size
        16
        """
        items = [_split_pair(p) for p in pairs] + [(k.replace("__", "."), v) for k, v in kwargs.items()]
        recipe = self
        for key, value in items:
            recipe = _apply(recipe, key, value)
        return recipe.validate()


def _range(key, value, lo, hi, open_ends=False):
    bad = (value <= lo or value >= hi) if open_ends else (value < lo or value > hi)
    if bad:
        ends = f"({lo}, {hi})" if open_ends else f"[{lo}, {hi}]"
        raise RecipeError(f"{key}={value!r} is out of range {ends}.")


def valid_keys() -> list[str]:
    top = [f.name for f in fields(Recipe) if f.name != "stages"]
    stage = [f"<stage>.{f.name}" for f in fields(Stage) if f.name != "name"]
    return top + stage


def _split_pair(pair: str):
    if "=" not in pair:
        raise RecipeError(f"Override {pair!r} is not key=value (e.g. --set batch_size=16).")
    k, v = pair.split("=", 1)
    return k.strip(), v.strip()


def _convert(key: str, tp, value):
    """Parse ``value`` (a string or a Python value) as field type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(key, a, value)
            except RecipeError:
                continue
        raise RecipeError(f"{key}={value!r}: expected {tp}.")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        return tuple(_convert(key, args[0], v) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise RecipeError(f"{key}={value!r}: expected a boolean (true/false).")
    if tp is int:
        if isinstance(value, bool):
            raise RecipeError(f"{key}={value!r}: expected an integer.")
        try:
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        except (TypeError, ValueError):
            raise RecipeError(f"{key}={value!r}: expected an integer.") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{key}={value!r}: expected a number.") from None
    if tp is str:
        return str(value)
    raise RecipeError(f"{key}: unsupported type {tp}.")


_HINTS = {cls: typing.get_type_hints(cls) for cls in (Recipe, Stage)}


def _apply(recipe: Recipe, key: str, value) -> Recipe:
    if "." in key:
        head, sub = key.split(".", 1)
        if head == "stages" and "." in sub:
            idx, sub = sub.split(".", 1)
            try:
                i = int(idx)
                recipe.stages[i]
            except (ValueError, IndexError):
                raise RecipeError(f"{key}: no stage {idx!r}; this recipe has stages "
                                  f"0..{len(recipe.stages) - 1}.") from None
        else:
            names = [s.name for s in recipe.stages]
            if head not in names:
                raise RecipeError(f"Unknown key {key!r}: {recipe.name} has stages {', '.join(names)}; "
                                  f"valid keys: {', '.join(valid_keys())}.")
            i = names.index(head)
        stage_fields = _HINTS[Stage]
        if sub not in stage_fields or sub == "name":
            raise RecipeError(f"Unknown stage key {sub!r} in {key!r}; stage keys: "
                              f"{', '.join(k for k in stage_fields if k != 'name')}.")
        stages = list(recipe.stages)
        stages[i] = replace(stages[i], **{sub: _convert(key, stage_fields[sub], value)})
        return replace(recipe, stages=tuple(stages))
    hints = _HINTS[Recipe]
    if key not in hints or key == "stages":
        import difflib
        close = difflib.get_close_matches(key, valid_keys(), n=1)
        raise RecipeError(f"Unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                          + f"; valid keys: {', '.join(valid_keys())}.")
    return replace(recipe, **{key: _convert(key, hints[key], value)})
