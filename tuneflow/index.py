"""Nearest-neighbour index of a gallery's embeddings (faiss): exact inner product, or HNSW above a size, with its measured recall.

An index folder holds ``index.faiss`` (the faiss index), ``paths.txt`` (one gallery path a line,
row ``i`` is vector ``i``), ``thumbs/`` (a small JPEG per item, ``thumbs/00000042.jpg`` for item 42:
what the service's page shows, served by item id) and ``meta.json`` (the run, checkpoint, layer and normalisation the
vectors came from, the kind of index and, for an approximate one, its recall@10 against exact
search measured when it was built or extended). Embeddings are L2-normalised by default, so the
inner product is the cosine similarity.

>>> idx = build_index("runs/photos", ["gallery/"], "runs/photos/index")     # doctest: +SKIP
>>> idx.search(vectors, k=5)                                                 # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import replace_dir
from .errors import DataError, RunError
from .export.embed import embed_files, list_images, load_predictor
from .extras import optional
from .imageops import decode_pixels

INDEX_FILE, PATHS_FILE, META_FILE = "index.faiss", "paths.txt", "meta.json"
THUMBS_DIR = "thumbs"
THUMB_SIZE = 128     # px, the longer side: a row of neighbours on a page, ~3-6 KB each as JPEG
THUMB_QUALITY = 85
# Exact search over 200k vectors of 1280 float32 is ~1 GB and ~0.1 s a query on 2 cores; above
# this many vectors an HNSW graph answers in ~1 ms at the recall stated in meta.json.
APPROXIMATE_ABOVE = 200_000
HNSW_M = 32                   # graph degree: faiss's usual choice for 0.95-0.99 recall
HNSW_EF_CONSTRUCTION = 200    # build-time beam width
RECALL_TARGET = 0.99          # efSearch is raised until recall@10 on the sample reaches this
RECALL_QUERIES = 1000         # gallery vectors used as queries to measure recall@10


@dataclass
class Index:
    """A loaded or freshly built index: ``search`` answers (scores, paths) for query vectors."""
    faiss_index: object
    paths: list[str]
    meta: dict = field(default_factory=dict)
    folder: Path | None = None  # where it was loaded from or saved to (its thumbnails live there)

    @property
    def dim(self) -> int:
        return int(self.faiss_index.d)

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    def search(self, vectors: np.ndarray, k: int = 5) -> list[list[dict]]:
        """Query vectors [N, D] -> per query, up to ``k`` {"path", "score", "id"} best first
        (``id``: the item's row, the name of its thumbnail, see :meth:`thumbnail`)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise DataError(f"query vectors have shape {vectors.shape}; this index holds {self.dim}-d "
                            "vectors: embed the queries with the run and layer the index was built with.")
        if k < 1:
            raise DataError(f"k={k}: ask for at least one neighbour.")
        scores, ids = self.faiss_index.search(vectors, min(int(k), len(self)))
        return [[{"path": self.paths[i], "score": float(s), "id": int(i)} for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]

    def thumbnail(self, item: int) -> Path | None:
        """The JPEG thumbnail of item ``item`` (a row number), or None when there is none."""
        if self.folder is None or not 0 <= int(item) < len(self):
            return None
        p = self.folder / THUMBS_DIR / thumb_name(int(item))
        return p if p.is_file() else None

    def save(self, out, keep_thumbnails: bool = False) -> Path:
        """Write the folder atomically: a temporary sibling folder renamed over ``out``, with a
        thumbnail per item made from the gallery images (``keep_thumbnails``: those already in
        ``out`` are kept, for an index that only grew)."""
        faiss = optional("faiss", "the similarity index (tuneflow index, similar, serve --index)")
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists() and not (out / META_FILE).exists():
            raise RunError(f"{out} exists and is not a tuneflow index (no {META_FILE}); "
                           "choose another --out, tuneflow does not replace folders it did not write.")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            faiss.write_index(self.faiss_index, str(tmp / INDEX_FILE))
            (tmp / PATHS_FILE).write_text("".join(p + "\n" for p in self.paths), encoding="utf-8")
            self.meta.update(count=len(self), dim=self.dim)
            self.meta["thumbnails"] = write_thumbnails(self.paths, tmp / THUMBS_DIR,
                                                       out / THUMBS_DIR if keep_thumbnails else None)
            (tmp / META_FILE).write_text(json.dumps(self.meta, indent=2) + "\n")
            replace_dir(tmp, out)
            self.folder = out
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


def load_index(index_dir) -> Index:
    """Read an index folder written by :func:`build_index`; a missing or damaged one is a RunError."""
    faiss = optional("faiss", "the similarity index (tuneflow index, similar, serve --index)")
    d = Path(index_dir)
    missing = [n for n in (INDEX_FILE, PATHS_FILE, META_FILE) if not (d / n).is_file()]
    if missing:
        raise RunError(f"{d} is not a tuneflow index (missing {', '.join(missing)}); build one with "
                       "`tuneflow index RUN GALLERY --out INDEX_DIR`.")
    try:
        meta = json.loads((d / META_FILE).read_text())
        index = faiss.read_index(str(d / INDEX_FILE))
    except Exception as exc:  # noqa: BLE001 - faiss raises RuntimeError for a damaged file
        raise RunError(f"cannot read the index in {d} ({exc}); rebuild it with `tuneflow index`.") from exc
    paths = (d / PATHS_FILE).read_text(encoding="utf-8").splitlines()
    if len(paths) != index.ntotal:
        raise RunError(f"{d}: {PATHS_FILE} lists {len(paths)} paths for {index.ntotal} vectors; "
                       "the folder is damaged, rebuild it with `tuneflow index`.")
    if "ef_search" in meta and hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(meta["ef_search"])
    return Index(index, paths, meta, d)


def thumb_name(item: int) -> str:
    return f"{item:08d}.jpg"


def _thumbnail(path: str, target: Path) -> bool:
    from PIL import Image

    try:
        im = Image.fromarray(decode_pixels(path))
    except Exception:  # noqa: BLE001 - a gallery file gone or unreadable since it was embedded: no thumbnail
        return False
    im.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.BILINEAR)
    im.save(target, format="JPEG", quality=THUMB_QUALITY)
    return True


