"""FeatureExtractor: a frozen feature model run by one engine at one precision, through the feature cache."""
from __future__ import annotations

import hashlib
import logging
import os
import time
from contextlib import contextmanager

import numpy as np

from ..errors import TuneflowError
from . import cache as fcache
from . import infer

log = logging.getLogger("tuneflow")

# Images per forward pass without gradients: 64 is ~30% faster than 32 on 2 CPU cores at 224 px;
# activations grow with the pixel count, so larger inputs get proportionally smaller batches
# (input_size=2048 -> 1 image a batch) and the feature pass's memory stays about constant. The
# batch is also capped by the memory this process may still use (``available_memory``): a batch's
# activations are estimated from the model's layer outputs (``activation_bytes``) and kept under
# MEMORY_SHARE of what is available, so a busy machine or a small container gets smaller batches.
INFER_BATCH = 64
REFERENCE_PIXELS = 224 * 224
MEMORY_SHARE = 0.25
# Live tensors at the peak of a forward pass, in units of the largest layer output: that output,
# its input, a residual/SE branch kept alive across the block and oneDNN's reordered copy.
LIVE_FACTOR = 4


def _read_int(path) -> int | None:
    try:
        text = open(path).read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory(root: str = "/") -> int:
    """Bytes this process can still allocate: the least of the machine's MemAvailable and the
    headroom under the cgroup's limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``: Docker,
    Kubernetes, Colab), so a container's limit is respected, not only the host's free memory.
    ``root``: where /proc and /sys are (tests point it at a folder of fake files)."""
    from pathlib import Path
    root = Path(root)
    candidates = []
    try:
        for line in open(root / "proc/meminfo"):
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
                break
    except OSError:
        pass
    for limit_f, usage_f in (("sys/fs/cgroup/memory.max", "sys/fs/cgroup/memory.current"),
                             ("sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(root / limit_f), _read_int(root / usage_f)
        if limit is not None and usage is not None and limit < (1 << 60):
            candidates.append(max(0, limit - usage))
    if not candidates and str(root) != "/":
        return 4 << 30
    if not candidates:  # not Linux: assume a laptop's worth rather than refusing to run
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return 4 << 30
    return min(candidates)


def activation_bytes(model) -> int:
    """Estimated peak bytes of a forward pass for one image: LIVE_FACTOR x the largest layer
    output (float32), from the layers' static shapes. Without gradients, TensorFlow frees each
    activation once it is consumed, so the peak follows the largest layer, not their sum."""
    largest = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        try:
            outs = layer.output
        except (AttributeError, ValueError):  # a layer used twice, or not built: skip it
            continue
        for o in (outs if isinstance(outs, (list, tuple)) else [outs]):
            shape = getattr(o, "shape", None)
            if shape is None or len(shape) < 2 or any(d is None for d in shape[1:]):
                continue
            largest = max(largest, int(np.prod(shape[1:])))
    if not largest:  # no static shapes: fall back to the input
        shape = model.inputs[0].shape
        largest = int(np.prod([d or 224 for d in shape[1:]]))
    return LIVE_FACTOR * 4 * largest


# Without a model to measure (a loaded artifact), the largest activation of the backbones in the
# registry per input pixel: EfficientNet-Lite's first expanded block, 96 channels at half
# resolution = 24 floats a pixel; ResNet50's first stage (256 channels at 1/4) = 16; VGG16's
# first block (64 channels at full resolution) = 64. The largest is assumed.
FLOATS_PER_PIXEL = 64


def infer_batch(size: int, base: int = INFER_BATCH, model=None, available: int | None = None,
                memory: bool = True) -> int:
    """Images per batch of a forward pass without gradients at ``size`` px: ``base`` at 224 px,
    scaled down with the pixel count and down to what fits in MEMORY_SHARE of ``available``
    (bytes; default :func:`available_memory`), the activations measured on ``model`` or, without
    one, estimated as FLOATS_PER_PIXEL floats a pixel. ``memory=False`` skips the memory cap."""
    batch = int(max(1, min(base, base * REFERENCE_PIXELS // max(1, size * size))))
    if memory:
        per_image = activation_bytes(model) if model is not None \
            else LIVE_FACTOR * 4 * FLOATS_PER_PIXEL * size * size
        budget = MEMORY_SHARE * (available_memory() if available is None else available)
        fits = int(budget // max(1, per_image))
        if fits < batch:
            log.warning("Feature pass: %d images a batch would need ~%.1f GB for activations; "
                        "%.1f GB is available, so the batch is %d.", batch, batch * per_image / 2**30,
                        budget / MEMORY_SHARE / 2**30, max(1, fits))
            batch = max(1, fits)
        if fits < 1:
            log.warning("Feature pass: one image at %d px may need ~%.1f GB, more than the %.1f GB "
                        "available; lower input_size if the process runs out of memory.",
                        size, per_image / 2**30, budget / MEMORY_SHARE / 2**30)
    return batch


def architecture_digest(model) -> str:
    """Changes with any layer's class or configuration (e.g. replace_backbone_bn), not with weights."""
    import json
    h = hashlib.sha256()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        cfg = layer.get_config() if hasattr(layer, "get_config") else {}
        cfg = {k: v for k, v in cfg.items() if k not in ("name", "trainable")}
        h.update(type(layer).__name__.encode())
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class FeatureExtractor:
    """Runs ``feature_model`` (frozen) over images: engine, precision, batch size and the converted
    model are its state; :meth:`cached` keys results by everything that changes them.

    The model is a local (non-distributed) model over the same layers: features are computed on
    each worker without collective ops, because whether the cache hits may differ between workers.
    """

    def __init__(self, feature_model, engine: str = "auto", batch_size: int | None = None,
                 precision: str | None = None):
        import keras
        self.model = keras.Model(feature_model.input, feature_model.output)
        # None: the run's own policy (bf16 features where the run trains in bf16); "float32": the
        # exported artifact's precision, so a head fitted on these features sees at training what
        # the artifact will compute (see Recipe.feature_precision)
        if precision not in (None, "float32"):
            raise ValueError(f"precision={precision!r}: None (the run's policy) or 'float32'.")
        self.precision = precision
        self.engine = infer.resolve_engine(engine)
        size = int(self.model.inputs[0].shape[1] or 224)
        self.batch_size = batch_size or infer_batch(size, model=self.model)
        self.memo: dict = {}
        self.weights_key = fcache.weights_digest(self.model)
        self.arch_key = architecture_digest(self.model)
        self.stats: list[tuple[int, float, str]] = []  # (images, seconds, engine that ran)

    @contextmanager
    def _policy(self, layers: bool = False):
        """The global dtype policy (and, with ``layers``, the model's layers' policies) at this
        extractor's precision for the duration; nothing changes when it follows the run's."""
        import keras
        before = keras.mixed_precision.global_policy()
        if self.precision is None or before.name == self.precision:
            yield
            return
        keras.mixed_precision.set_global_policy(self.precision)
        try:
            if layers:
                with infer.float32_policies(self.model):
                    yield
            else:
                yield
        finally:
            keras.mixed_precision.set_global_policy(before)

    @property
    def describe(self) -> str:
        """The engine asked for, as the cache key names it: ``openvino/bf16``, ``tensorflow/float32``."""
        with self._policy():
            return infer.describe(self.engine)

    @property
    def used(self) -> str:
        """The engine that actually ran (OpenVINO falls back to TensorFlow for a graph it cannot convert)."""
        with self._policy():
            return infer.describe(self.memo.get("used", self.engine))

    def run(self, images, map_fn=None):
        """Outputs on ``images`` (an array or a list of arrays, as if concatenated); NaN/Inf refused."""
        t0 = time.time()
        with self._policy(layers=True):
            out = infer.run(self.model, images, self.batch_size, self.engine, map_fn=map_fn,
                            weights_key=self.weights_key, memo=self.memo)
        for o in (out if isinstance(out, list) else [out]):
            self._refuse_nonfinite(o, 0, len(o))
        self.stats.append((_count(images), time.time() - t0, self.used))
        return out

    def _refuse_nonfinite(self, o, start: int, total: int) -> None:
        """A TuneflowError when outputs ``o`` (rows from ``start`` of ``total``) hold NaN/Inf."""
        bad = ~np.isfinite(np.asarray(o, np.float32)).reshape(len(o), -1).all(1)
        if bad.any():
            raise TuneflowError(
                f"The backbone produced NaN/Inf features for {int(bad.sum())} of {len(o)} images in a batch "
                f"of {total} (first at index {start + int(np.argmax(bad))}) on {self.used}. The weights are "
                "damaged, or the precision overflows: try --set precision=float32 or --set feature_engine=tensorflow.")

    def compute(self, images, augment_fn=None, views: int = 1, dtype=np.float32) -> np.ndarray:
        """(views, N, *feature_shape): view 0 is the plain image, later views augmented. In RAM:
        for large sets use :meth:`compute_into` with an on-disk output."""
        out = np.empty((views, _count(images)) + tuple(self.model.output.shape[1:]), dtype)
        if isinstance(images, (list, tuple)):  # one pass; each array's rows are a view of ``out``
            ends = np.cumsum([0] + [len(p) for p in images])
            self.compute_into([out[:, a:b] for a, b in zip(ends[:-1], ends[1:])], images, augment_fn, views)
        else:
            self.compute_into(out, images, augment_fn, views)
        return out

    def compute_into(self, out, images, augment_fn=None, views: int = 1) -> None:
        """:meth:`compute` written as it goes into ``out``, batch by batch: ``out`` is a (views, N,
        ...) array (a memory map, or the writer :func:`~tuneflow.features.cache.cached_into` hands
        out), or, when ``images`` is a list of arrays, a list of such outputs, one per array (one
        pass, one traced function over train and val together). Each batch is checked for
        NaN/Inf before it is written; one ``stats`` row per view."""
        parts = list(images) if isinstance(images, (list, tuple)) else [images]
        outs = list(out) if isinstance(images, (list, tuple)) else [out]
        if len(outs) != len(parts):
            raise ValueError(f"compute_into: {len(outs)} outputs for {len(parts)} arrays of images")
        total = sum(len(p) for p in parts)
        with self._policy(layers=True):
            self._compute_views(outs, parts, total, augment_fn, views)

    def _compute_views(self, outs, parts, total, augment_fn, views) -> None:
        for v in range(views):
            fn = augment_fn if (augment_fn is not None and v > 0) else None
            t0, row = time.time(), 0
            for got in infer.iter_run(self.model, parts if len(parts) > 1 else parts[0], self.batch_size,
                                      self.engine, map_fn=fn, weights_key=self.weights_key, memo=self.memo):
                if isinstance(got, list):
                    raise ValueError("compute_into: the feature model has several outputs; use run()")
                self._refuse_nonfinite(got, row, total)
                _scatter(outs, parts, v, row, got)
                row += len(got)
            if row != total:
                raise RuntimeError(f"feature pass produced {row} rows for {total} images")
            self.stats.append((total, time.time() - t0, self.used))

    def key(self, **parts) -> str:
        """A cache key over the model (weights and architecture), the engine and ``parts``."""
        return fcache.cache_key(weights=self.weights_key, arch=self.arch_key, engine=self.describe,
                                size=int(self.model.inputs[0].shape[1]), **parts)


def _count(images) -> int:
    return sum(len(p) for p in images) if isinstance(images, (list, tuple)) else len(images)


def _scatter(outs, parts, view: int, row: int, got) -> None:
    """Rows ``row..row+len(got)`` of the concatenated ``parts`` written into their own outputs."""
    base = 0
    for o, p in zip(outs, parts):
        lo, hi = max(row, base), min(row + len(got), base + len(p))
        if lo < hi:
            o[view][lo - base:hi - base] = got[lo - row:hi - row]
        base += len(p)
