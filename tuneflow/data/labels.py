"""Labels given with NumPy data: integer class indices, class-name strings or one-hot rows -> indices + names."""
from __future__ import annotations

import numpy as np

from ..errors import DataError


def _classes_of(y: np.ndarray):
    """(kind, classes): 'onehot' with K, 'names' with the sorted names, or 'index' with K."""
    if y.ndim == 2 and y.shape[1] > 1:
        if not np.all((y == 0) | (y == 1)) or not np.all(y.sum(1) == 1):
            raise DataError(f"2-D labels of shape {y.shape} must be one-hot rows (a single 1 per row); "
                            "pass class indices, class names or one-hot rows.")
        return "onehot", [str(i) for i in range(y.shape[1])]
    flat = y.reshape(-1)
    if flat.dtype.kind in ("U", "S", "O"):
        names = [str(v.decode() if isinstance(v, bytes) else v) for v in flat]
        return "names", sorted(set(names))
    if flat.dtype.kind == "f":
        if not np.all(np.isfinite(flat)) or not np.all(flat == np.round(flat)):
            raise DataError("Float labels must be whole class indices (0, 1, 2, ...); got non-integer values.")
    if flat.dtype.kind not in ("i", "u", "f", "b"):
        raise DataError(f"Labels of dtype {flat.dtype} are not understood; pass ints, strings or one-hot rows.")
    if len(flat) and flat.min() < 0:
        raise DataError(f"Class indices must be >= 0; got {int(flat.min())}.")
    return "index", [str(i) for i in range(int(flat.max()) + 1 if len(flat) else 0)]


def _encode(y: np.ndarray, kind: str, classes: list[str]) -> np.ndarray:
    if kind == "onehot":
        return y.argmax(1).astype(np.int32)
    if kind == "names":
        index = {c: i for i, c in enumerate(classes)}
        flat = y.reshape(-1)
        names = [str(v.decode() if isinstance(v, bytes) else v) for v in flat]
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise DataError(f"Labels {unknown[:5]} in one split are not among the training classes {classes}.")
        return np.asarray([index[n] for n in names], np.int32)
    return y.reshape(-1).astype(np.int32)


def normalize_array_data(data):
    """``(x, y)`` or ``{"train": (x, y), "val": ..., "test": ...}`` with any label form ->
    (the same with int32 labels, class names). One-hot rows become their argmax; names are sorted
    (the class index is the name's position); with integer labels, classes are "0".."K-1"."""
    parts = data if isinstance(data, dict) else {"train": tuple(data)}
    if "train" not in parts:
        raise DataError("Array data as a dict needs a 'train' entry: {'train': (x, y), 'val': (x, y)}.")
    for k, v in parts.items():
        if not isinstance(v, (tuple, list)) or len(v) != 2:
            raise DataError(f"Array data {k!r} must be a pair (x, y); got {type(v).__name__}.")
    ys = {k: np.asarray(v[1]) for k, v in parts.items()}
    kinds = {k: _classes_of(y) for k, y in ys.items()}
    kind, _ = kinds["train"]
    if any(kd != kind for kd, _ in kinds.values()):
        raise DataError(f"Every split's labels must have the same form; got {({k: kd for k, (kd, _) in kinds.items()})}.")
    if kind == "names":
        classes = sorted(set().union(*[set(c) for _, c in kinds.values()]))
    else:
        classes = max((c for _, c in kinds.values()), key=len)
    out = {k: (np.asarray(parts[k][0]), _encode(ys[k], kind, classes)) for k in parts}
    return (out if isinstance(data, dict) else out["train"]), classes
