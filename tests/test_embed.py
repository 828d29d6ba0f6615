"""tuneflow embed: output formats written atomically, unreadable files skipped or --strict, and parity in-process vs CLI vs the SavedModel without tuneflow, batch 1 vs 64."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, make_image_folder
from tuneflow.errors import DataError
from tuneflow.export.embed import Embeddings, embed_files, list_images, read_embeddings, write_embeddings


class FakePredictor:
    """Only for the pipeline's bookkeeping: an image's embedding is its mean colour."""
    embedding_dim = 3

    def decode(self, item, max_pixels=None):
        from tuneflow.imageops import decode_pixels
        return decode_pixels(item, max_pixels=max_pixels)

    def prepare(self, images):
        return np.stack([im[:4, :4].astype(np.float32) for im in images])

    def embed_prepared(self, batch, layer="pooled", normalize=True):
        return batch.mean(axis=(1, 2))


@pytest.mark.parametrize("suffix", [".npy", ".parquet", ".csv"])
def test_write_and_read_back_every_format(tmp_path, suffix):
    v = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    paths = [f"dir/img{i}.png" for i in range(5)]
    written = write_embeddings(Embeddings(paths, v), tmp_path / f"e{suffix}")
    back_paths, back = read_embeddings(tmp_path / f"e{suffix}")
    assert back_paths == paths
    np.testing.assert_array_equal(back, v)  # exact: csv keeps 9 significant digits
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # no temp files
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        t = pq.read_table(tmp_path / "e.parquet")
        assert t.column_names == ["path", "embedding"]
        assert json.loads(t.schema.metadata[b"tuneflow"])["dim"] == 7


def test_write_is_atomic_and_refuses_unknown_suffix(tmp_path, monkeypatch):
    (tmp_path / "e.npy").write_bytes(b"old")
    monkeypatch.setattr(np, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_embeddings(Embeddings(["a"], np.zeros((1, 2), np.float32)), tmp_path / "e.npy")
    assert [p.name for p in tmp_path.iterdir()] == ["e.npy"] and (tmp_path / "e.npy").read_bytes() == b"old"
    with pytest.raises(DataError, match=".parquet"):
        write_embeddings(Embeddings(["a"], np.zeros((1, 2), np.float32)), tmp_path / "e.txt")


def test_pipeline_keeps_order_skips_unreadable_and_strict_stops(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=7, size=16)
    (folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    (folder / "notes.txt").write_text("not an image, not listed")
    paths = list_images([folder])
    assert len(paths) == 15 and all(p.suffix == ".png" for p in paths)
    r = embed_files(FakePredictor(), paths, batch_size=4)
    assert r.paths == [str(p) for p in paths if p.name != "broken.png"]
    assert [s[0] for s in r.skipped] == [str(folder / "a" / "broken.png")]
    ref = FakePredictor()
    expected = np.stack([ref.embed_prepared(ref.prepare([ref.decode(p)]))[0] for p in r.paths])
    np.testing.assert_array_equal(r.vectors, expected)
    with pytest.raises(DataError, match="broken.png"):
        embed_files(FakePredictor(), paths, batch_size=4, strict=True)
    with pytest.raises(DataError, match="no such file"):
        list_images([tmp_path / "missing"])


# Loads the SavedModel in a process where `import tuneflow` fails, and embeds encoded files with
# its `embed` signature (decoding in the graph).
WITHOUT_TUNEFLOW = r"""
import sys
sys.modules["tuneflow"] = None
try:
    import tuneflow
    raise SystemExit("tuneflow is importable")
except ImportError:
    pass
import numpy as np, tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
paths = open(sys.argv[2]).read().splitlines()
out = model.signatures["embed"](images=tf.constant([open(p, "rb").read() for p in paths]))
np.save(sys.argv[3], out["embedding"].numpy())
"""


@pytest.mark.slow
def test_embedding_parity_in_process_cli_savedmodel_and_batch_sizes(serving_run, tmp_path):
    import tuneflow
    run, _ = serving_run
    with open(run / "val_predictions.csv", newline="") as f:
        val = [Path(r["path"]) for r in csv.DictReader(f)][:200]
    predictor = tuneflow.load(run)
    ref = predictor.embed(val)
    assert ref.shape == (len(val), predictor.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1.0, atol=1e-5)
    for bs in (1, 64):
        r = embed_files(predictor, val, batch_size=bs)
        assert np.abs(r.vectors - ref).max() <= 1e-5, bs

    # the CLI on a folder of the validation images plus a broken one: skipped and named, exit 0
    q = tmp_path / "q"
    q.mkdir()
    for i, p in enumerate(val):
        (q / f"{i:03d}{p.suffix}").write_bytes(p.read_bytes())
    (q / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    cmd = [sys.executable, "-m", "tuneflow", "embed", str(run), str(q), "--no-progress"]
    out = subprocess.run(cmd + ["--out", str(tmp_path / "e.parquet")], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "zz_broken.jpg" in out.stderr and "skipped 1 unreadable file" in out.stdout
    paths, cli = read_embeddings(tmp_path / "e.parquet")
    assert [Path(p).name for p in paths] == sorted(f.name for f in q.iterdir() if f.name != "zz_broken.jpg")
    assert np.abs(cli - ref).max() <= 1e-5

    # --strict: the broken file fails the command and nothing is written
    out = subprocess.run(cmd + ["--out", str(tmp_path / "s.npy"), "--strict"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode != 0 and "zz_broken.jpg" in out.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("s.") or p.name.startswith(".s.")]

    # the SavedModel alone, in a process that cannot import tuneflow
    (tmp_path / "list.txt").write_text("\n".join(map(str, val)))
    out = subprocess.run([sys.executable, "-c", WITHOUT_TUNEFLOW, str(run / "model"), str(tmp_path / "list.txt"),
                          str(tmp_path / "sm.npy")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert np.abs(np.load(tmp_path / "sm.npy") - ref).max() <= 1e-5
