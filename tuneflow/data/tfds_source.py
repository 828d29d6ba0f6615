"""TensorFlow Datasets by name: ``tfds:NAME`` or ``tfds:NAME:SPLIT``, streamed into the image store.

A split is iterated once and decoded chunk by chunk (:func:`tuneflow.data.store.decode_rows`):
above the in-memory threshold its pixels go to a memory-mapped store keyed by the prepared
dataset's files, so a large split is never held in RAM whole, and a second load reads nothing."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..extras import optional
from .sources import DataBundle, DataError, check_resize, load_arrays, to_square
from .store import ImageRows, decode_rows, file_entries, source_key


def load_tfds(spec: str, size: int, val_fraction: float = 0.2, resize: str = "crop", keep=None) -> DataBundle:
    """A TFDS dataset through its own download and cache; ``keep``: a subset of its class names."""
    tfds = optional("tensorflow_datasets", "--data tfds:NAME")

    check_resize(resize)
    parts = spec.split(":")
    name = parts[1] if len(parts) > 1 else ""
    split = parts[2] if len(parts) > 2 else None
    if not name:
        raise DataError(f"{spec!r}: write tfds:NAME or tfds:NAME:SPLIT, e.g. tfds:tf_flowers.")
    if name not in tfds.list_builders():
        import difflib
        close = difflib.get_close_matches(name, tfds.list_builders(), n=3)
        raise DataError(f"TFDS has no dataset {name!r}." + (
            f" Did you mean {', '.join(close)}?" if close else " See `tfds.list_builders()`."))
    try:
        builder = tfds.builder(name)
        builder.download_and_prepare()  # the split names are known only once it is prepared
        available = list(builder.info.splits.keys()) or ["train"]
        wanted = {"train": split or "train"}
        if split is None:
            for cand in ("validation", "val", "test"):
                if cand in available and cand != "train":
                    wanted["val"] = cand
                    break
        arrays, skipped = {}, []
        for k, sp in wanted.items():
            ds = tfds.load(name, split=sp, as_supervised=True, download=True)
            n = int(ds.cardinality())
            if n < 0:
                n = int(builder.info.splits[sp].num_examples)
            ys: list[int] = []

            def items(ds=ds, ys=ys):
                for img, label in tfds.as_numpy(ds):
                    ys.append(int(label))
                    yield img
            data_dir = Path(builder.data_dir)
            files = sorted(p for p in data_dir.rglob("*") if p.is_file()) if data_dir.is_dir() else []
            key = source_key(file_entries(files) + [name, sp, str(builder.info.version)], size, resize,
                             "tfds") if files else None  # no prepared files (a mock): never reused
            x, ok, sk = decode_rows(items(), [f"{spec} {sp}[{i}]" for i in range(n)], size, resize,
                                    lambda img: np.asarray(_resize(img, size, resize)), f"decode {k}", key,
                                    extra=lambda ys=ys: {"labels": ys})
            labels = np.asarray(getattr(x, "meta", {}).get("labels", ys), np.int64)
            good = np.where(ok)[0]
            arrays[k] = (x.take(good) if isinstance(x, ImageRows) else x[good], labels[good])
            skipped += sk
        label_feature = builder.info.features["label"] if "label" in builder.info.features else None
        classes = list(label_feature.names) if label_feature is not None else None
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, missing split, ...
        raise DataError(
            f"Could not load TFDS dataset {name!r} (split {split or 'train'}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. TFDS downloads "
            "on first use; offline, prepare it once elsewhere and point TFDS_DATA_DIR at its "
            "folder, or export the images to class folders and pass that folder.") from None
    bundle = load_arrays(arrays, size, val_fraction, classes, resize, keep=keep, where=spec)
    bundle.source = spec
    bundle.skipped = skipped + bundle.skipped
    return bundle


def _resize(img, size, resize):
    from PIL import Image
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    return to_square(Image.fromarray(img), size, resize)  # to_rgb8 scales 16-bit images
