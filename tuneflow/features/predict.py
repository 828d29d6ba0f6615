"""Forward passes of a Keras model over arrays, batch by batch, correct under every strategy
(the TensorFlow engine of :mod:`tuneflow.features.infer`, and training's validation passes)."""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf


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
