"""Data sources: class folders, TensorFlow Datasets and NumPy arrays, decoded once to uint8 arrays.

Every source ends as a :class:`DataBundle`: RGB uint8 arrays at the model's input
size for train / val (/ test), class names, and what was skipped or suspicious.
Decoding happens once, up front, in parallel, with a progress bar: a corrupt file
is found and skipped before training starts, never in the middle of an epoch.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ..errors import DataError
from ..imageops import RESIZE_MODES, resize_image

log = logging.getLogger("tuneflow.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation"),
               "test": ("test", "testing")}




@dataclass
class Split:
    x: np.ndarray  # (N, S, S, 3) uint8 RGB
    y: np.ndarray  # (N,) int32 class indices
    files: list[str] = field(default_factory=list)  # source of each row ('' for arrays)

    def __len__(self):
        return len(self.y)

    def take(self, idx) -> "Split":
        idx = np.asarray(idx, dtype=np.int64)
        return Split(self.x[idx], self.y[idx], [self.files[i] for i in idx] if self.files else [])


@dataclass
class DataBundle:
    classes: list[str]
    train: Split
    val: Split
    test: Split | None = None
    source: str = ""
    skipped: list[str] = field(default_factory=list)  # unreadable files, with the reason
    leaks: list[tuple[str, str, str]] = field(default_factory=list)  # (train, val, kind)

    def counts(self, split: str = "train") -> dict[str, int]:
        s = getattr(self, split)
        return {c: int(np.sum(s.y == i)) for i, c in enumerate(self.classes)}

    def fingerprint(self) -> str:
        """Changes whenever any pixel, label or split changes (keys the feature cache)."""
        h = hashlib.sha256()
        for name in ("train", "val"):
            s = getattr(self, name)
            h.update(name.encode())
            h.update(np.ascontiguousarray(s.x).data)
            h.update(s.y.astype(np.int32).tobytes())
        h.update("\n".join(self.classes).encode())
        return h.hexdigest()[:16]


def split_fraction(key: str) -> float:
    """A stable number in [0, 1) from a file's class-relative name: adding files never moves others."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) / 0x100000000


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _class_dirs(root: Path) -> dict[str, list[Path]]:
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in d.rglob("*") if _is_image(p))
        out[d.name] = files
    return out


def check_resize(resize: str) -> None:
    if resize not in RESIZE_MODES:
        raise DataError(f"resize={resize!r} is not a resize mode; choose one of {', '.join(RESIZE_MODES)}.")


def to_square(im: Image.Image, size: int, resize: str = "crop") -> Image.Image:
    """An RGB PIL image as size x size, through the model's own resize (:mod:`tuneflow.imageops`)."""
    return Image.fromarray(resize_image(np.asarray(im.convert("RGB"), np.uint8), size, resize))


