"""Data sources: class folders, TensorFlow Datasets and NumPy arrays, decoded once to uint8 arrays.

Every source ends as a :class:`DataBundle`: RGB uint8 arrays at the model's input
size for train / val (/ test), class names, and what was skipped or suspicious.
Decoding happens once, up front, in parallel, with a progress bar: a corrupt file
is found and skipped before training starts, never in the middle of an epoch.
Splitting, class subsets and ``fraction`` work on file lists, before anything is decoded;
large datasets are decoded into a memory-mapped store (:mod:`tuneflow.data.store`), so a
split's ``x`` may be an :class:`~tuneflow.data.store.ImageRows` view rather than an array.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from ..imageops import RESIZE_MODES, decode_pixels, resize_image, to_rgb8
from .store import ImageRows, decode_rows, file_entries, iter_chunks, source_key

log = logging.getLogger("tuneflow.data")

SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation"),
               "test": ("test", "testing")}  # matched case-insensitively: Training/ is a split


def _pil_extensions() -> tuple[str, ...]:
    """Every file extension PIL has a reader for (stub formats such as .h5, which PIL only
    recognises and cannot decode, left out)."""
    from PIL import ImageFile
    Image.init()  # registers every plugin, not only the few imported so far
    exts = []
    for ext, fmt in Image.registered_extensions().items():
        opener = Image.OPEN.get(fmt)
        factory = opener[0] if opener else None
        if factory is None or (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)):
            continue
        exts.append(ext.lower())
    return tuple(sorted(set(exts)))


IMAGE_EXTENSIONS = _pil_extensions()  # .jpg .png .webp .tif .ppm .jfif ... as this PIL reads them


@dataclass
class Split:
    x: np.ndarray  # (N, S, S, 3) uint8 RGB: an array, or an ImageRows view of a memory-mapped store
    y: np.ndarray  # (N,) int32 class indices
    files: list[str] = field(default_factory=list)  # source of each row ('' for arrays)

    def __len__(self):
        return len(self.y)

    def take(self, idx) -> "Split":
        idx = np.asarray(idx, dtype=np.int64)
        x = self.x.take(idx) if isinstance(self.x, ImageRows) else self.x[idx]  # a view: no pixels read
        return Split(x, self.y[idx], [self.files[i] for i in idx] if self.files else [])


@dataclass
class DataBundle:
    classes: list[str]
    train: Split
    val: Split
    test: Split | None = None
    source: str = ""
    skipped: list[str] = field(default_factory=list)  # files (and symlink loops) not used, each with the reason
    leaks: list[tuple[str, str, str]] = field(default_factory=list)  # (train, val, kind)
    ignored: list[str] = field(default_factory=list)  # files whose extension PIL does not read (never tried)

    def counts(self, split: str = "train") -> dict[str, int]:
        s = getattr(self, split)
        return {c: int(np.sum(s.y == i)) for i, c in enumerate(self.classes)}

    def fingerprint(self) -> str:
        """Changes whenever any pixel, label or split changes (keys the feature cache)."""
        h = hashlib.sha256()
        for name in ("train", "val"):
            s = getattr(self, name)
            h.update(name.encode())
            for chunk in iter_chunks(s.x):  # same digest as the whole array at once, bounded memory
                h.update(np.ascontiguousarray(chunk).data)
            h.update(s.y.astype(np.int32).tobytes())
        h.update("\n".join(self.classes).encode())
        return h.hexdigest()[:16]


def split_fraction(key: str) -> float:
    """A stable number in [0, 1) from a file's class-relative name: adding files never moves others."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) / 0x100000000


