"""What a stage trains on when its backbone is frozen: the features computed once into the cache
(:mod:`tuneflow.features.cache`), the head that trains on them, and the batches it reads."""
from __future__ import annotations

import logging
import math
import time

import keras
import numpy as np
import tensorflow as tf

from ..backbones import FreezeSpec
from ..data import DataBundle
from ..data.augment import make_augmenter
from ..data.pipeline import _epoch_indices
from ..data.store import inmemory_max_bytes
from ..features import cache as fcache
from ..features.cache import rows_view, split_views
from ..features.extractor import FeatureExtractor
from .plan import Plan

log = logging.getLogger("tuneflow")


def cache_trainer(recipe, head, channels: int):
    """For linear/mlp heads the cache holds pooled float32 vectors (exact, ~50x smaller than maps):
    the trainer is the head after its pooling layer, sharing its layers and weights."""
    if recipe.head == "conv":
        return head, None
    pool = head.layers[0]
    trainer = keras.Sequential([keras.Input((channels,))] + head.layers[1:],
                               name="head_on_cache")
    return trainer, pool


def pooled_features(asm, pool):
    """The frozen backbone's features as the cache holds them: through the head's pooling layer
    (``pool``, from :func:`cache_trainer`), or the maps themselves for a conv head (None)."""
    if pool is None:
        return asm.feature_model
    return keras.Model(asm.feature_model.input, pool(asm.feature_model.output), name="pooled_features")


def cache_extractor(recipe, feat_model) -> FeatureExtractor:
    """The feature pass that fills a stage's cache: the recipe's engine, at float32 unless
    ``feature_precision=run`` (see Recipe.feature_precision)."""
    return FeatureExtractor(feat_model, recipe.feature_engine,
                            precision="float32" if recipe.feature_precision == "float32" else None)


def _key_base(plan: Plan, bundle: DataBundle, extractor: FeatureExtractor, tap) -> dict:
    pooled = len(extractor.model.output.shape) == 2
    return dict(backbone=plan.spec.name, tap=tap, pooled=pooled, data=bundle.fingerprint())


def train_key(plan: Plan, bundle: DataBundle, extractor: FeatureExtractor, tap) -> str:
    """The cache key of a stage's training features (what :func:`cached_features` reads)."""
    r = plan.recipe
    return extractor.key(**_key_base(plan, bundle, extractor, tap), split="train", views=r.cache_views,
                         augment=f"{r.augment}/{r.augment_backend}/seed{r.seed}" if r.cache_views > 1 else "")


def val_key(plan: Plan, bundle: DataBundle, extractor: FeatureExtractor, tap) -> str:
    """The cache key of a stage's validation features."""
    return extractor.key(**_key_base(plan, bundle, extractor, tap), split="val", views=1)


def cached_features(plan: Plan, bundle: DataBundle, extractor: FeatureExtractor, tap):
    """Train (views, N, ...) and val (N, ...) features from the cache, computed once if missing.

    The feature pass writes each batch into the cache file as it goes
    (:func:`~tuneflow.features.cache.cached_into`); large caches come back as read-only memory
    maps, so no step holds all features (or all images) in RAM."""
    r = plan.recipe
    aug = make_augmenter(r.augment, r.augment_backend, plan.size, r.seed) if r.cache_views > 1 else None
    pooled = len(extractor.model.output.shape) == 2
    dtype = np.float32 if pooled else np.float16  # maps are big: half precision; vectors: exact
    tr_key, va_key = train_key(plan, bundle, extractor, tap), val_key(plan, bundle, extractor, tap)
    fshape = tuple(int(d) for d in extractor.model.output.shape[1:])
    n_tr, n_va = len(bundle.train), len(bundle.val)
    t0 = time.time()
    n0 = len(extractor.stats)
    got = {}
    if r.cache_views == 1 and (not r.feature_cache or not (_exists(tr_key) or _exists(va_key))):
        def fill_train(out_tr):  # one pass over train + val, one traced function
            def fill_val(out_va):
                extractor.compute_into([out_tr, out_va], [bundle.train.x, bundle.val.x])
            got["val"] = _cached_into(va_key, (1, n_va) + fshape, dtype, fill_val, r.feature_cache)
        ftr = _cached_into(tr_key, (1, n_tr) + fshape, dtype, fill_train, r.feature_cache)
    else:
        ftr = _cached_into(tr_key, (r.cache_views, n_tr) + fshape, dtype,
                           lambda out: extractor.compute_into(out, bundle.train.x, aug, r.cache_views),
                           r.feature_cache)
    fva = got["val"] if "val" in got else _cached_into(
        va_key, (1, n_va) + fshape, dtype, lambda out: extractor.compute_into(out, bundle.val.x), r.feature_cache)
    ran = extractor.stats[n0:]
    if ran:
        log.info("feature cache: %d images through %s (%s) in %.1f s%s", sum(n for n, _, _ in ran),
                 plan.spec.name, extractor.used, time.time() - t0,
                 ", memory-mapped" if isinstance(ftr, np.memmap) else "")
    else:
        log.info("feature cache: reused (same backbone, weights, size, tap, engine and data)")
    return ftr, split_views(fva)[0]  # a map of its own: read with pread (see rows_view)