def write_thumbnails(paths: list[str], folder: Path, previous: Path | None = None) -> int:
    """A small JPEG per gallery image into ``folder`` (``thumb_name(row)``), reusing those already in
    ``previous`` (the index folder being replaced) -> how many exist. Decoded in threads."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = []
    for i, p in enumerate(paths):
        old = previous / thumb_name(i) if previous is not None else None
        if old is not None and old.is_file():
            shutil.copyfile(old, folder / thumb_name(i))
        else:
            todo.append((p, folder / thumb_name(i)))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="tuneflow-thumbs") as pool:
        made = sum(pool.map(lambda a: _thumbnail(*a), todo))
    return len(paths) - len(todo) + made


def exact_index(vectors: np.ndarray):
    faiss = optional("faiss", "the similarity index (tuneflow index, similar, serve --index)")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def recall_at_10(index, vectors: np.ndarray, queries: int = RECALL_QUERIES, seed: int = 0) -> tuple[float, int]:
    """Recall@10 of ``index`` against exact inner-product search over ``vectors`` (its contents),
    with up to ``queries`` of them, drawn without replacement, as queries -> (recall, queries used)."""
    k = min(10, len(vectors))
    rng = np.random.default_rng(seed)
    q = vectors[rng.choice(len(vectors), min(queries, len(vectors)), replace=False)]
    _, truth = exact_index(vectors).search(q, k)
    _, got = index.search(q, k)
    hits = sum(len(set(t) & set(g)) for t, g in zip(truth, got))
    return hits / truth.size, len(q)


def _tune_hnsw(index, vectors: np.ndarray, target: float) -> dict:
    """Raise efSearch until recall@10 on a sample reaches ``target`` (or 1024); say what was measured."""
    ef = 16
    while True:
        index.hnsw.efSearch = ef
        t = time.perf_counter()
        recall, nq = recall_at_10(index, vectors)
        if recall >= target or ef >= 1024:
            return {"ef_search": ef, "recall_at_10": round(recall, 4), "recall_queries": nq,
                    "recall_measured_s": round(time.perf_counter() - t, 3)}
        ef *= 2


def make_index(vectors: np.ndarray, approximate_above: int = APPROXIMATE_ABOVE,
               recall_target: float = RECALL_TARGET) -> tuple[object, dict]:
    """Vectors [N, D] -> (faiss index, what it is): IndexFlatIP up to ``approximate_above`` vectors,
    IndexHNSWFlat (inner product) above, with efSearch tuned to ``recall_target`` and the recall stated."""
    faiss = optional("faiss", "the similarity index (tuneflow index, similar, serve --index)")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) <= approximate_above:
        return exact_index(vectors), {"kind": "exact", "faiss": "IndexFlatIP"}
    index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(vectors)
    return index, {"kind": "approximate", "faiss": f"IndexHNSWFlat(M={HNSW_M}, efConstruction={HNSW_EF_CONSTRUCTION})",
                   "recall_target": recall_target, **_tune_hnsw(index, vectors, recall_target)}


def _stored_vectors(index) -> np.ndarray:
    return index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d), np.float32)


def build_index(run, gallery, out, *, checkpoint: str = "best", layer: str = "pooled",
                normalize: bool = True, approximate_above: int = APPROXIMATE_ABOVE,
                batch_size: int | None = None, progress: bool = False, strict: bool = False):
    """Embed the gallery's images with a run and write an index folder -> (Index, skipped files)."""
    predictor = load_predictor(run, checkpoint)
    result = embed_files(predictor, list_images(gallery), layer=layer, normalize=normalize,
                         batch_size=batch_size, progress=progress, strict=strict)
    if not result.paths:
        raise DataError(f"no readable image in {', '.join(map(str, gallery))}; nothing to index.")
    faiss_index, kind = make_index(result.vectors, approximate_above)
    meta = {"run": str(Path(run).resolve()), "checkpoint": checkpoint, "layer": layer,
            "normalize": normalize, "approximate_above": approximate_above, **kind,
            "backbone": predictor.info.get("backbone"), "tuneflow_version": predictor.info.get("tuneflow_version")}
    index = Index(faiss_index, list(result.paths), meta)
    index.save(out)
    return index, result.skipped


