"""tuneflow.index: exact and HNSW faiss indexes, recall stated and measured, --add without rebuild, gallery self-match."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from tuneflow.errors import RunError
from tuneflow.index import Index, load_index, make_index, recall_at_10


def _clustered(n, dim=64, clusters=100, seed=0):
    """Unit vectors around 100 fixed centres, like image embeddings (near neighbours exist and
    matter); ``seed`` draws other members of the same clusters."""
    centres = np.random.default_rng(12345).normal(size=(clusters, dim))
    rng = np.random.default_rng(seed)
    v = centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_approximate_index_recall_at_10_on_10k_vectors():
    vectors = _clustered(10_000)
    index, kind = make_index(vectors, approximate_above=5_000)
    assert kind["kind"] == "approximate" and "HNSW" in kind["faiss"]
    assert kind["recall_at_10"] >= 0.95 and kind["recall_queries"] == 1000
    # measured again on queries the index never held, against exact search
    queries = _clustered(500, seed=1)
    exact, _ = make_index(vectors)
    _, truth = exact.search(queries, 10)
    _, got = index.search(queries, 10)
    recall = np.mean([len(set(t) & set(g)) / 10 for t, g in zip(truth, got)])
    assert recall >= 0.95, recall


def test_exact_index_below_threshold_and_roundtrip(tmp_path):
    vectors = _clustered(300, dim=16)
    fi, kind = make_index(vectors, approximate_above=1000)
    assert kind == {"kind": "exact", "faiss": "IndexFlatIP"}
    assert recall_at_10(fi, vectors)[0] == 1.0
    paths = [f"img{i}.png" for i in range(300)]
    Index(fi, paths, {"layer": "pooled", "normalize": True, **kind}).save(tmp_path / "idx")
    back = load_index(tmp_path / "idx")
    hits = back.search(vectors[[7, 42]], k=3)
    assert [h[0]["path"] for h in hits] == ["img7.png", "img42.png"]
    assert hits[0][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert json.loads((tmp_path / "idx" / "meta.json").read_text())["count"] == 300
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_index_refuses_a_foreign_folder_and_a_damaged_one(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    fi, _ = make_index(_clustered(20, dim=8))
    with pytest.raises(RunError, match="not a tuneflow index"):
        Index(fi, [str(i) for i in range(20)], {}).save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    Index(fi, [str(i) for i in range(20)], {}).save(tmp_path / "idx")
    (tmp_path / "idx" / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(RunError, match="rebuild it"):
        load_index(tmp_path / "idx")


@pytest.mark.slow
def test_gallery_image_finds_itself_and_add_extends_without_rebuild(serving_run, tmp_path):
    from tuneflow.index import add_to_index, build_index, similar
    run, images = serving_run
    gallery = sorted((images / "a").glob("*.png"))[:10] + sorted((images / "b").glob("*.png"))[:10]
    (tmp_path / "g").mkdir()
    for p in gallery:
        os.symlink(p, tmp_path / "g" / p.name)
    index, skipped = build_index(run, [tmp_path / "g"], tmp_path / "idx")
    assert len(index) == 20 and not skipped and index.meta["kind"] == "exact"
    query = tmp_path / "g" / gallery[3].name
    best = similar(tmp_path / "idx", [query], k=5)[0]
    assert best[0]["path"] == str(query) and best[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert len(best) == 5 and best[0]["score"] >= best[1]["score"]

    stored = index.faiss_index.reconstruct_n(0, 20)
    new = sorted((images / "c").glob("*.png"))[:5]
    index2, added, _ = add_to_index(tmp_path / "idx", new + [query])  # the query is already there
    assert added == 5 and len(index2) == 25
    np.testing.assert_array_equal(index2.faiss_index.reconstruct_n(0, 20), stored)  # old rows untouched
    # the CLI answers from the extended index: a class-c image finds itself
    out = subprocess.run([sys.executable, "-m", "tuneflow", "similar", str(tmp_path / "idx"), str(new[2]),
                          "-k", "3", "--json"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    hits = json.loads(out.stdout)["results"][0]
    assert hits[0]["path"] == str(new[2]) and len(hits) == 3
    assert len(Path(tmp_path / "idx" / "paths.txt").read_text().splitlines()) == 25


def test_thumbnails_are_made_once_per_item_and_named_by_its_id(tmp_path):
    """Index.save writes a small JPEG per gallery image (thumbs/<id>.jpg, id = the search result's
    row); a grown index keeps the old ones, a rebuilt one makes them again; an unreadable image has none."""
    from PIL import Image
    from tuneflow.index import THUMB_SIZE, THUMBS_DIR
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        p = tmp_path / f"g{i}.png"
        Image.fromarray(rng.integers(0, 256, (300, 200 + 40 * i, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    paths.append(str(tmp_path / "broken.png"))
    vectors = _clustered(6, dim=8)
    fi, kind = make_index(vectors)
    Index(fi, paths, {"layer": "pooled", "normalize": True, **kind}).save(tmp_path / "idx")
    idx = load_index(tmp_path / "idx")
    assert idx.meta["thumbnails"] == 5
    for i in range(5):
        with Image.open(idx.thumbnail(i)) as im:
            assert im.format == "JPEG" and max(im.size) == THUMB_SIZE
    assert idx.thumbnail(5) is None and idx.thumbnail(6) is None and idx.thumbnail(-1) is None
    hits = idx.search(vectors[[3]], k=2)[0]
    assert hits[0]["id"] == 3 and hits[0]["path"] == paths[3]
    idx.faiss_index.add(_clustered(1, dim=8, seed=3))
    idx.paths.append(paths[0])
    idx.save(tmp_path / "idx", keep_thumbnails=True)  # what --add does: the old thumbnails stay
    assert load_index(tmp_path / "idx").meta["thumbnails"] == 6
    assert (tmp_path / "idx" / THUMBS_DIR / "00000006.jpg").is_file()
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(paths[0])
    one, _ = make_index(vectors[:1])
    Index(one, paths[:1], {"layer": "pooled", "normalize": True, **kind}).save(tmp_path / "idx")  # a rebuild
    with Image.open(tmp_path / "idx" / THUMBS_DIR / "00000000.jpg") as im:
        assert im.size == (50, 50)  # made again from the gallery, not copied
    assert not (tmp_path / "idx" / THUMBS_DIR / "00000001.jpg").exists()
