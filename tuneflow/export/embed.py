"""Embeddings of image files from a run: decoded in threads while the model runs, written atomically as .npy, .parquet or .csv.

>>> from tuneflow.export.embed import embed_files, list_images, write_embeddings
>>> p = tuneflow.load("runs/photos")                                          # doctest: +SKIP
>>> result = embed_files(p, list_images(["photos/"]), layer="pooled")         # doctest: +SKIP
>>> write_embeddings(result, "photos.parquet")                                # doctest: +SKIP
"""
from __future__ import annotations

import csv
import os
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, TuneflowError
from ..extras import optional
from .predictor import load

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"})
OUTPUT_SUFFIXES = (".npy", ".parquet", ".csv")
LAYERS = ("pooled", "penultimate")
# Batches decoded ahead of the one the model is running: enough to keep the model busy while
# PIL decodes (PIL and TensorFlow both release the GIL), few enough to bound memory
# (2 x 64 images x 288 x 288 x 3 float32 = 127 MB at most).
LOOKAHEAD = 2


def load_predictor(run, checkpoint: str = "best"):
    """``tuneflow.load(run, checkpoint)``: the run's exported model with its decode and resize."""
    return load(run, checkpoint=checkpoint)


def list_images(inputs) -> list[Path]:
    """Files and folders -> image files: folders walked recursively for image suffixes (sorted);
    a file named explicitly is kept whatever its suffix, so an unreadable one is reported, not lost."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or folder; give image files or folders of images.")
    return out


@dataclass
class Embeddings:
    """Rows of ``vectors`` (float32 [N, D]) belong to ``paths``; ``skipped`` lists (path, why)."""
    paths: list[str]
    vectors: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)
    layer: str = "pooled"
    normalize: bool = True


def _load_chunk(predictor, paths, strict: bool, max_pixels):
    """Decode and resize one batch's files (in a worker thread) -> (kept paths, [n,S,S,3], skipped)."""
    images, kept, skipped = [], [], []
    for p in paths:
        try:
            images.append(predictor.decode(p, max_pixels=max_pixels) if max_pixels else predictor.decode(p))
            kept.append(str(p))
        except DataError as exc:
            if strict:
                raise DataError(f"--strict: {p} cannot be read ({exc}); fix or remove it, or leave out "
                                "--strict to skip unreadable files.") from exc
            skipped.append((str(p), str(exc)))
    return kept, (predictor.prepare(images) if images else None), skipped


def embed_files(predictor, paths, *, layer: str = "pooled", normalize: bool = True,
                batch_size: int | None = None, progress: bool = False, strict: bool = False,
                max_pixels: int | None = None, workers: int | None = None) -> Embeddings:
    """Embed image files in batches of ``batch_size``: unreadable files are skipped and listed in
    ``skipped`` (``strict=True``: the first one raises DataError). Decoding runs in ``workers``
    threads (default: CPU count), ``LOOKAHEAD`` batches ahead of the model."""
    if layer not in LAYERS:
        raise DataError(f"layer={layer!r}; choose one of {', '.join(LAYERS)}.")
    batch_size = predictor.batch_size if batch_size is None else batch_size
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size}; it must be at least 1.")
    from tqdm.auto import tqdm
    paths = list(paths)
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    kept, parts, skipped = [], [], []
    bar = tqdm(total=len(paths), unit="img", desc="embed", disable=None if progress else True)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2, thread_name_prefix="tuneflow-decode") as pool:
        pending: deque = deque()
        todo = iter(chunks)
        try:
            for chunk in todo:
                pending.append(pool.submit(_load_chunk, predictor, chunk, strict, max_pixels))
                if len(pending) > LOOKAHEAD:
                    break
            while pending:
                k, batch, s = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(_load_chunk, predictor, nxt, strict, max_pixels))
                if batch is not None:
                    parts.append(np.asarray(predictor.embed_prepared(batch, layer=layer, normalize=normalize),
                                            dtype=np.float32))
                kept += k
                skipped += s
                bar.update(len(k) + len(s))
        finally:
            for f in pending:
                f.cancel()
            bar.close()
    dim = int(predictor.embedding_dim) if layer == "pooled" or not parts else parts[0].shape[1]
    vectors = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    return Embeddings(kept, vectors, skipped, layer, normalize)