def decode_image(path: str | Path, size: int, resize: str = "crop") -> np.ndarray:
    """Decode any supported file to (size, size, 3) uint8 RGB, EXIF orientation applied."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))  # transparent -> white
            im = Image.alpha_composite(bg, im)
        return resize_image(np.asarray(im.convert("RGB"), dtype=np.uint8), size, resize)


def _decode_all(files: list[Path], size: int, desc: str, resize: str = "crop"):
    x = np.zeros((len(files), size, size, 3), np.uint8)
    ok = np.ones(len(files), bool)
    skipped = []

    def work(i):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x[i] = decode_image(files[i], size, resize)
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "unreadable"
            ok[i] = False
            skipped.append(f"{files[i]} ({type(exc).__name__}: {exc})")

    workers = min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
        list(tqdm(pool.map(work, range(len(files))), total=len(files), desc=desc, unit="img",
                  leave=False, disable=len(files) < 200))
    for s in skipped:
        log.warning("skipping unreadable image: %s", s)
    return x, ok, sorted(skipped)


def _load_split(named: dict[str, list[Path]], classes: list[str], size: int, desc: str,
                resize: str = "crop"):
    files, labels = [], []
    for ci, c in enumerate(classes):
        for f in named.get(c, []):
            files.append(f)
            labels.append(ci)
    x, ok, skipped = _decode_all(files, size, desc, resize)
    y = np.asarray(labels, np.int32)
    return Split(x[ok], y[ok], [str(f) for f, k in zip(files, ok) if k]), skipped


def _find_splits(root: Path) -> dict[str, Path]:
    found = {}
    for split, names in SPLIT_NAMES.items():
        for n in names:
            if (root / n).is_dir():
                found[split] = root / n
                break
    return found


def load_folder(root: str | Path, size: int, val_fraction: float = 0.2, resize: str = "crop") -> DataBundle:
    check_resize(resize)
    root = Path(root)
    if not root.exists():
        raise DataError(f"Data folder {root} does not exist. Pass a folder of class folders "
                        "(root/<class>/*.jpg, optionally under train/ and val/) or tfds:NAME.")
    if not root.is_dir():
        raise DataError(f"--data {root} is a file; pass a folder of class folders or tfds:NAME.")
    splits = _find_splits(root)
    skipped: list[str] = []
    if splits:
        if "train" not in splits:
            raise DataError(f"{root} has {', '.join(splits)} folders but no train/ folder.")
        named = {k: _class_dirs(v) for k, v in splits.items()}
        classes = _check_classes(named["train"], root / splits["train"].name)
        for other in ("val", "test"):
            if other in named:
                extra = sorted(set(c for c, f in named[other].items() if f) - set(classes))
                if extra:
                    raise DataError(
                        f"Classes {extra} appear in {splits[other]} but have no training images "
                        f"in {splits['train']}; the model could never predict them. Add training "
                        "images or remove those folders.")
        if "val" not in named:
            named["train"], named["val"] = _hash_split(named["train"], val_fraction)
    else:
        named_all = _class_dirs(root)
        classes = _check_classes(named_all, root)
        tr, va = _hash_split(named_all, val_fraction)
        named = {"train": tr, "val": va}
    parts = {}
    for k in ("train", "val", "test"):
        if k in named:
            parts[k], sk = _load_split(named[k], classes, size, f"decode {k}", resize)
            skipped += sk
    if len(parts["train"]) == 0:
        raise DataError(f"No readable training images in {root}.")
    bundle = DataBundle(classes, parts["train"], parts["val"], parts.get("test"), str(root), skipped)
    bundle.leaks = find_leaks(bundle)
    return bundle


def _check_classes(named: dict[str, list[Path]], where: Path) -> list[str]:
    nonempty = [c for c, f in named.items() if f]
    if not named:
        raise DataError(
            f"{where} holds no class folders. Expected {where}/<class name>/<images> "
            f"({', '.join(IMAGE_EXTENSIONS)}).")
    if not nonempty:
        raise DataError(f"The class folders in {where} ({', '.join(named)}) hold no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}).")
    if len(nonempty) < 2:
        raise DataError(f"{where} has a single class with images ({nonempty[0]!r}); a classifier "
                        "needs at least two class folders.")
    empty = sorted(set(named) - set(nonempty))
    if empty:
        log.warning("ignoring empty class folders in %s: %s", where, ", ".join(empty))
    return nonempty


def _hash_split(named: dict[str, list[Path]], val_fraction: float):
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must be in (0, 1).")
    tr, va = {}, {}
    for c, files in named.items():
        tr[c] = [f for f in files if split_fraction(f"{c}/{f.name}") >= val_fraction]
        va[c] = [f for f in files if split_fraction(f"{c}/{f.name}") < val_fraction]
        if files and not tr[c]:  # tiny class: keep at least one image for training
            tr[c], va[c] = va[c][:1], va[c][1:]
    return tr, va


def _average_hash(x: np.ndarray) -> np.ndarray:
    """8x8 mean-threshold hash per image: equal for byte-identical and near-identical images."""
    n, s = x.shape[:2][0], x.shape[1]
    k = s // 8
    step = max(1, k // 4)  # 4x4 samples per cell are plenty for a mean: ~100x less work at 288 px
    g = x[:, :k * 8:step, :k * 8:step].astype(np.float32).mean(-1)
    m = g.shape[1] // 8
    g = g[:, :m * 8, :m * 8].reshape(n, 8, m, 8, m).mean((2, 4)).reshape(n, 64)
    return np.packbits(g > g.mean(1, keepdims=True), axis=1)


def find_leaks(bundle: DataBundle) -> list[tuple[str, str, str]]:
    """Pairs of (train, val) images that are byte-identical or perceptually identical."""
    leaks = []
    tr, va = bundle.train, bundle.val
    if tr.files and va.files:
        digests = {}
        for f in tr.files:
            digests.setdefault(hashlib.sha1(Path(f).read_bytes()).hexdigest(), f)
        for f in va.files:
            d = hashlib.sha1(Path(f).read_bytes()).hexdigest()
            if d in digests:
                leaks.append((digests[d], f, "identical bytes"))
    if len(tr) and len(va):
        seen = {(a, b) for a, b, _ in leaks}
        th, vh = _average_hash(tr.x), _average_hash(va.x)
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


def _resize_array(x: np.ndarray, size: int, resize: str = "crop") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise DataError(f"Image array has shape {x.shape}; expected (N, H, W), (N, H, W, 1|3|4).")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    x = x[..., :3]
    if x.dtype != np.uint8:
        if x.max() <= 1.0 + 1e-6:
            warnings.warn("Image array looks scaled to 0..1; tuneflow expects 0..255 pixels and "
                          "rescales it for you.", stacklevel=3)
            x = x * 255.0
        x = np.clip(x, 0, 255).round().astype(np.uint8)
    if x.shape[1:3] == (size, size):
        return x
    return np.stack([resize_image(im, size, resize) for im in x])


def load_arrays(data, size: int, val_fraction: float = 0.2, classes=None, resize: str = "crop") -> DataBundle:
    """``(x, y)`` or ``{"train": (x, y), "val": (x, y)[, "test": ...]}`` in, a bundle out."""
    check_resize(resize)
    parts = data if isinstance(data, dict) else {"train": data}
    if "train" not in parts:
        raise DataError("Array data as a dict needs a 'train' entry: {'train': (x, y), 'val': (x, y)}.")
    out = {}
    for k, (x, y) in parts.items():
        y = np.asarray(y).reshape(-1).astype(np.int32)
        if len(x) != len(y):
            raise DataError(f"{k}: {len(x)} images but {len(y)} labels.")
        out[k] = Split(_resize_array(x, size, resize), y)
    n_classes = int(max(s.y.max() for s in out.values())) + 1
    classes = list(classes) if classes is not None else [str(i) for i in range(n_classes)]
    if len(np.unique(out["train"].y)) < 2:
        raise DataError("The training labels hold a single class; a classifier needs at least two.")
    if "val" not in out:
        frac = np.array([split_fraction(f"{i}") for i in range(len(out["train"]))])
        tr = out["train"]
        out["train"], out["val"] = tr.take(np.where(frac >= val_fraction)[0]), tr.take(
            np.where(frac < val_fraction)[0])
    bundle = DataBundle(classes, out["train"], out["val"], out.get("test"), "arrays")
    bundle.leaks = find_leaks(bundle)
    return bundle