@dataclass
class _Scan:
    """What walking the folders found besides images: loops not followed, files never tried."""
    skipped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _images_under(top: Path, scan: _Scan) -> list[Path]:
    """Image files under ``top``, following directory symlinks, except a link to the folder it sits
    in or one of its ancestors (a symlink loop) and a second link to a folder already read: each
    of those is noted in ``scan.skipped`` and not followed."""
    seen: set[str] = set()
    found = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        here = os.path.realpath(dirpath)
        seen.add(here)
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            target = os.path.realpath(os.path.join(dirpath, d))
            if here == target or here.startswith(target + os.sep):
                scan.skipped.append(f"{os.path.join(dirpath, d)} (symlink loop: it points to {target}, "
                                    "which contains it; not followed)")
            elif target in seen:
                scan.skipped.append(f"{os.path.join(dirpath, d)} (symlink to {target}, a folder already "
                                    "read; not followed again)")
            else:
                seen.add(target)
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if name.startswith("."):  # .DS_Store, macOS ._IMG.jpg resource forks
                continue
            p = Path(dirpath) / name
            (found if p.suffix.lower() in IMAGE_EXTENSIONS else scan.ignored).append(p)
    return found


def _class_dirs(root: Path, scan: _Scan) -> dict[str, list[Path]]:
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out[d.name] = _images_under(d, scan)
    return out


def check_resize(resize: str) -> None:
    if resize not in RESIZE_MODES:
        raise DataError(f"resize={resize!r} is not a resize mode; choose one of {', '.join(RESIZE_MODES)}.")


def to_square(im: Image.Image, size: int, resize: str = "crop") -> Image.Image:
    """A PIL image as RGB size x size, through the model's own resize (:mod:`tuneflow.imageops`)."""
    return Image.fromarray(resize_image(to_rgb8(im), size, resize))


def decode_image(path: str | Path, size: int, resize: str = "crop") -> np.ndarray:
    """Decode any file PIL reads to (size, size, 3) uint8 RGB, EXIF orientation applied: the model's
    own decoder (:func:`tuneflow.imageops.decode_pixels`) and resize, so training sees exactly the
    pixels the exported model computes from the same file."""
    return resize_image(decode_pixels(path, size=size), size, resize)


def _decode_all(files: list[Path], size: int, desc: str, resize: str = "crop"):
    """(x, ok, skipped) for ``files``: in RAM when small, else a memory-mapped store keyed by the
    files' names, sizes and mtimes (:func:`tuneflow.data.store.decode_rows`)."""
    key = source_key(file_entries(files), size, resize, "files")
    return decode_rows(files, [str(f) for f in files], size, resize,
                       lambda f: decode_image(f, size, resize), desc, key)