def _atomic(out: Path, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary sibling of ``out``, then rename it over ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def paths_file(out) -> Path:
    """Where a ``.npy`` output's paths go: ``emb.npy`` -> ``emb.paths.txt`` (row i = line i)."""
    out = Path(out)
    return out.with_name(out.stem + ".paths.txt")


def write_embeddings(result: Embeddings, out, metadata: dict | None = None) -> list[Path]:
    """Write ``result`` by ``out``'s suffix -> the files written:

    - ``.npy``: the float32 [N, D] array, and the paths in ``<stem>.paths.txt`` beside it;
    - ``.parquet``: columns ``path`` (string) and ``embedding`` (list<float32>), run metadata in
      the schema;
    - ``.csv``: ``path, e0 .. e{D-1}``, each float with 9 significant digits (exact for float32).
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise DataError(f"--out {out}: unknown format {suffix or '(no suffix)'!r}; use one of "
                        f"{', '.join(OUTPUT_SUFFIXES)}.")
    v = np.ascontiguousarray(result.vectors, dtype=np.float32)
    if suffix == ".npy":
        def write_npy(tmp):
            with open(tmp, "wb") as f:
                np.save(f, v)
        written = [_atomic(out, write_npy)]
        return written + [_atomic(paths_file(out), lambda tmp: Path(tmp).write_text(
            "".join(p + "\n" for p in result.paths), encoding="utf-8"))]
    if suffix == ".parquet":
        import json

        pa = optional("pyarrow", "embeddings as .parquet")
        pq = optional("pyarrow.parquet", "embeddings as .parquet")
        dim = v.shape[1]
        emb = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1), pa.float32()), dim)
        table = pa.table({"path": pa.array(result.paths, pa.string()),
                          "embedding": emb.cast(pa.list_(pa.float32()))})
        meta = {"layer": result.layer, "normalize": result.normalize, "dim": dim, **(metadata or {})}
        table = table.replace_schema_metadata({"tuneflow": json.dumps(meta)})
        return [_atomic(out, lambda tmp: pq.write_table(table, tmp))]

    def write_csv(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path"] + [f"e{i}" for i in range(v.shape[1])])
            for p, row in zip(result.paths, v):
                w.writerow([p] + [format(float(x), ".9g") for x in row])
    return [_atomic(out, write_csv)]


def read_embeddings(path) -> tuple[list[str], np.ndarray]:
    """Read back what :func:`write_embeddings` wrote -> (paths, float32 [N, D])."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return paths_file(path).read_text(encoding="utf-8").splitlines(), np.load(path)
    if suffix == ".parquet":
        pq = optional("pyarrow.parquet", "embeddings as .parquet")
        t = pq.read_table(path)
        vectors = np.array(t.column("embedding").to_pylist(), dtype=np.float32)
        return t.column("path").to_pylist(), vectors.reshape(len(t), -1)
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))[1:]
        return [r[0] for r in rows], np.array([[float(x) for x in r[1:]] for r in rows], np.float32)
    raise TuneflowError(f"{path}: not an embeddings file (.npy, .parquet or .csv).")


def cli_embed(args) -> int:
    """``tuneflow embed RUN IMAGES_OR_FOLDER... --out FILE``."""
    import sys
    out = Path(args.out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise DataError(f"--out {out}: unknown format {out.suffix or '(no suffix)'!r}; use one of "
                        f"{', '.join(OUTPUT_SUFFIXES)}.")
    paths = list_images(args.images)
    if not paths:
        raise DataError(f"no image files in {' '.join(args.images)} (looked for "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))}).")
    predictor = load_predictor(args.run, args.checkpoint)
    normalize = not args.no_normalize
    result = embed_files(predictor, paths, layer=args.layer, normalize=normalize,
                         batch_size=args.batch_size, progress=not args.no_progress, strict=args.strict)
    info = predictor.info
    files = write_embeddings(result, out, {"run": str(Path(args.run).resolve()), "checkpoint": args.checkpoint,
                                           "backbone": info.get("backbone"),
                                           "tuneflow_version": info.get("tuneflow_version")})
    for path, why in result.skipped:
        print(f"tuneflow: skipped {path}: {why}", file=sys.stderr)
    print(f"tuneflow: embedded {len(result.paths)} images ({result.vectors.shape[1]}-d {args.layer}"
          f"{', L2-normalised' if normalize else ''}) -> {', '.join(map(str, files))}"
          f"; skipped {len(result.skipped)} unreadable file{'s' if len(result.skipped) != 1 else ''}")
    return 0