def add_to_index(index_dir, images, *, batch_size: int | None = None, progress: bool = False, strict: bool = False):
    """Embed more images with the run, checkpoint and layer the index was built with and add them
    in place (no rebuild); images already in the index are left out -> (Index, added, skipped)."""
    index = load_index(index_dir)
    meta = index.meta
    known = set(index.paths)
    new = [p for p in list_images(images) if str(p) not in known]
    predictor = load_predictor(meta["run"], meta["checkpoint"])
    result = embed_files(predictor, new, layer=meta["layer"], normalize=meta["normalize"],
                         batch_size=batch_size, progress=progress, strict=strict)
    if result.vectors.shape[1:] != (index.dim,):
        raise RunError(f"the run now embeds {result.vectors.shape[1]}-d vectors, the index holds {index.dim}-d; "
                       "rebuild the index with `tuneflow index`.")
    if result.paths:
        index.faiss_index.add(np.ascontiguousarray(result.vectors, dtype=np.float32))
        index.paths.extend(result.paths)
        if meta.get("kind") == "approximate":
            meta.update(_tune_hnsw(index.faiss_index, _stored_vectors(index.faiss_index),
                                   meta.get("recall_target", RECALL_TARGET)))
        index.save(index_dir, keep_thumbnails=True)
    return index, len(result.paths), result.skipped


def similar(index_dir, images, k: int = 5) -> list[list[dict]]:
    """Embed query images with the index's own run and settings -> per image, its ``k`` nearest."""
    index = load_index(index_dir)
    predictor = load_predictor(index.meta["run"], index.meta["checkpoint"])
    result = embed_files(predictor, [Path(p) for p in images], layer=index.meta["layer"],
                         normalize=index.meta["normalize"], strict=True)
    return index.search(result.vectors, k)


def cli_index(args) -> int:
    """``tuneflow index RUN GALLERY... --out INDEX_DIR`` or ``tuneflow index --add INDEX_DIR IMAGES...``."""
    import sys
    if args.add:
        index, added, skipped = add_to_index(args.source, args.images, batch_size=args.batch_size,
                                             progress=not args.no_progress, strict=args.strict)
        what = f"added {added} images to {args.source} ({len(index)} in all)"
    else:
        if not args.out:
            raise DataError("--out INDEX_DIR is required to build an index (or use --add INDEX_DIR IMAGES...).")
        index, skipped = build_index(args.source, args.images, args.out, checkpoint=args.checkpoint,
                                     layer=args.layer, normalize=not args.no_normalize,
                                     approximate_above=args.approximate_above, batch_size=args.batch_size,
                                     progress=not args.no_progress, strict=args.strict)
        what = f"indexed {len(index)} images -> {args.out}"
    for path, why in skipped:
        print(f"tuneflow: skipped {path}: {why}", file=sys.stderr)
    m = index.meta
    kind = (f"approximate {m['faiss']}, recall@10 {m['recall_at_10']} vs exact on {m['recall_queries']} queries"
            if m.get("kind") == "approximate" else "exact inner product")
    print(f"tuneflow: {what} ({index.dim}-d {m['layer']}, {kind}); skipped {len(skipped)} unreadable")
    return 0


def cli_similar(args) -> int:
    """``tuneflow similar INDEX_DIR IMAGE... -k 5``: one block per query, best first."""
    results = similar(args.index, args.images, args.k)
    if args.json:
        print(json.dumps({"results": results}, indent=2))
        return 0
    for image, hits in zip(args.images, results):
        print(image)
        for h in hits:
            print(f"  {h['score']:.4f}  {h['path']}")
    return 0