def stratified_pick(y: np.ndarray, n_classes: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices keeping ``fraction`` of each class (at least 1 of a class that has any)."""
    idx = []
    for c in range(n_classes):
        members = np.where(y == c)[0]
        n = max(1, int(round(len(members) * fraction))) if len(members) else 0
        idx.extend(rng.choice(members, n, replace=False))
    return np.sort(np.asarray(idx, np.int64))


def _class_keys(files, labels, names) -> list[str]:
    """Class-relative names, the input of the hash split (``cat/img001.jpg``)."""
    return [f"{names[c]}/{Path(f).name}" for f, c in zip(files, labels)]


def assemble(names: list[str], parts: dict[str, tuple[list[str], np.ndarray]], decode_split, *,
             val_fraction: float, fraction: float, seed: int, pool_where, split_where: dict, skipped: list[str]):
    """Split, subsample and decode file lists into (train, val, test) :class:`Split` s.

    ``parts``: per split, (class-relative keys, labels) in file order; ``decode_split(selected)``
    decodes the chosen rows of every split at once (``selected``: split -> sorted row indices)
    and returns (x, ok, files, skipped) over their concatenation. ``fraction`` < 1 picks files
    before decoding, exactly as :func:`tuneflow.data.subsample` picks rows after it: per class of
    the train then the val split, with ``default_rng(seed)``.
    """
    selected = {k: np.arange(len(v[1])) for k, v in parts.items()}
    if fraction < 1:
        rng = np.random.default_rng(seed)
        if "val" not in parts:
            keys, y = parts["train"]
            tr, va = hash_split(keys, y, val_fraction)  # as the split after decoding will be
            pick = [tr[stratified_pick(y[tr], len(names), fraction, rng)],
                    va[stratified_pick(y[va], len(names), fraction, rng)]]
            selected["train"] = np.sort(np.concatenate(pick))
        else:
            for k in ("train", "val"):
                selected[k] = stratified_pick(parts[k][1], len(names), fraction, rng)
    x, ok, files, sk = decode_split(selected)
    skipped = skipped + sk
    out, lo = {}, 0
    for k in parts:
        n = len(selected[k])
        rows = lo + np.where(ok[lo:lo + n])[0]
        y = parts[k][1][selected[k]][ok[lo:lo + n]]
        xs = x.take(rows) if isinstance(x, ImageRows) else (x[lo:lo + n] if ok[lo:lo + n].all() else x[rows])
        out[k] = Split(xs, np.asarray(y, np.int32), [files[i] for i in rows])
        lo += n
    if "val" not in out:  # split after decoding, so unreadable files cannot empty a class's val
        _require_images(names, out["train"].y, 2, pool_where, skipped,
                        f"1 to train on and 1 to validate on, since tuneflow holds out "
                        f"val_fraction={val_fraction} of each class")
        keys = _class_keys(out["train"].files, out["train"].y, names)
        tr, va = hash_split(keys, out["train"].y, val_fraction)
        out["train"], out["val"] = out["train"].take(tr), out["train"].take(va)
    else:
        _require_images(names, out["train"].y, 1, split_where["train"], skipped, "to train on")
        _require_images(names, out["val"].y, 1, split_where["val"], skipped,
                        "to validate on, or its accuracy is never measured")
    return out, skipped


def _find_splits(root: Path) -> dict[str, Path]:
    """train/val/test folders of ``root``, names matched case-insensitively (``Training/``)."""
    by_name = {n: split for split, names in SPLIT_NAMES.items() for n in names}
    found: dict[str, list[Path]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        split = by_name.get(d.name.lower())
        if split:
            found.setdefault(split, []).append(d)
    for split, dirs in found.items():
        if len(dirs) > 1:
            raise DataError(f"{root} has {len(dirs)} {split} folders ({', '.join(d.name for d in dirs)}); "
                            "keep one, or merge them.")
    return {k: v[0] for k, v in found.items()}


def scan_folder(root, classes=None):
    """Walk a data folder without decoding anything: (root, class names, split folders, where the
    pool is, what was skipped or ignored, split -> (files, labels)); ``classes`` keeps only those."""
    root = Path(root).expanduser()  # "~/photos" quoted by a shell or make stays unexpanded
    if not root.exists():
        raise DataError(f"Data folder {root} does not exist. Pass a folder of class folders "
                        "(root/<class>/*.jpg, optionally under train/ and val/) or tfds:NAME.")
    if not root.is_dir():
        raise DataError(f"--data {root} is a file; pass a folder of class folders or tfds:NAME.")
    splits = _find_splits(root)
    scan = _Scan()
    if splits:
        if "train" not in splits:
            raise DataError(f"{root} has {', '.join(d.name for d in splits.values())} folders but no "
                            "train/ (or training/) folder.")
        others = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                        and p not in splits.values())
        if others:
            log.warning("%s has split folders; ignoring the other folders in it: %s", root, ", ".join(others))
        named = {k: _class_dirs(v, scan) for k, v in splits.items()}
        names = _check_classes(_keep(named["train"], classes, splits["train"]), splits["train"])
        for other in ("val", "test"):
            if other in named:
                extra = sorted(set(c for c, f in named[other].items() if f) - set(names)
                               - (set(named["train"]) - set(names)))
                if extra:
                    raise DataError(
                        f"Classes {extra} appear in {splits[other]} but have no training images "
                        f"in {splits['train']}; the model could never predict them. Add training "
                        "images or remove those folders.")
        pool_where = splits["train"]
    else:
        named = {"train": _class_dirs(root, scan)}
        names = _check_classes(_keep(named["train"], classes, root), root)
        pool_where = root
    lists = {}
    for k in ("train", "val", "test"):
        if k in named:
            files = [f for c in names for f in named[k].get(c, [])]
            labels = np.asarray([ci for ci, c in enumerate(names) for _ in named[k].get(c, [])], np.int32)
            lists[k] = (files, labels)
    return root, names, splits, pool_where, scan, lists


def load_folder(root: str | Path, size: int, val_fraction: float = 0.2, resize: str = "crop",
                classes=None, fraction: float = 1.0, seed: int = 0) -> DataBundle:
    """Class folders (optionally under train/ val/ test/) decoded to a bundle; ``classes``
    keeps only those class folders (nothing else is read or checked); ``fraction`` keeps that
    share of each class of train and val, chosen before decoding (see :func:`assemble`)."""
    check_resize(resize)
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must be in (0, 1).")
    root, names, splits, pool_where, scan, lists = scan_folder(root, classes)

    def decode_split(selected):
        files = [f for k, (fl, _) in lists.items() for f in np.asarray(fl, object)[selected[k]]]
        x, ok, sk = _decode_all(files, size, "decode", resize)
        return x, ok, [str(f) for f in files], sk

    parts, skipped = assemble(names, {k: (_class_keys(fl, y, names), y) for k, (fl, y) in lists.items()},
                              decode_split, val_fraction=val_fraction, fraction=fraction, seed=seed,
                              pool_where=pool_where, split_where=splits, skipped=list(scan.skipped))
    if scan.ignored:
        shown = ", ".join(str(p) for p in scan.ignored[:5]) + (" ..." if len(scan.ignored) > 5 else "")
        log.info("ignored %d files that are not images PIL reads (by extension): %s", len(scan.ignored), shown)
    bundle = DataBundle(names, parts["train"], parts["val"], parts.get("test"), str(root), skipped,
                        ignored=[str(p) for p in scan.ignored])
    bundle.leaks = find_leaks(bundle)
    return bundle


def _keep(named: dict[str, list[Path]], classes, where: Path) -> dict[str, list[Path]]:
    """Only the class folders named in ``classes`` (all when empty)."""
    if not classes:
        return named
    unknown = sorted(set(classes) - set(named))
    if unknown:
        raise DataError(f"classes {unknown} are not in the data: {where} has the class folders "
                        f"{', '.join(named)}.")
    if len(set(classes)) < 2:
        raise DataError(f"A class subset needs at least two classes; got {list(classes)}.")
    return {c: f for c, f in named.items() if c in set(classes)}


def _check_classes(named: dict[str, list[Path]], where: Path) -> list[str]:
    if not named:
        raise DataError(
            f"{where} holds no class folders. Expected {where}/<class name>/<images> "
            f"(any format PIL reads: .jpg, .png, .webp, .tif, ...).")
    nonempty = [c for c, f in named.items() if f]
    if not nonempty:
        raise DataError(f"The class folders in {where} ({', '.join(named)}) hold no images "
                        f"(any format PIL reads: .jpg, .png, .webp, .tif, ...).")
    if len(named) < 2:
        raise DataError(f"{where} has a single class folder ({nonempty[0]!r}); a classifier "
                        "needs at least two class folders.")
    return list(named)


def _require_images(names: list[str], y: np.ndarray, minimum: int, where: Path | str,
                    skipped: list[str], why: str) -> None:
    """Refuse the data when any class has fewer than ``minimum`` readable images.

    ``where``: the split's folder (a Path: each class is named with its folder and the
    unreadable files in it) or a description of array data (a str)."""
    counts = np.bincount(np.asarray(y, np.int64), minlength=len(names))
    short = [(c, int(n)) for c, n in zip(names, counts) if n < minimum]
    if not short:
        return
    parts = []
    for c, n in short:
        text = f"{c!r} has {n}"
        if isinstance(where, Path):
            bad = [s for s in skipped if s.startswith(str(where / c) + os.sep)]
            text += f" in {where / c}" + (f" ({len(bad)} unreadable: {bad[0]}{' ...' if len(bad) > 1 else ''})"
                                          if bad else "")
        parts.append(text)
    plural = len(short) > 1
    remedy = ("add images to those classes, remove their folders" if plural else
              "add images to that class, remove its folder") if isinstance(where, Path) else (
              "add examples of those classes" if plural else "add examples of that class")
    raise DataError(f"Each class needs at least {minimum} readable image{'s' if minimum > 1 else ''} "
                    f"in {where}, {why}: {'; '.join(parts)}. To fix it, {remedy}, or train on the "
                    "other classes with --set classes=NAME,NAME,...")


def check_bundle(bundle: DataBundle) -> DataBundle:
    """Refuse a bundle (one built by hand, or subsampled) in which a class has no training or no
    validation image; return it unchanged otherwise."""
    where = bundle.source or "the data"
    _require_images(bundle.classes, bundle.train.y, 1, f"{where} (train)", [], "to train on")
    _require_images(bundle.classes, bundle.val.y, 1, f"{where} (val)", [],
                    "to validate on, or its accuracy is never measured")
    return bundle


def hash_split(keys: list[str], y: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) row indices: a row is validation when ``split_fraction(key) < val_fraction``.

    Deterministic and stable (adding files never moves the others), except that every class
    with 2 or more rows keeps at least 1 in each split: its nearest-to-the-line row moves across."""
    y = np.asarray(y)
    frac = np.array([split_fraction(k) for k in keys])
    is_val = frac < val_fraction
    for c in np.unique(y):
        members = np.where(y == c)[0]
        if len(members) < 2:
            continue
        if not is_val[members].any():
            is_val[members[np.argmin(frac[members])]] = True
        if is_val[members].all():
            is_val[members[np.argmax(frac[members])]] = False
    return np.where(~is_val)[0], np.where(is_val)[0]


