"""``tuneflow pack``: class folders to TFRecord shards (encoded bytes, as stored), and back.

A packed folder holds ``{split}-{i:05d}-of-{n:05d}.tfrecord`` shards of ``tf.train.Example``
records (``image``: the file's bytes, untouched; ``label``: int64; ``key``: ``class/filename``,
which the hash split uses; ``file``: the original path) and ``tuneflow_pack.json``, the sidecar
that names the classes and lists each split's keys, labels and files (so splitting, class subsets
and ``fraction`` need no pass over the shards). ``--data SHARDS/`` is recognised by the sidecar and
loads into the same bundle as the folder it was packed from: same split, same pixels.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from .sources import DataBundle, _class_keys, _keep, assemble, check_resize, decode_image, find_leaks, scan_folder
from .store import decode_rows, file_entries, source_key

log = logging.getLogger("tuneflow.data")

SIDECAR = "tuneflow_pack.json"
FORMAT = "tuneflow-pack/1"
SHARD_BYTES = 128 << 20  # ~128 MB a shard: large sequential reads, still many shards for many workers


def is_packed(path) -> bool:
    """Whether ``path`` is a folder written by :func:`pack` (it holds the sidecar)."""
    try:
        return (Path(str(path)).expanduser() / SIDECAR).is_file()
    except OSError:
        return False


def pack(data, out, classes=None, shard_bytes: int = SHARD_BYTES) -> dict:
    """Write the class folder ``data`` as TFRecord shards in ``out`` (a new or empty folder).

    Nothing is decoded: every file's bytes are stored as they are (a corrupt file is found, and
    skipped, when the shards are loaded). Written into a temporary folder beside ``out`` and
    renamed when complete. Returns the sidecar's contents.
    """
    import tensorflow as tf

    root, names, splits, _, scan, lists = scan_folder(data, classes)
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {out} already exists and is not an empty folder; pack into a new "
                        "folder (tuneflow never writes over files it did not make).")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part"))
    try:
        meta = {"format": FORMAT, "classes": names, "source": str(root), "splits": {},
                "skipped": list(scan.skipped), "ignored": [str(p) for p in scan.ignored]}
        for k, (files, labels) in lists.items():
            groups, size = [[]], 0
            for i, f in enumerate(files):  # shards by byte size, in file order
                n = os.path.getsize(f)
                if groups[-1] and size + n > shard_bytes:
                    groups.append([])
                    size = 0
                groups[-1].append(i)
                size += n
            keys = _class_keys(files, labels, names)
            shards = []
            for si, rows in enumerate(groups):
                name = f"{k}-{si:05d}-of-{len(groups):05d}.tfrecord"
                with tf.io.TFRecordWriter(str(tmp / name)) as w:
                    for i in rows:
                        feat = {"image": _bytes(Path(files[i]).read_bytes()),
                                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(labels[i])])),
                                "key": _bytes(keys[i].encode()), "file": _bytes(str(files[i]).encode())}
                        w.write(tf.train.Example(features=tf.train.Features(feature=feat)).SerializeToString())
                shards.append(name)
            meta["splits"][k] = {"shards": shards, "keys": keys, "labels": [int(v) for v in labels],
                                 "files": [str(f) for f in files]}
        (tmp / SIDECAR).write_text(json.dumps(meta))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    n = sum(len(v["keys"]) for v in meta["splits"].values())
    log.info("packed %d images of %d classes into %s", n, len(names), out)
    return meta


def _bytes(b: bytes):
    import tensorflow as tf
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[b]))


def _records(paths):
    """Raw records of ``paths``, in order, one at a time."""
    import tensorflow as tf
    for rec in tf.data.TFRecordDataset([str(p) for p in paths]).as_numpy_iterator():
        yield rec


def load_packed(root, size: int, val_fraction: float = 0.2, resize: str = "crop", classes=None,
                fraction: float = 1.0, seed: int = 0) -> DataBundle:
    """Shards written by :func:`pack` into a bundle: the same split and pixels as the folder
    they came from. Records are streamed and decoded chunk by chunk into the image store."""
    import tensorflow as tf

    check_resize(resize)
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must be in (0, 1).")
    root = Path(str(root)).expanduser()
    try:
        meta = json.loads((root / SIDECAR).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        all_names = list(meta["classes"])
        splits = meta["splits"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{root / SIDECAR} is not a tuneflow pack sidecar ({exc}); pack the folder "
                        "again with `tuneflow pack DATA --out SHARDS/`.") from None
    names = list(_keep({c: [] for c in all_names}, classes, root))
    old = {all_names.index(c): i for i, c in enumerate(names)}
    rows, parts, files = {}, {}, {}
    for k, sp in splits.items():
        y = np.asarray(sp["labels"], np.int64)
        rows[k] = np.where(np.isin(y, list(old)))[0]  # record numbers kept (class subset)
        parts[k] = ([sp["keys"][i] for i in rows[k]], np.asarray([old[int(v)] for v in y[rows[k]]], np.int32))
        files[k] = [sp["files"][i] for i in rows[k]]

    def decode_split(selected):
        wanted = {k: rows[k][selected[k]] for k in splits}
        names_ = [files[k][i] for k in splits for i in selected[k]]

        def items():
            for k, sp in splits.items():
                want, j = wanted[k], 0
                for r, rec in enumerate(_records(root / s for s in sp["shards"])):
                    if j < len(want) and want[j] == r:
                        j += 1
                        yield tf.train.Example.FromString(rec).features.feature["image"].bytes_list.value[0]
                    if j == len(want):
                        break
        digest = source_key([(k, wanted[k].tobytes().hex()) for k in splits], size, resize, "pack")
        key = source_key(file_entries(sorted(root.iterdir())) + [digest], size, resize, "pack")
        x, ok, sk = decode_rows(items(), names_, size, resize, lambda b: decode_image(b, size, resize),
                                "decode", key)
        return x, ok, names_, sk

    where = {k: root / k for k in splits}
    out, skipped = assemble(names, parts, decode_split, val_fraction=val_fraction, fraction=fraction,
                            seed=seed, pool_where=root, split_where=where, skipped=list(meta.get("skipped", [])))
    bundle = DataBundle(names, out["train"], out["val"], out.get("test"), str(root), skipped,
                        ignored=list(meta.get("ignored", [])))
    bundle.leaks = find_leaks(bundle)
    return bundle
