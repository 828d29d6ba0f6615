"""Linear heads trained by gradient descent on *standardised* cached features, folded back into
the head's classifier when the stage ends.

Pooled backbone features are badly scaled for SGD: Lite0's are mostly near zero (mean 0.058, sd
0.32 on brain_mri_yn), a few channels large. A softmax layer trained on them by Adam/SGD crawls
along the small directions: on brain_mri_yn the range test's loss never fell and the trained head
scored the majority rate, while the same layer on standardised features trains (loss 0.78 ->
0.53 in the range test). This is the same conditioning the L-BFGS probe gets from its
``StandardScaler`` (:mod:`.probe`), here for ``head_solver=sgd`` and for caches too large for
L-BFGS.

How: the stage trains a twin of the classifier, ``Normalization(mean, var) -> [Dropout] ->
Dense``, on the raw cached vectors (so the cache, the datasets, validation and TensorBoard see
what they always saw). Before training, the classifier's current weights are carried into the
twin's units (exact); at the end of the stage the twin's weights are folded back into the
classifier (exact: ``x @ (W / s) + (b - (m / s) @ W)``), so the exported model has no extra
layer and later stages start from the folded weights. The recipe's L1/L2 apply to the twin's
weights, in standardised units, as scikit-learn's C does; the model's own classifier carries no
Keras penalty (see :func:`~tuneflow.training.heads.build_head`'s ``classifier_penalty``).
"""
from __future__ import annotations

import numpy as np

from ..features.cache import rows_view, split_views

# Channels whose standard deviation is below this (in the features' own units) are treated as
# constant, as scikit-learn's StandardScaler does with zero variance: scaled by 1, not by 1/0.
MIN_STD = 1e-6
MOMENT_CHUNK = 2048  # rows per read (float64: 21 MB for 1280-d vectors), so the moments add little to a run's peak


def feature_moments(ftr) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation (float64) of cached vectors ``ftr``: (N, C), or
    (V, N, C) with every view counted. A memory-mapped cache is summed in chunks, read with
    ``pread`` (:func:`~tuneflow.features.cache.rows_view`): never whole in RAM. Two passes (mean,
    then squared deviations) for accuracy; near-constant channels get std 1 (:data:`MIN_STD`)."""
    views = split_views(ftr) if np.ndim(ftr) == 3 else [ftr]
    n = sum(len(v) for v in views)
    if n == 0:
        raise ValueError("feature_moments: no cached vectors to standardise")
    srcs = [rows_view(v) for v in views]

    def chunks():
        for src, v in zip(srcs, views):
            for i in range(0, len(v), MOMENT_CHUNK):
                yield np.asarray(src[i:i + MOMENT_CHUNK], np.float64)

    mean = sum(c.sum(0) for c in chunks()) / n
    var = sum(((c - mean) ** 2).sum(0) for c in chunks()) / n
    std = np.sqrt(var)
    std[~(std >= MIN_STD)] = 1.0
    return mean, std


class StandardisedHead:
    """The trainable twin of a linear head's classifier on standardised features.

    ``plain``: the head on cached vectors (:func:`~tuneflow.training.cached.cache_trainer`:
    ``[Dropout] -> Dense(K, softmax)``); ``ftr``: the stage's cached training vectors. Build it
    inside the strategy's scope. :meth:`begin` carries the classifier's weights in (call it after
    any checkpoint restore, before training); :meth:`fold` writes the twin's back."""

    def __init__(self, recipe, plain, ftr):
        import keras
        self.classifier = plain.layers[-1]
        self.mean, self.std = feature_moments(ftr)
        c, k = len(self.mean), int(self.classifier.units)
        reg = keras.regularizers.L1L2(recipe.l1, recipe.l2) if (recipe.l1 or recipe.l2) else None
        L = keras.layers
        self.dense = L.Dense(k, activation="softmax", kernel_regularizer=reg, dtype="float32",
                             name=self.classifier.name)
        self.trainer = keras.Sequential(
            [keras.Input((c,)), L.Normalization(mean=self.mean.astype(np.float32),
                                                variance=(self.std ** 2).astype(np.float32),
                                                dtype="float32", name="head_standardise")]
            + list(plain.layers[:-1]) + [self.dense], name="head_on_standardised_cache")
        self.begin()

    def begin(self) -> None:
        """The classifier's current (raw-unit) weights, in standardised units: z = (x - m) / s,
        so x @ K + b = z @ (K * s) + (b + m @ K)."""
        kernel, bias = (np.asarray(w, np.float64) for w in self.classifier.get_weights())
        self.dense.set_weights([(kernel * self.std[:, None]).astype(np.float32),
                                (bias + self.mean @ kernel).astype(np.float32)])

    def fold(self) -> None:
        """The twin's weights folded into the classifier, for raw features."""
        w, b = (np.asarray(v, np.float64) for v in self.dense.get_weights())
        self.classifier.set_weights([(w / self.std[:, None]).astype(np.float32),
                                     (b - (self.mean / self.std) @ w).astype(np.float32)])


def standardises(recipe) -> bool:
    """Whether a head trained on cached features is trained standardised: linear heads (an mlp
    head's normalisation layer already conditions its classifier; a conv head sees maps)."""
    return recipe.head == "linear"
