"""A recipe is data: a frozen, validated dataclass written as JSON into every run.

Overrides are ``key=value`` strings (``--set`` on the CLI) or keyword arguments,
type-checked against the field types. Stage fields are addressed by stage name or
index: ``finetune.lr=3e-5`` or ``stages.1.epochs=4``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .backbones import BACKBONES, FreezeSpec, get_spec
from .data.augment import BACKENDS, PRESETS
from .errors import RecipeError
from .imageops import RESIZE_MODES

log = logging.getLogger("tuneflow.recipe")

NORMS = ("auto", "batch", "instance", "group", "layer")
HEADS = ("linear", "mlp", "conv")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "default", "mirrored", "multiworker")
SAMPLINGS = ("shuffle", "balanced")
FEATURE_ENGINES = ("auto", "tensorflow", "openvino")
# The optimizer and schedule names a recipe may use; tuneflow.training.optim builds each (its
# registries are keyed by exactly these, which tests/test_optim.py checks).
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "adamw")
SCHEDULES = ("constant", "plateau", "step", "exponential", "inverse_time", "cosine", "warmup_cosine", "one_cycle")
WEIGHTS_SUFFIXES = (".h5", ".hdf5")  # Keras .weights.h5 and keras.applications .h5 files are HDF5


@dataclass(frozen=True)
class Bounds:
    """The finite numbers a key accepts: [lo, hi], an end open where marked; ``zero`` also allows 0
    (an "off" or "default" value below the range)."""
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    zero: str = ""  # what 0 means, when 0 is allowed outside [lo, hi]

    def __str__(self):
        ends = f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        return f"0 ({self.zero}) or {ends}" if self.zero else ends

    def holds(self, v) -> bool:
        if self.zero and v == 0:
            return True
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below


# Per key: the numbers that make sense. Units: pixels, images, epochs; rates are per step.
RANGES = {
    "batch_size": Bounds(1, 65536),
    "input_size": Bounds(32, 2048, zero="the backbone's default"),
    "val_fraction": Bounds(0, 1, lo_open=True, hi_open=True),
    "fraction": Bounds(0, 1, lo_open=True),
    "folds": Bounds(2, 1000, zero="off"),
    "head_hidden": Bounds(1, 65536),
    "dropout": Bounds(0, 0.99),
    "spatial_dropout": Bounds(0, 0.99),
    "label_smoothing": Bounds(0, 0.99),
    "l1": Bounds(0, 1e6),
    "l2": Bounds(0, 1e6),
    "clipnorm": Bounds(0, 1e6),
    "cache_views": Bounds(1, 64),
    "prefix_views": Bounds(1, 64, zero="the stage's epochs, at most 8"),
    "seed": Bounds(0, 2**32 - 1),  # NumPy and TensorFlow seeds are unsigned 32-bit
    "epochs": Bounds(1, 100000),
    "lr": Bounds(0, 10, lo_open=True),
    "warmup_epochs": Bounds(0, 100000),  # and at most the stage's epochs
    "momentum": Bounds(0, 1, hi_open=True),
    "weight_decay": Bounds(0, 1),
    "patience": Bounds(0, 100000),
    "tensorboard_histograms": Bounds(1, 100000, zero="off"),
    "backbone_probe_seconds": Bounds(0, 86400, lo_open=True),
}


C_BOUNDS = Bounds(1e-6, 1e6)  # the L-BFGS head's inverse L2 strengths (head_c_range)


ONE_CYCLE_PCT_START = 0.25  # fastai's fit_one_cycle default: the share of a stage spent rising


@dataclass(frozen=True)
class Stage:
    name: str
    train: str = "frozen"  # freeze spec: frozen | all | top:N | from:BLOCK
    epochs: int = 10  # passes over the training images (or the feature cache)
    optimizer: str = "adam"
    lr: float = 1e-3  # peak learning rate, before linear batch scaling
    schedule: str = "constant"
    warmup_epochs: float = 0.0  # linear warm-up from lr/100, for warmup_cosine; one_cycle: its rise (default 25%)
    momentum: float = 0.9  # sgd-family only
    weight_decay: float = 0.0  # decoupled (adamw) or optimizer weight decay
    patience: int = 0  # early-stopping patience in epochs (0 = off); best weights restored

    @property
    def rise_epochs(self) -> float:
        """The epochs over which the learning rate climbs to ``lr``: ``warmup_epochs`` under
        ``warmup_cosine``; one-cycle's rise (``warmup_epochs`` when given, else the first 25% of
        the stage, fastai's ``pct_start``); 0 for the schedules that start at ``lr``. Before then a
        stage's curve says mostly how low its LR starts (a search's pruner waits for it)."""
        if self.schedule == "one_cycle":
            return float(self.warmup_epochs) if self.warmup_epochs else ONE_CYCLE_PCT_START * self.epochs
        if self.schedule == "warmup_cosine":
            return float(self.warmup_epochs)
        return 0.0


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    backbone: str = "efficientnet_lite0"  # Lite0: ImageNet weights offline, ~10x cheaper than ResNet50 on CPU
    # backbone="auto": the run probes these (cheapest first) on its own training images and trains
    # the cheapest whose cross-validated linear probe is within a tie margin of the best
    # (tuneflow.training.backbone_probe); --set backbone=NAME pins one.
    backbone_candidates: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
    # The probe's time bound: it looks at a class-stratified sample of the training images that
    # grows while this many seconds last (all of them when they fit; at least MIN_PER_CLASS a class).
    backbone_probe_seconds: float = 20.0
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
    # How a linear head on cached features is fitted: "lbfgs" = multinomial logistic regression to
    # convergence, L2 strength chosen by cross-validation on the training features (deterministic,
    # seconds; the stage's epochs/lr/optimizer/dropout/l2 do not apply); "sgd" = the stage's
    # optimizer for its epochs; "auto" = lbfgs where it applies (linear head, cached stage).
    head_solver: str = "auto"
    # The inverse L2 strengths (C, on standardised features) the L-BFGS head's cross-validation
    # chooses from: (low, high), tried at half-decade steps (1, 3, 10, ...); () = 1e-3..10.
    head_c_range: tuple[float, ...] = ()
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
    # Fine-tuning stages that train only the top of the backbone: cache the frozen prefix's
    # activations (prefix_views augmented views per image) and run only the trainable top each
    # step. auto = when it saves most of the forward pass and fits in memory; on; off.
    prefix_cache: str = "auto"
    prefix_views: int = 0  # 0 = the stage's epochs (one new view an epoch), at most 8
    feature_engine: str = "auto"  # auto | tensorflow | openvino: runs the frozen-feature pass (auto: OpenVINO on CPUs)
    # Precision of the cached features a frozen stage trains on: float32 = the exported artifact's,
    # so the head is fitted on the features the artifact will compute; run = the run's precision
    # (bf16 on CPUs that have it: the feature pass ~1.5x faster, but the head then meets slightly
    # different features after export: on brain_mri_yn 15 of 49 predictions changed).
    feature_precision: str = "float32"
    precision: str = "auto"
    strategy: str = "auto"
    # Epochs between weight, gradient and activation histograms in tensorboard/ (0 = off): one
    # forward and backward pass on a fixed batch of 32 training examples each time.
    tensorboard_histograms: int = 1
    tensorboard_layers: tuple[str, ...] = ()  # layers whose activations are logged; () = features + head's penultimate
    seed: int = 0
    stages: tuple[Stage, ...] = (Stage("head"),)
    adapted: tuple[str, ...] = ()  # set by validate(): what it changed to fit the backbone (for the report)

    def validate(self) -> "Recipe":
        """Check every value; return this recipe, or a copy adapted to its backbone.

        A freeze spec ``top:N`` asking for more blocks than the backbone has becomes ``top:<all of
        them>`` (a shipped recipe written for Lite0's 9 blocks still runs on a 5-block ResNet50),
        said in :attr:`adapted` and the log; ``from:BLOCK`` must name one of the backbone's blocks.
        Anything else out of range is a :class:`RecipeError` naming the key and what is valid."""

        def choose(key, value, options):
            if value not in options:
                raise RecipeError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, options))}.")

        _check_types(self)
        choose("backbone", self.backbone, sorted(BACKBONES) + ["auto"])
        if not self.backbone_candidates:
            raise RecipeError("backbone_candidates is empty; name the backbones backbone=auto compares, "
                              "cheapest first (e.g. efficientnet_lite0,efficientnet_lite1).")
        for c in self.backbone_candidates:
            choose("backbone_candidates", c, sorted(BACKBONES))
        if len(set(self.backbone_candidates)) != len(self.backbone_candidates):
            raise RecipeError(f"backbone_candidates={','.join(self.backbone_candidates)} names a backbone twice.")
        choose("augment", self.augment, list(PRESETS))
        choose("augment_backend", self.augment_backend, BACKENDS)
        choose("sampling", self.sampling, SAMPLINGS)
        choose("resize", self.resize, RESIZE_MODES)
        choose("class_weight", self.class_weight, ("none", "balanced"))
        choose("head", self.head, HEADS)
        choose("head_solver", self.head_solver, ("auto", "lbfgs", "sgd"))
        choose("norm", self.norm, NORMS)
        choose("replace_backbone_bn", self.replace_backbone_bn, ("", "instance", "group", "layer"))
        choose("precision", self.precision, PRECISIONS)
        choose("strategy", self.strategy, STRATEGIES)
        choose("feature_engine", self.feature_engine, FEATURE_ENGINES)
        choose("prefix_cache", self.prefix_cache, ("auto", "on", "off"))
        choose("feature_precision", self.feature_precision, ("float32", "run"))
        for f in fields(self):
            if f.name in RANGES:
                _number(f.name, getattr(self, f.name))
        _check_c_range(self.head_c_range)
        if self.backbone == "auto":  # every candidate must run it; it is validated again once chosen
            for c in self.backbone_candidates:
                self.override(backbone=c)
        spec = get_spec(self.size_backbone)
        if self.input_size and self.input_size < spec.min_size:
            raise RecipeError(f"input_size={self.input_size} is too small for {spec.name}; use 0 "
                              f"(default, {spec.default_size}) or >= {spec.min_size}.")
        _check_weights(self.weights)
        if not self.stages:
            raise RecipeError("A recipe needs at least one stage.")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise RecipeError(f"Stage names must be unique: {names}.")
        stages, notes = list(self.stages), []
        for i, s in enumerate(self.stages):
            choose(f"{s.name}.optimizer", s.optimizer, OPTIMIZERS)
            choose(f"{s.name}.schedule", s.schedule, SCHEDULES)
            for f in fields(s):
                if f.name in RANGES:
                    _number(f"{s.name}.{f.name}", getattr(s, f.name), RANGES[f.name])
            if s.warmup_epochs > s.epochs:
                raise RecipeError(f"{s.name}.warmup_epochs={s.warmup_epochs!r} is out of range: it must "
                                  f"be in [0, {s.name}.epochs={s.epochs}].")
            fitted = fit_freeze_spec(s.name, s.train, spec)
            if fitted != s.train:
                note = (f"stage {s.name!r}: train={s.train!r} asks for more blocks than {spec.name} has "
                        f"({len(spec.block_names)}); it trains all of them ({fitted!r})")
                log.warning("%s", note)
                stages[i], notes = replace(s, train=fitted), notes + [note]
        if notes:
            return replace(self, stages=tuple(stages), adapted=self.adapted + tuple(notes))
        return self

    @property
    def size_backbone(self) -> str:
        """The backbone whose default size ``input_size=0`` means: the recipe's, or under
        ``backbone=auto`` its first (cheapest) candidate (every candidate is probed at one size)."""
        return self.backbone_candidates[0] if self.backbone == "auto" else self.backbone

    @property
    def pixels(self) -> int:
        """The input size the run trains and the data load at (the one place ``0`` is resolved)."""
        return get_spec(self.size_backbone).input_size(self.input_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        """A recipe from its :meth:`to_dict` (``recipe.json``), every value type-checked and validated."""
        if not isinstance(d, dict):
            raise RecipeError(f"A recipe is a JSON object of keys; got {type(d).__name__}.")
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise RecipeError(f"Unknown recipe keys {unknown}; valid keys: {', '.join(valid_keys())}.")
        stage_keys = {f.name for f in fields(Stage)}
        stages = []
        for i, sd in enumerate(d.get("stages", ())):
            if not isinstance(sd, dict) or "name" not in sd:
                raise RecipeError(f"stages[{i}]={sd!r}: expected an object with a 'name'.")
            bad = sorted(set(sd) - stage_keys)
            if bad:
                raise RecipeError(f"Unknown stage keys {bad} in stage {sd['name']!r}; stage keys: "
                                  f"{', '.join(sorted(stage_keys))}.")
            stages.append(Stage(**{k: v if k == "name" else _convert(f"{sd['name']}.{k}", _HINTS[Stage][k], v)
                                   for k, v in sd.items()}))
        d = {k: v if k == "name" else _convert(k, _HINTS[cls][k], v) for k, v in d.items() if k != "stages"}
        return cls(**d, stages=tuple(stages)).validate()

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
        recipe, explicit = self, set()
        for key, value in items:
            recipe, stage = _apply(recipe, key, value)
            if stage is not None and key.endswith(".train"):
                explicit.add(stage)
        for i in sorted(explicit):
            _check_top_spec(recipe, i)
        return recipe.validate()


def _number(key: str, value, bounds: Bounds | None = None) -> None:
    """``value`` must be a finite number within the key's :data:`RANGES` entry."""
    bounds = bounds or RANGES[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{key}={value!r}: expected a number in {bounds}.")
    if not math.isfinite(value):
        raise RecipeError(f"{key}={value!r} is not a finite number; use a value in {bounds}.")
    if not bounds.holds(value):
        raise RecipeError(f"{key}={value!r} is out of range: it must be in {bounds}.")


def _check_c_range(c_range: tuple) -> None:
    """``head_c_range`` is () or two numbers low < high within :data:`C_BOUNDS`."""
    if c_range == ():
        return
    if len(c_range) != 2 or not all(C_BOUNDS.holds(c) and math.isfinite(c) for c in c_range) or not c_range[0] < c_range[1]:
        raise RecipeError(f"head_c_range={','.join(map(str, c_range))}: expected two numbers LOW,HIGH with "
                          f"LOW < HIGH, both in {C_BOUNDS} (e.g. head_c_range=0.001,10), or empty for 1e-3..10.")


def _check_types(obj) -> None:
    """Every field of a Recipe (and its stages) holds its declared type (from_dict and direct
    construction bypass the parsing of overrides)."""
    hints = _HINTS[type(obj)]
    for f in fields(obj):
        if f.name in ("stages", "adapted"):
            continue
        value = getattr(obj, f.name)
        if not _is_type(value, hints[f.name]):
            key = f.name if isinstance(obj, Recipe) else f"{obj.name}.{f.name}"
            raise RecipeError(f"{key}={value!r}: expected {_type_name(hints[f.name])}.")
    if isinstance(obj, Recipe):
        if not isinstance(obj.stages, tuple) or not all(isinstance(s, Stage) for s in obj.stages):
            raise RecipeError(f"stages={obj.stages!r}: expected a tuple of Stage.")
        for s in obj.stages:
            _check_types(s)


def _is_type(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_is_type(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(_is_type(v, args[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}.get(
        tp, str(tp).replace("typing.", ""))


def _check_weights(weights) -> None:
    """``imagenet``, None, a tuneflow run folder, or an HDF5 weights file that really opens as one.

    Whether its tensors fit the backbone is checked where the backbone is built."""
    if weights is None or weights == "imagenet":
        return
    use = ("use 'imagenet', None (train from scratch), a Keras weights file (.weights.h5 or a "
           "keras.applications .h5) or a tuneflow run folder")
    path = Path(str(weights)).expanduser()
    if not str(weights).strip():
        raise RecipeError(f"weights={weights!r} is empty; {use}.")
    if path.is_dir():
        found = [c for c in (path / "backbone.weights.h5", path / "model" / "backbone.weights.h5") if c.is_file()]
        if not found:
            raise RecipeError(f"weights={weights!r} is a folder without backbone.weights.h5 (not a tuneflow "
                              f"run folder); {use}.")
        path = found[0]
    elif not path.exists():
        raise RecipeError(f"weights={weights!r}: no such file or folder; {use}.")
    elif not path.name.lower().endswith(WEIGHTS_SUFFIXES):
        raise RecipeError(f"weights={weights!r} is not a Keras weights file (it does not end in "
                          f"{' or '.join(WEIGHTS_SUFFIXES)}); {use}.")
    import h5py
    try:
        with h5py.File(path, "r") as h5:
            empty = len(h5.keys()) == 0
    except OSError as exc:
        raise RecipeError(f"weights={weights!r}: {path} is not a readable HDF5 weights file "
                          f"({str(exc).splitlines()[0]}); {use}.") from None
    if empty:
        raise RecipeError(f"weights={weights!r}: {path} holds no weights (an empty HDF5 file); {use}.")


def fit_freeze_spec(stage: str, train: str, spec) -> str:
    """The freeze spec ``train`` checked against backbone ``spec``'s named blocks.

    Returns it unchanged, or ``top:<block count>`` when ``top:N`` asks for more blocks than the
    backbone has; an unparsable spec or a ``from:BLOCK`` the backbone lacks is a RecipeError."""
    try:
        fs = FreezeSpec.parse(train)
    except ValueError as exc:
        raise RecipeError(f"stage {stage!r}: {exc}") from None
    blocks = spec.block_names
    if fs.kind == "top" and fs.n > len(blocks):
        return f"top:{len(blocks)}"
    if fs.kind == "from" and fs.block not in blocks:
        raise RecipeError(f"{stage}.train={train!r}: {spec.name} has no block {fs.block!r}; its blocks "
                          f"are {', '.join(blocks)} (use from:<one of them>, top:0..top:{len(blocks)}, "
                          "all or frozen).")
    return train


def _check_top_spec(recipe: "Recipe", i: int) -> None:
    """A ``top:N`` a user set explicitly must fit the backbone: it is refused, not adapted."""
    stage = recipe.stages[i]
    if recipe.backbone not in BACKBONES:
        return  # validate() names the valid backbones
    try:
        fs = FreezeSpec.parse(stage.train)
    except ValueError:
        return  # validate() explains the syntax
    blocks = get_spec(recipe.backbone).block_names
    if fs.kind == "top" and fs.n > len(blocks):
        raise RecipeError(f"{stage.name}.train={stage.train!r} asks for {fs.n} blocks but {recipe.backbone} has "
                          f"{len(blocks)} ({', '.join(blocks)}); use top:0..top:{len(blocks)}, all, frozen "
                          "or from:BLOCK.")


def valid_keys() -> list[str]:
    top = [f.name for f in fields(Recipe) if f.name not in ("stages", "adapted")]
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
        where = f" in {RANGES[key.rsplit('.', 1)[-1]]}" if key.rsplit(".", 1)[-1] in RANGES else ""
        if isinstance(value, bool):
            raise RecipeError(f"{key}={value!r}: expected an integer{where}.")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{key}={value!r}: expected an integer{where}.") from None
        if not math.isfinite(f):
            raise RecipeError(f"{key}={value!r} is not a finite number; use an integer{where}.")
        if f != int(f):
            raise RecipeError(f"{key}={value!r}: expected an integer{where}.")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{key}={value!r}: expected a number.") from None
    if tp is str:
        return str(value)
    raise RecipeError(f"{key}: unsupported type {tp}.")


_HINTS = {cls: typing.get_type_hints(cls) for cls in (Recipe, Stage)}


def _apply(recipe: Recipe, key: str, value) -> tuple[Recipe, int | None]:
    """``recipe`` with one override applied, and the index of the stage it set (None: top level)."""
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
        return replace(recipe, stages=tuple(stages)), i
    hints = _HINTS[Recipe]
    if key == "adapted":
        raise RecipeError("'adapted' is written by tuneflow (what it changed to fit the backbone); it "
                          "cannot be set.")
    if key not in hints or key == "stages":
        import difflib
        close = difflib.get_close_matches(key, valid_keys(), n=1)
        raise RecipeError(f"Unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                          + f"; valid keys: {', '.join(valid_keys())}.")
    return replace(recipe, **{key: _convert(key, hints[key], value)}), None
