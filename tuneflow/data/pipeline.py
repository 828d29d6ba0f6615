"""tf.data pipelines over decoded arrays: shuffled or class-balanced, weighted, augmented, batched, sharded.

The arrays may be memory-mapped stores (:class:`tuneflow.data.store.ImageRows`): batches are
gathered by index, so only the rows of the batches in flight are in memory."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from .augment import make_augmenter
from .sources import Split
from .store import iter_chunks

AUTOTUNE = tf.data.AUTOTUNE


def class_weights(y: np.ndarray, n_classes: int, spec) -> np.ndarray | None:
    """``"balanced"`` (n / (k * count_c), as scikit-learn), ``"none"``, or explicit weights."""
    if spec in (None, "none", False):
        return None
    if spec == "balanced":
        counts = np.bincount(y, minlength=n_classes).astype(np.float64)
        if (counts == 0).any():
            missing = [int(i) for i in np.where(counts == 0)[0]]
            raise ValueError(f"class_weight='balanced' but classes {missing} have no training images.")
        return (len(y) / (n_classes * counts)).astype(np.float32)
    if isinstance(spec, dict):
        w = np.ones(n_classes, np.float32)
        for k, v in spec.items():
            w[int(k)] = float(v)
        return w
    w = np.asarray(spec, np.float32)
    if w.shape != (n_classes,):
        raise ValueError(f"class_weight has {w.size} values for {n_classes} classes.")
    return w


def _epoch_indices(y: np.ndarray, sampling: str, rng: np.random.Generator) -> np.ndarray:
    if sampling == "balanced":  # oversample: each class equally likely, same epoch length
        classes = np.unique(y)
        per = int(np.ceil(len(y) / len(classes)))
        idx = np.concatenate([rng.choice(np.where(y == c)[0], per, replace=True) for c in classes])
        return rng.permutation(idx)[:len(y)]
    return rng.permutation(len(y))


def train_dataset(split: Split, batch_size: int, *, augment="none", backend: str = "keras",
                  sampling: str = "shuffle", weights: np.ndarray | None = None, seed: int = 0,
                  repeat: bool = False, whole_batches: bool = False,
                  shard: tuple[int, int] | None = None) -> tf.data.Dataset:
    """Batches of ``(images float32 0..255, labels[, sample_weight])`` for training.

    Indices are drawn per epoch in NumPy (shuffled or class-balanced), batches are
    gathered from the in-memory array, then augmented in parallel. ``whole_batches`` pads each
    epoch with a few random repeats so every batch is full: with several replicas, a short last
    batch would leave a replica an empty slice (oneDNN's BatchNorm fails on those). Sample weights are
    attached per example, so class weights reach the loss whatever Keras path consumes it.

    ``shard=(num_workers, index)``: this worker's share of each epoch. Every worker draws the same
    epoch order (same ``seed``) and keeps every ``num_workers``-th index from ``index`` on, so each
    index is read by exactly one worker per epoch. Every worker runs the same number of batches
    (collective ops need it): a share one shorter than the others gets one random repeat when that
    would otherwise cost it a batch. With several workers, tf.distribute's own auto-sharding is
    turned off for this dataset (it would otherwise read every file on every worker and drop the
    others' share); each worker's batches are split among the replicas by tf.distribute as usual.
    """
    if sampling not in ("shuffle", "balanced"):
        raise ValueError(f"sampling={sampling!r}: choose 'shuffle' or 'balanced'.")
    workers, index = shard if shard is not None else (1, 0)
    if not (isinstance(workers, (int, np.integer)) and workers >= 1 and 0 <= index < workers):
        raise ValueError(f"shard={shard!r}: expected (num_workers >= 1, index in 0..num_workers-1).")
    x, y = split.x, split.y
    rng = np.random.default_rng(seed)
    n_batches = int(np.ceil(int(np.ceil(len(y) / workers)) / batch_size))

    def batches():
        epoch = 0
        while True:
            idx = _epoch_indices(y, sampling, rng)
            if workers > 1:
                idx = idx[index::workers]
                want = n_batches * batch_size if whole_batches else (n_batches - 1) * batch_size + 1
                if len(idx) < want:  # own generator: every worker's epoch order stays the same
                    pad = np.random.default_rng([seed, epoch, index]).choice(len(y), want - len(idx))
                    idx = np.concatenate([idx, pad])
            else:
                short = (-len(idx)) % batch_size
                if whole_batches and short:
                    idx = np.concatenate([idx, rng.choice(len(y), short, replace=len(y) < short)])
            for b in range(n_batches):
                yield idx[b * batch_size:(b + 1) * batch_size]
            epoch += 1
            if not repeat:
                return

    ds = tf.data.Dataset.from_generator(batches, output_signature=tf.TensorSpec([None], tf.int64))
    s = x.shape[1]

    def gather(idx):
        imgs = tf.numpy_function(lambda i: x[i], [idx], tf.uint8, stateful=False)
        imgs.set_shape([None, s, s, 3])
        labels = tf.gather(tf.constant(y), idx)
        return imgs, labels

    ds = ds.map(gather, num_parallel_calls=AUTOTUNE)
    fn = make_augmenter(augment, backend, s, seed)
    if fn is not None:
        ds = ds.map(lambda a, b: (fn(a), b), num_parallel_calls=AUTOTUNE)
    else:
        ds = ds.map(lambda a, b: (tf.cast(a, tf.float32), b))
    if weights is not None:
        w = tf.constant(weights)
        ds = ds.map(lambda a, b: (a, b, tf.gather(w, b)))
    if not repeat:
        ds = ds.apply(tf.data.experimental.assert_cardinality(n_batches))
    if workers > 1:  # the share is ours: tf.distribute must not shard it again
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        ds = ds.with_options(options)
    return ds.prefetch(AUTOTUNE)


def eval_dataset(split: Split, batch_size: int) -> tf.data.Dataset:
    """Un-augmented, ordered batches of ``(images, labels)``, read a batch at a time (never the
    whole split as one tensor)."""
    x, y = split.x, split.y

    def batches():
        for i, chunk in enumerate(iter_chunks(x, batch_size)):
            yield chunk, y[i * batch_size:i * batch_size + len(chunk)]

    s = tuple(x.shape[1:])
    sig = (tf.TensorSpec((None,) + s, tf.uint8), tf.TensorSpec([None], tf.as_dtype(y.dtype)))
    ds = tf.data.Dataset.from_generator(batches, output_signature=sig)
    ds = ds.apply(tf.data.experimental.assert_cardinality(int(np.ceil(len(y) / batch_size))))
    return ds.map(lambda a, b: (tf.cast(a, tf.float32), b)).prefetch(AUTOTUNE)
