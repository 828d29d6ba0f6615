"""Linear probes that converge: standardised multinomial logistic regression (L-BFGS) on feature
vectors, its L2 strength chosen by stratified k-fold on the training set alone.

Why scikit-learn's ``LogisticRegression(solver="lbfgs")`` and not a Keras ``Dense`` trained with
Adam for a fixed number of epochs: the probe's loss is convex, so a quasi-Newton solver reaches
its optimum deterministically in well under a second for thousands of vectors, with no learning
rate, epoch count or batch order to get wrong (the Adam probes this replaces stopped far from the
optimum on brain_mri_yn and scored the majority rate). scikit-learn's implementation is the
reference one (multinomial softmax loss, sample weights, warm starts along the C path); a
hand-written ``scipy.optimize`` loop would only re-derive it.

Standardising first (mean/std from the training vectors) makes one C grid fit every backbone and
depth (pooled activations range from 1e-3 to 1e1) and conditions L-BFGS; the standardisation is
folded back into the weights by :meth:`LinearProbe.dense_weights`, so the probe drops into a
Keras ``Dense(K, softmax)`` on the raw features and the saved model needs no extra layer.

    >>> probe = fit_probe(f_train, y_train, sample_weight=w)           # doctest: +SKIP
    >>> probe.score(f_val, y_val), probe.chosen_C                       # doctest: +SKIP
    >>> probe.write_into(model.get_layer("head_classifier"))            # doctest: +SKIP
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from tuneflow.errors import DataError, RunError

# Inverse L2 strengths tried, on standardised features: half-decade steps from "nearly the class
# prior" (1e-3) to "nearly unregularised" (10). On Lite0 features the chosen C lies in 1e-2..1
# (benchmarks/bench_probe.py --probe); the ends are there so a choice at the edge is visible.
DEFAULT_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
FOLDS = 5  # inner stratified folds (fewer when the rarest class has fewer training vectors)
LARGE = 2000  # above this many training vectors, 3 folds: the choice is stable, fits cost more
MAX_ITER = 2000  # L-BFGS iterations; standardised probes converge in tens to a few hundred
TOL = 1e-6  # L-BFGS gradient tolerance (scikit-learn's default 1e-4 stops early at large C)


@dataclass
class LinearProbe:
    """A fitted probe: ``predict_proba`` on raw features, and the weights for a Keras ``Dense``."""

    model: object  # the fitted sklearn LogisticRegression (on standardised features)
    scaler: object  # the fitted sklearn StandardScaler (training mean and std)
    n_classes: int
    chosen_C: float
    # C -> {"log_loss", "accuracy"}: mean over the inner folds (held-out, sample-weighted)
    inner_scores: dict = field(default_factory=dict)
    folds: int = 0  # inner folds used; 0 when the data were too small to choose C
    n_iter: int = 0  # L-BFGS iterations of the final fit
    converged: bool = True
    seconds: float = 0.0  # wall time of the whole fit, inner folds included

    @property
    def inner_accuracy(self) -> float | None:
        """Held-out accuracy of the chosen C on the inner folds: a train-only estimate, for
        choosing between probes (depths, backbones) without looking at the validation set."""
        s = self.inner_scores.get(self.chosen_C)
        return None if s is None else s["accuracy"]

    def predict_proba(self, x) -> np.ndarray:
        """Class probabilities, shape (n, n_classes), for raw (unstandardised) features."""
        return self.model.predict_proba(self.scaler.transform(_as_2d(x)))

    def predict(self, x) -> np.ndarray:
        return self.predict_proba(x).argmax(1)

    def score(self, x, y) -> float:
        """Accuracy on ``(x, y)``."""
        return float(np.mean(self.predict(x) == np.asarray(y)))

    def dense_weights(self, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """``(kernel (d, K), bias (K,))`` for ``Dense(K, activation="softmax")`` on raw features.

        With z = (x - mean) / std and logits z @ W + b: x @ (W / std[:, None]) + (b - (mean / std) @ W).
        A binary scikit-learn model has one logit w (p(class 1) = sigmoid(x @ w + c)); the softmax
        of [-(x @ w + c) / 2, (x @ w + c) / 2] is the same probability.
        """
        w = self.model.coef_.T.astype(np.float64)  # (d, K) or (d, 1)
        b = self.model.intercept_.astype(np.float64)
        if w.shape[1] == 1:
            w = np.concatenate([-w / 2, w / 2], axis=1)
            b = np.concatenate([-b / 2, b / 2])
        mean, std = self.scaler.mean_, self.scaler.scale_
        kernel = w / std[:, None]
        bias = b - (mean / std) @ w
        return kernel.astype(dtype), bias.astype(dtype)

    def write_into(self, layer) -> None:
        """Set a Keras ``Dense(K, softmax)`` layer's kernel and bias to this probe's.

        The layer must take the probe's features directly (no layer between them that changes
        the vectors at inference, such as a normalisation); ``Dropout`` is fine.
        """
        kernel, bias = self.dense_weights()
        want = [tuple(kernel.shape), tuple(bias.shape)]
        got = [tuple(w.shape) for w in layer.get_weights()]
        if got != want:
            raise RunError(f"Cannot write a probe with kernel {want[0]} and bias {want[1]} into layer "
                           f"{layer.name!r} with weights {got}: the layer must be a Dense with a bias, "
                           f"{kernel.shape[1]} units, on {kernel.shape[0]}-dimensional features.")
        activation = getattr(getattr(layer, "activation", None), "__name__", None)
        if activation != "softmax":
            raise RunError(f"Layer {layer.name!r} has activation {activation!r}; a probe's weights "
                           "give probabilities only through a softmax.")
        layer.set_weights([kernel, bias])


def grid_between(low: float, high: float) -> tuple[float, ...]:
    """C values from ``low`` to ``high`` (both kept exactly) at half-decade steps, the steps
    between rounded to one significant digit as in :data:`DEFAULT_GRID` (a recipe's ``head_c_range``).

    >>> grid_between(1e-3, 10.0) == DEFAULT_GRID
    True
    """
    inner = [float(f"{low * 10 ** (i / 2):.0e}") for i in range(1, math.ceil(2 * math.log10(high / low)))]
    return tuple(sorted({low, *(c for c in inner if low < c < high), high}))


def fit_probe(x_train, y_train, *, sample_weight=None, n_classes: int | None = None, seed: int = 0,
              grid=DEFAULT_GRID, folds: int | None = None, select: str = "accuracy") -> LinearProbe:
    """Fit a probe on ``x_train`` (n, d) float features and integer labels ``y_train`` (n,).

    C is chosen from ``grid`` by the mean held-out accuracy over ``folds`` stratified folds of
    the training data (default 5; 3 above 2000 vectors), ties to the lower held-out log-loss
    (``select="log_loss"``: by log-loss alone). Held-out scores are sample-weighted when
    ``sample_weight`` is given, so class weights shape both the fit and the choice. Then the
    probe is refit on all of ``x_train`` with that C. Deterministic for a given ``seed``.
    Accuracy is the default because it is what the probe is for: on Lite0 features log-loss
    picks smaller C (it punishes the confident mistakes of a near-separable fit) and scored up
    to 7 points lower over repeated splits of brain_mri_yn (benchmarks/bench_probe.py --probe).
    With fewer than 2 training vectors in some class no folds are possible: the middle of the
    grid is used and ``folds == 0``.

    ``sample_weight``: per-vector weights (n,), e.g. ``class_weights(...)[y_train]``.
    ``n_classes``: the number of classes (default ``max(y_train) + 1``); every class must have
    a training vector.
    """
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    if select not in ("accuracy", "log_loss"):
        raise DataError(f"fit_probe: select={select!r}; choose 'accuracy' or 'log_loss'.")
    t0 = time.time()
    x = _as_2d(x_train).astype(np.float64)
    y = np.asarray(y_train).astype(np.int64).ravel()
    if len(x) != len(y):
        raise DataError(f"fit_probe: {len(x)} feature vectors but {len(y)} labels; pass one label per vector.")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(1).sum())
        raise DataError(f"fit_probe: {bad} of {len(x)} feature vectors contain NaN or Inf; "
                        "the backbone's features are broken (check the weights and the input pixels).")
    k = int(n_classes) if n_classes is not None else int(y.max()) + 1
    counts = np.bincount(y, minlength=k)
    if len(counts) > k or (counts == 0).any():
        missing = [int(i) for i in np.where(counts == 0)[0]]
        raise DataError(f"fit_probe: labels must be 0..{k - 1} and each class needs a training vector; "
                        f"classes without one: {missing}, label range {int(y.min())}..{int(y.max())}.")
    if k < 2:
        raise DataError("fit_probe: a probe needs at least 2 classes; the training labels have 1.")
    w = None if sample_weight is None else np.asarray(sample_weight, np.float64).ravel()
    if w is not None and (len(w) != len(y) or not np.isfinite(w).all() or (w < 0).any()):
        raise DataError(f"fit_probe: sample_weight must be {len(y)} finite non-negative numbers; "
                        f"got {len(w)} values, min {np.nanmin(w) if len(w) else 'n/a'}.")
    grid = tuple(sorted(float(c) for c in grid))
    if not grid or min(grid) <= 0:
        raise DataError(f"fit_probe: grid {grid} must hold positive C values (inverse L2 strengths).")

    if folds is None:
        folds = FOLDS if len(y) <= LARGE else 3
    n_folds = min(int(folds), int(counts.min()))
    scores: dict[float, dict] = {}
    if n_folds >= 2 and len(grid) > 1:
        # One BLAS thread: these products are small, and on a shared 2-core machine OpenBLAS's
        # threads contending for cores made each fit 7-10x slower (0.15 s -> 0.02 s, 240 x 200).
        with threadpool_limits(1, user_api="blas"):
            scores = _inner_path(x, y, w, k, grid, n_folds, seed)
        if select == "accuracy":  # ties (common on small folds) go to the lower log-loss
            chosen = min(grid, key=lambda c: (-round(scores[c]["accuracy"], 12), scores[c]["log_loss"], c))
        else:
            chosen = min(grid, key=lambda c: (round(scores[c]["log_loss"], 12), c))
    else:
        n_folds = 0
        chosen = grid[len(grid) // 2]
    scaler = StandardScaler().fit(x)
    with threadpool_limits(1, user_api="blas"):
        model = _fit(scaler.transform(x), y, w, chosen, seed)
    n_iter = int(np.max(model.n_iter_))
    return LinearProbe(model=model, scaler=scaler, n_classes=k, chosen_C=chosen, inner_scores=scores,
                       folds=n_folds, n_iter=n_iter, converged=n_iter < MAX_ITER,
                       seconds=round(time.time() - t0, 3))


def _inner_path(x, y, w, k, grid, n_folds, seed) -> dict[float, dict]:
    """Held-out log-loss and accuracy of every C, averaged over stratified folds."""
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    totals = {c: {"log_loss": 0.0, "accuracy": 0.0} for c in grid}
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for tr, te in splitter.split(x, y):
        scaler = StandardScaler().fit(x[tr])  # the fold's own statistics: nothing leaks from te
        xtr, xte = scaler.transform(x[tr]), scaler.transform(x[te])
        wtr = None if w is None else w[tr]
        wte = None if w is None else w[te]
        model = None
        for c in grid:  # small C first: each fit starts from the previous, smoother optimum
            model = _fit(xtr, y[tr], wtr, c, seed, warm=model)
            p = _full_proba(model, xte, k)
            totals[c]["log_loss"] += log_loss(y[te], p, sample_weight=wte, labels=list(range(k)))
            hit = (p.argmax(1) == y[te]).astype(np.float64)
            totals[c]["accuracy"] += float(np.average(hit, weights=wte))
    return {c: {m: v / n_folds for m, v in s.items()} for c, s in totals.items()}


def _fit(x, y, w, C, seed, warm=None):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = warm if warm is not None else LogisticRegression(
        solver="lbfgs", max_iter=MAX_ITER, tol=TOL, random_state=seed, warm_start=True)
    model.set_params(C=C)
    with warnings.catch_warnings():
        # Non-convergence is recorded on the probe (``converged``), not printed once per fold.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y, sample_weight=w)
    return model


def _full_proba(model, x, k) -> np.ndarray:
    """Probabilities over all k classes, even when a fold's training part lacked some."""
    p = model.predict_proba(x)
    if p.shape[1] == k:
        return p
    full = np.full((len(x), k), 1e-12)
    full[:, model.classes_] = p
    return full / full.sum(1, keepdims=True)


def _as_2d(x) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise DataError(f"A probe takes feature vectors of shape (n, d); got shape {x.shape}. "
                        "Pool feature maps first (GlobalAveragePooling2D).")
    return x