def _average_hash(x: np.ndarray) -> np.ndarray:
    """8x8 mean-threshold hash per image: equal for byte-identical and near-identical images."""
    n, s = x.shape[:2][0], x.shape[1]
    k = s // 8
    step = max(1, k // 4)  # 4x4 samples per cell are plenty for a mean: ~100x less work at 288 px
    g = x[:, :k * 8:step, :k * 8:step].astype(np.float32).mean(-1)
    m = g.shape[1] // 8
    g = g[:, :m * 8, :m * 8].reshape(n, 8, m, 8, m).mean((2, 4)).reshape(n, 64)
    return np.packbits(g > g.mean(1, keepdims=True), axis=1)


def _chunked_hash(x) -> np.ndarray:
    """:func:`_average_hash` a few hundred rows at a time (8 bytes per image kept)."""
    parts = [_average_hash(c) for c in iter_chunks(x)]
    return np.concatenate(parts) if parts else np.zeros((0, 8), np.uint8)


def find_leaks(bundle: DataBundle) -> list[tuple[str, str, str]]:
    """Pairs of (train, val) images that are byte-identical or perceptually identical."""
    leaks = []
    tr, va = bundle.train, bundle.val
    if tr.files and va.files:
        digests = {}
        for f in tr.files:
            if os.path.isfile(f):  # packed data names files that may no longer exist
                digests.setdefault(hashlib.sha1(Path(f).read_bytes()).hexdigest(), f)
        for f in va.files:
            d = hashlib.sha1(Path(f).read_bytes()).hexdigest() if os.path.isfile(f) else None
            if d in digests:
                leaks.append((digests[d], f, "identical bytes"))
    if len(tr) and len(va):
        seen = {(a, b) for a, b, _ in leaks}
        th, vh = _chunked_hash(tr.x), _chunked_hash(va.x)
        index = {}
        for i, h in enumerate(th):
            index.setdefault(h.tobytes(), i)
        for j, h in enumerate(vh):
            i = index.get(h.tobytes())
            if i is not None and np.abs(tr.x[i].astype(int) - va.x[j].astype(int)).mean() < 2.0:
                a = tr.files[i] if tr.files else f"train[{i}]"
                b = va.files[j] if va.files else f"val[{j}]"
                if (a, b) not in seen:
                    leaks.append((a, b, "perceptually identical"))
    for a, b, kind in leaks:
        log.warning("train/val leak (%s): %s == %s", kind, a, b)
    return leaks


def _resize_array(x: np.ndarray, size: int, resize: str = "crop", name: str = "train") -> np.ndarray:
    if isinstance(x, ImageRows) and x.shape[1:] == (size, size, 3):
        return x  # already decoded at this size into a store (TFDS streaming): read nothing
    x = np.asarray(x)
    if x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise DataError(f"Image array has shape {x.shape}; expected (N, H, W), (N, H, W, 1|3|4).")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    x = x[..., :3]
    if x.dtype == np.uint16:  # 16-bit pixels: scaled, 65535 -> 255 (clipping would whiten them)
        x = np.round(x.astype(np.float32) * (255.0 / 65535.0))
    if x.dtype != np.uint8 and x.size:
        if not np.isfinite(x).all():
            raise DataError(f"The {name!r} image array holds NaN or infinite pixels; pass 0..255 values.")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 255:
            raise DataError(f"The {name!r} image array has pixel values {lo:g}..{hi:g}; tuneflow takes "
                            "0..255 (uint8 or float), 0..1 floats or uint16. Rescale it first.")
        if hi <= 1.0 + 1e-6:
            warnings.warn("Image array looks scaled to 0..1; tuneflow expects 0..255 pixels and "
                          "rescales it for you.", stacklevel=4)
            x = x * 255.0
        x = np.round(x)
    x = x.astype(np.uint8)
    if x.shape[1:3] == (size, size):
        return x
    return np.stack([resize_image(im, size, resize) for im in x])


def load_arrays(data, size: int, val_fraction: float = 0.2, classes=None, resize: str = "crop",
                keep=None, where: str = "the arrays") -> DataBundle:
    """``(x, y)`` or ``{"train": (x, y), "val": (x, y)[, "test": ...]}`` in, a bundle out.

    ``classes``: the name of each label (default ``"0"``, ``"1"``, ...); ``keep``: a subset of
    those names to train on. Every class must have 2 training images (without a val split) or 1
    in each split, or the data is refused naming the class."""
    check_resize(resize)
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must be in (0, 1).")
    parts = data if isinstance(data, dict) else {"train": data}
    if "train" not in parts:
        raise DataError("Array data as a dict needs a 'train' entry: {'train': (x, y), 'val': (x, y)}.")
    out = {}
    for k, (x, y) in parts.items():
        y = np.asarray(y).reshape(-1)
        if len(x) != len(y):
            raise DataError(f"{k}: {len(x)} images but {len(y)} labels.")
        whole = np.issubdtype(y.dtype, np.integer) or (
            np.issubdtype(y.dtype, np.number) and np.isfinite(y).all() and (y == np.round(y)).all())
        if len(y) and (not whole or y.min() < 0):
            raise DataError(f"{k}: labels must be class indices 0, 1, 2, ...; got {np.unique(y)[:5]}.")
        out[k] = Split(_resize_array(x, size, resize, k), y.astype(np.int32))
    if len(out["train"]) == 0:
        raise DataError(f"{where}: the training arrays are empty.")
    n_classes = int(max(s.y.max() for s in out.values() if len(s))) + 1
    names = list(classes) if classes is not None else [str(i) for i in range(n_classes)]
    if n_classes > len(names):
        raise DataError(f"{where}: label {n_classes - 1} but only {len(names)} class names.")
    if len(names) < 2 or len(np.unique(out["train"].y)) < 2:
        raise DataError(f"{where}: the training labels hold a single class; a classifier needs at least two.")
    if keep:
        unknown = sorted(set(keep) - set(names))
        if unknown:
            raise DataError(f"classes {unknown} are not in the data; it has {', '.join(names)}.")
        if len(set(keep)) < 2:
            raise DataError(f"A class subset needs at least two classes; got {list(keep)}.")
        kept = [i for i, c in enumerate(names) if c in set(keep)]
        remap = np.full(len(names), -1, np.int32)
        remap[kept] = np.arange(len(kept))
        for k, s in out.items():
            s = s.take(np.where(np.isin(s.y, kept))[0])
            s.y = remap[s.y]
            out[k] = s
        names = [names[i] for i in kept]
    if "val" not in out:
        _require_images(names, out["train"].y, 2, where, [],
                        f"1 to train on and 1 to validate on, since tuneflow holds out "
                        f"val_fraction={val_fraction} of each class")
        tr, va = hash_split([f"{i}" for i in range(len(out["train"]))], out["train"].y, val_fraction)
        out["train"], out["val"] = out["train"].take(tr), out["train"].take(va)
    else:
        _require_images(names, out["train"].y, 1, f"{where} (train)", [], "to train on")
        _require_images(names, out["val"].y, 1, f"{where} (val)", [],
                        "to validate on, or its accuracy is never measured")
    bundle = DataBundle(names, out["train"], out["val"], out.get("test"), "arrays")
    bundle.leaks = find_leaks(bundle)
    return bundle