def _exists(*keys):
    return all(fcache.exists(k) for k in keys)


def _cached_into(key, shape, dtype, fill, enabled):
    return fcache.cached_into(key, shape, dtype, fill, enabled=enabled)[0]


# Cached features at most this large (bytes) go through ``from_tensor_slices`` on the shuffle
# path (a tensor copy of them, then tf.data's own shuffle); larger ones, and memory maps, are
# gathered by index a batch at a time from a NumPy generator (no copy). The generator is slower
# for small sets only (benchmarks/bench_head_input.py, 1280-d vectors, batch 32, 2 shared CPU
# cores, s/epoch slices vs generator: 2,000 vectors 0.025 vs 0.136; 10,000 (49 MB) 0.31 vs 0.31;
# 20,000 (98 MB) 0.54 vs 0.57; an earlier run on a busier machine had the generator ahead at 20,000).
SLICES_MAX_BYTES = 64 << 20


def cached_dataset(plan: Plan, x, y: np.ndarray, seed: int, dtype=None):
    """Batches of cached features: shuffled each epoch, or class-balanced with indices drawn anew
    every epoch (a single draw would drop the same majority examples for the whole stage).

    ``x``: the features (N, ...), or a list of V arrays of them, one per view (augmented copies,
    e.g. a cached prefix's activations): epoch e then reads view e % V. ``dtype``: each batch cast
    to it (float16 caches train in float32).

    Features in RAM up to SLICES_MAX_BYTES on the shuffle path (one view) become one tensor
    (tf.data's shuffle); otherwise, memory maps included, each batch's rows are gathered by index
    from a generator (a memory-mapped cache read with ``pread``): nothing is copied whole."""
    views = list(x) if isinstance(x, (list, tuple)) else [x]  # a (V, N, ...) map: pass split_views(x)
    first = views[0]
    g, cw = plan.global_batch, plan.class_weights
    whole = plan.replicas > 1  # whole batches only: see features.predict.predict for why
    n_batches = math.ceil(len(y) / g)
    in_ram = len(views) == 1 and not isinstance(first, np.memmap) and first.nbytes <= SLICES_MAX_BYTES
    if plan.recipe.sampling == "shuffle" and not whole and in_ram:
        parts = (first if dtype is None else first.astype(dtype), y)
        parts += () if cw is None else (cw[y],)
        ds = tf.data.Dataset.from_tensor_slices(parts).shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(g).prefetch(tf.data.AUTOTUNE), n_batches
    rng = np.random.default_rng(seed)
    srcs = [rows_view(v) for v in views]
    epoch = [0]

    def batches():  # called once an epoch
        src = srcs[epoch[0] % len(srcs)]
        epoch[0] += 1
        idx = _epoch_indices(y, plan.recipe.sampling, rng)
        short = (-len(idx)) % g
        if whole and short:
            idx = np.concatenate([idx, rng.choice(idx, short)])
        for b in range(0, len(idx), g):
            sel = idx[b:b + g]
            xb = src[sel] if dtype is None else np.asarray(src[sel]).astype(dtype)
            yield (xb, y[sel]) if cw is None else (xb, y[sel], cw[y[sel]])

    sig = (tf.TensorSpec((None,) + first.shape[1:], tf.as_dtype(dtype or first.dtype)),
           tf.TensorSpec([None], tf.as_dtype(y.dtype)))
    if cw is not None:
        sig += (tf.TensorSpec([None], tf.float32),)
    n = math.ceil((len(y) + ((-len(y)) % g if whole else 0)) / g)
    ds = tf.data.Dataset.from_generator(batches, output_signature=sig)
    return ds.apply(tf.data.experimental.assert_cardinality(n)).prefetch(tf.data.AUTOTUNE), n


def uses_cache(plan: Plan, stage) -> bool:
    r = plan.recipe
    fs = FreezeSpec.parse(plan.stage_train(stage))
    frozen = fs.kind == "frozen" or (fs.kind == "top" and fs.n == 0)
    return frozen and r.feature_cache and not (r.spatial_dropout and r.head == "conv")


def uses_lbfgs(plan: Plan) -> bool:
    r = plan.recipe
    return r.head == "linear" and r.head_solver in ("auto", "lbfgs")


def lbfgs_fits(ftr) -> bool:
    """Whether the L-BFGS probe may take these features: it holds them in RAM as float64 with a
    standardised copy and its folds' copies (~4x their float64 size), so above a quarter of
    :func:`~tuneflow.data.store.inmemory_max_bytes` in float64 (256 MB by default: 26,000
    vectors of 1280) the head is trained by the stage's optimizer on batches read from the cache."""
    need = int(np.prod(ftr.shape, dtype=np.int64)) * 8
    if need <= inmemory_max_bytes() // 4:
        return True
    log.info("linear head: %d cached vectors (%.0f MB as float64) exceed the L-BFGS probe's in-RAM limit "
             "(%.0f MB, a quarter of TUNEFLOW_INMEMORY_MAX_BYTES); trained by the stage's optimizer "
             "instead, from the cache on disk", int(np.prod(ftr.shape[:2])), need / 2**20,
             inmemory_max_bytes() / 4 / 2**20)
    return False
