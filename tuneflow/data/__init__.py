"""Data in (folders, TFDS, arrays), checked and split; augmented batches out."""
from __future__ import annotations

import numpy as np

from ..errors import DataError
from .pack import is_packed, load_packed
from .sources import (IMAGE_EXTENSIONS, RESIZE_MODES, DataBundle, Split, check_bundle, check_resize, decode_image,
                      find_leaks, hash_split, load_arrays, load_folder, split_fraction, stratified_pick, to_rgb8,
                      to_square)
from .store import ImageRows, concat_rows

__all__ = ["IMAGE_EXTENSIONS", "RESIZE_MODES", "DataBundle", "DataError", "ImageRows", "Split", "check_bundle",
           "decode_image",
           "find_leaks",
           "hash_split", "kfold", "to_rgb8", "to_square", "load_data", "split_fraction", "subsample"]


def load_data(data, size: int, val_fraction: float = 0.2, fraction: float = 1.0,
              classes: tuple[str, ...] | list[str] | None = None, seed: int = 0,
              resize: str = "crop") -> DataBundle:
    """Load any supported source at ``size`` pixels, then subsample if asked.

    ``data``: a folder path, a folder of TFRecord shards written by ``tuneflow pack``,
    ``"tfds:NAME[:SPLIT]"``, ``(x, y)`` arrays or a dict of them. Folders and shards are
    subsampled (``classes``, ``fraction``) before decoding, so only the images kept are read.
    ``resize``: ``"crop"`` (shorter side to ``size``, centre square) or ``"squash"``.
    ``classes``: train on these classes only; the others are never read, so a broken class
    can be left out.
    """
    check_resize(resize)
    if not 0 < fraction <= 1:
        raise DataError(f"fraction={fraction} must be in (0, 1]: it is the share of images kept.")
    if isinstance(data, (tuple, list, dict)) and not isinstance(data, str):
        bundle = load_arrays(data, size, val_fraction, resize=resize, keep=classes)
    elif str(data).startswith("tfds:"):
        from .tfds_source import load_tfds  # lazy: tensorflow_datasets is the optional [tfds] extra
        bundle = load_tfds(str(data), size, val_fraction, resize, keep=classes)
    else:
        if is_packed(data):
            return load_packed(data, size, val_fraction, resize, classes=classes, fraction=fraction, seed=seed)
        return load_folder(data, size, val_fraction, resize, classes=classes, fraction=fraction, seed=seed)
    return subsample(bundle, fraction, None, seed)


def subsample(bundle: DataBundle, fraction: float = 1.0, classes=None, seed: int = 0) -> DataBundle:
    """Keep a stratified ``fraction`` of each split and/or a subset of the classes (fast tuning)."""
    if classes:
        unknown = sorted(set(classes) - set(bundle.classes))
        if unknown:
            raise DataError(f"classes {unknown} are not in the data; it has {', '.join(bundle.classes)}.")
        if len(set(classes)) < 2:
            raise DataError("A class subset needs at least two classes.")
        keep = [bundle.classes.index(c) for c in bundle.classes if c in set(classes)]
        remap = {old: new for new, old in enumerate(keep)}
        for name in ("train", "val", "test"):
            s = getattr(bundle, name)
            if s is None:
                continue
            idx = np.where(np.isin(s.y, keep))[0]
            s = s.take(idx)
            s.y = np.asarray([remap[int(v)] for v in s.y], np.int32)
            setattr(bundle, name, s)
        bundle.classes = [bundle.classes[i] for i in keep]
    if fraction < 1:
        rng = np.random.default_rng(seed)
        for name in ("train", "val"):
            s = getattr(bundle, name)
            setattr(bundle, name, s.take(stratified_pick(s.y, len(bundle.classes), fraction, rng)))
    return bundle


def kfold(bundle: DataBundle, k: int, seed: int = 0):
    """Yield ``k`` bundles whose val splits partition train+val, stratified by class."""
    if k < 2:
        raise DataError(f"folds={k}: K-fold cross-validation needs at least 2 folds.")
    from sklearn.model_selection import StratifiedKFold
    x = concat_rows([bundle.train.x, bundle.val.x])  # a view when both are rows of one store
    y = np.concatenate([bundle.train.y, bundle.val.y])
    files = bundle.train.files + bundle.val.files
    pool = Split(x, y, files if len(files) == len(y) else [])
    smallest = int(np.bincount(y).min())
    if smallest < k:
        raise DataError(f"folds={k} but the smallest class has only {smallest} images; use folds<={smallest}.")
    for tr, va in StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y):
        yield DataBundle(bundle.classes, pool.take(tr), pool.take(va), bundle.test, bundle.source,
                         bundle.skipped, [], bundle.ignored)
