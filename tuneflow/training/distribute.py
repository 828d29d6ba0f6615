"""Distribution strategy and numeric precision choices."""
from __future__ import annotations

import json
import logging
import math
import os
import types

import numpy as np
import tensorflow as tf

from ..hardware import cpu_supports_bf16

log = logging.getLogger("tuneflow")


def make_strategy(name: str) -> tf.distribute.Strategy:
    """``auto``: MirroredStrategy over all GPUs when there are several, else the default strategy."""
    if name == "multiworker":
        # Created before anything else touches the TensorFlow runtime (listing devices would):
        # collective ops must be configured at start-up.
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy=multiworker needs TF_CONFIG (cluster and task) in the "
                             "environment of every worker; see the README's multi-machine section.")
        try:
            json.loads(os.environ["TF_CONFIG"])
        except ValueError as exc:
            raise ValueError(f"TF_CONFIG is not valid JSON ({exc}): {os.environ['TF_CONFIG'][:200]}") from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    raise ValueError(f"Unknown strategy {name!r}; choose auto, default, mirrored or multiworker.")


def worker_role(strategy) -> tuple[bool, int]:
    """(is_chief, task index). Only the chief writes the run folder; the other workers of a
    MultiWorkerMirroredStrategy write theirs to a temporary folder (they must still save, since
    saving is collective) and read checkpoints from the chief's folder when resuming."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True, 0
    kind, index = resolver.task_type, int(resolver.task_id or 0)
    has_chief = "chief" in (resolver.cluster_spec().as_dict() or {})
    return (kind == "chief") or (kind == "worker" and index == 0 and not has_chief) or kind is None, index


def worker_shard(strategy) -> tuple[int, int] | None:
    """(number of workers, this worker's index) under a MultiWorkerMirroredStrategy with several
    workers (a chief counts as worker 0), else None: what each worker passes to
    :func:`tuneflow.data.pipeline.train_dataset` so that it reads only its own share of the files."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    spec = resolver.cluster_spec().as_dict() or {}
    chiefs, workers = len(spec.get("chief", [])), len(spec.get("worker", []))
    if chiefs + workers < 2:
        return None
    kind, index = resolver.task_type, int(resolver.task_id or 0)
    return chiefs + workers, (0 if kind == "chief" else chiefs + index)


def choose_precision(precision: str) -> str:
    """``auto``: float16 on GPUs with tensor cores, bfloat16 on CPUs with AVX512-BF16/AMX, else float32."""
    if precision != "auto":
        return precision
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        cc = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
        return "mixed_float16" if cc and cc[0] >= 7 else "float32"
    return "mixed_bfloat16" if cpu_supports_bf16() else "float32"


def row_batches(x, batch_size: int, start: int = 0, stop: int | None = None):
    """Rows ``start:stop`` of an array, an :class:`~tuneflow.data.store.ImageRows` or a list of
    them (as if concatenated), ``batch_size`` rows at a time; only the rows of one batch are read
    (a store's rows with ``pread``) and nothing is concatenated except across a part boundary."""
    parts = list(x) if isinstance(x, (list, tuple)) else [x]
    stop = sum(len(p) for p in parts) if stop is None else stop
    carry, have, base = [], 0, 0
    for p in parts:
        lo, hi = max(start - base, 0), min(stop - base, len(p))
        base += len(p)
        i = lo
        while i < hi:
            take = min(batch_size - have, hi - i)
            carry.append(p[i:i + take])
            have += take
            i += take
            if have == batch_size:
                yield carry[0] if len(carry) == 1 else np.concatenate(carry)
                carry, have = [], 0
    if have:
        yield carry[0] if len(carry) == 1 else np.concatenate(carry)


# Rows per model.predict call when outputs are streamed: enough batches that the per-call cost
# (a dataset and an iterator, ~10 ms) is small, few enough that a chunk's outputs stay small.
STREAM_OUTPUT_BYTES = 64 << 20


def predict_chunks(model, x, batch_size: int, verbose: int = 0, map_fn=None, chunk_rows: int | None = None):
    """Outputs of ``model`` on ``x`` (an array, a lazy store array or a list of them, as if
    concatenated), yielded ``chunk_rows`` rows at a time (a multiple of the batch; default: what
    keeps a chunk's outputs under STREAM_OUTPUT_BYTES), in order; each item is an array, or a list
    for several outputs. Inputs are read batch by batch: neither the input nor the output is ever
    materialised whole. Semantics of :func:`predict` (whole batches under several replicas)."""
    replicas = model.distribute_strategy.num_replicas_in_sync
    batch = int(math.ceil(batch_size / replicas) * replicas)
    parts = list(x) if isinstance(x, (list, tuple)) else [x]
    n = sum(len(p) for p in parts)
    if chunk_rows is None:
        outs = model.outputs if isinstance(model.outputs, (list, tuple)) else [model.outputs]
        row_bytes = sum(4 * int(np.prod([d or 1 for d in o.shape[1:]])) for o in outs)
        chunk_rows = max(1, STREAM_OUTPUT_BYTES // max(1, row_bytes * batch)) * batch
    chunk_rows = max(batch, -(-chunk_rows // batch) * batch)  # whole batches per chunk
    first = next((p for p in parts if len(p)), None)
    if first is None:
        return
    shape, dtype = tuple(first.shape[1:]), first.dtype
    pad_row = np.asarray(first[:1])
    for lo in range(0, n, chunk_rows):
        m = min(chunk_rows, n - lo)

        def gen(lo=lo, m=m):
            for b in row_batches(parts, batch, lo, lo + m):
                if replicas > 1 and len(b) < batch:  # the last batch made whole
                    b = np.concatenate([b, np.repeat(pad_row, batch - len(b), axis=0)])
                yield b

        ds = tf.data.Dataset.from_generator(gen, output_signature=tf.TensorSpec((None,) + shape, tf.as_dtype(dtype)))
        if replicas > 1:  # a static batch size again: tf.distribute splits a batch it can measure
            ds = ds.unbatch().batch(batch)
        ds = ds.apply(tf.data.experimental.assert_cardinality(-(-m // batch)))  # Keras knows when it ends
        ds = ds.map(lambda a: tf.cast(a, tf.float32))
        if map_fn is not None:  # e.g. augmentation of the batch
            ds = ds.map(map_fn, num_parallel_calls=tf.data.AUTOTUNE)
        out = model.predict(ds.prefetch(tf.data.AUTOTUNE), verbose=verbose)
        yield [o[:m] for o in out] if isinstance(out, (list, tuple)) else out[:m]


def predict(model, x, batch_size: int, verbose: int = 0, map_fn=None):
    """``model.predict`` over an array (or a list of arrays, as if concatenated), correct under
    every strategy. The input is read batch by batch through a generator (a lazy store array is
    never materialised); the outputs are returned whole (see :func:`predict_chunks` to stream them).

    Under several replicas every batch is made whole (padded with copies of the first example,
    whose outputs are dropped): Keras 3 reduces the first batch across replicas before building
    (a short first batch fails with an AddN shape error) and an empty per-replica slice fails in
    BatchNormalization, so uneven batches are avoided rather than handled.
    """
    n = sum(len(p) for p in x) if isinstance(x, (list, tuple)) else len(x)
    chunks = list(predict_chunks(model, x, batch_size, verbose, map_fn, chunk_rows=max(1, n)))
    if not chunks:
        raise ValueError("predict: no rows to predict on (an empty input).")
    return chunks[0]


def patch_symbolic_build(model) -> None:
    """Work around keras-team/keras#20585 (Keras 3 + MultiWorkerMirroredStrategy: ``fit`` fails in
    ``_maybe_symbolic_build``, which all-reduces the first input batch across workers only to learn
    its shapes, and cannot reduce a PerReplica there; it also fails on an uneven first batch under
    MirroredStrategy). The shapes are taken from the first local replica's slice instead; nothing
    else changes. Only for several replicas, only on this model instance."""
    strategy = model.distribute_strategy
    if strategy.num_replicas_in_sync < 2 or not hasattr(model, "_symbolic_build"):
        return

    def first_local(v):
        return strategy.experimental_local_results(v)[0] if isinstance(v, tf.distribute.DistributedValues) else v

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(first_local, next(it))
                break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = types.MethodType(_maybe_symbolic_build, model)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        _patch_multiworker_reduce()


_PATCHED = []


def _patch_multiworker_reduce() -> None:
    """Same issue, second failure: each step's logged loss/metrics are reduced across workers with
    ``strategy.reduce("MEAN", v, axis=0)``, which fails on scalars. For MultiWorkerMirroredStrategy
    only, scalars are averaged over all workers with ``axis=None`` (what was meant); every other
    call goes to Keras's own function untouched."""
    if _PATCHED:
        return
    from keras.src.backend.tensorflow import trainer as tf_trainer
    original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    tf_trainer.reduce_per_replica = reduce_per_replica
    _PATCHED.append(original)
