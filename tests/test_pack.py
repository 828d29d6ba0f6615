"""tuneflow pack (tuneflow.data.pack): a packed folder loads as the folder's own bundle."""

import numpy as np
import pytest

from conftest import make_image_folder, truncated_jpeg
from tuneflow.data import DataError, load_data
from tuneflow.data.pack import is_packed, load_packed, pack
from tuneflow.data.sources import load_folder


@pytest.mark.parametrize("split", [False, True])
def test_pack_then_load_gives_the_folders_bundle(tmp_path, monkeypatch, split):
    root = make_image_folder(tmp_path / "d", per_class=9, size=20, split=split)
    bad = (root / "train" if split else root) / "b" / "b_zz.jpg"
    truncated_jpeg(bad)
    shards = tmp_path / "shards"
    meta = pack(root, shards, shard_bytes=4000)  # several shards per split
    assert is_packed(shards) and not is_packed(root)
    assert len(meta["splits"]["train"]["shards"]) > 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
    for threshold in ("1", str(10**12)):  # into the store, and into RAM
        monkeypatch.setenv("TUNEFLOW_INMEMORY_MAX_BYTES", threshold)
        want = load_folder(root, 24)
        got = load_data(str(shards), 24)
        assert got.classes == want.classes and got.fingerprint() == want.fingerprint()
        for name in ("train", "val"):
            a, b = getattr(want, name), getattr(got, name)
            np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))
            assert a.files == b.files
        assert [s for s in got.skipped if s.startswith(str(bad))]
    sub = load_packed(shards, 24, classes=["a", "b"], fraction=0.5, seed=1)
    ref = load_data(root, 24, classes=["a", "b"], fraction=0.5, seed=1)
    assert sub.train.files == ref.train.files and sub.val.files == ref.val.files
    with pytest.raises(DataError, match="not an empty folder"):
        pack(root, shards)


def test_pack_cli(tmp_path):
    from tuneflow.cli import main
    root = make_image_folder(tmp_path / "d", per_class=4, size=16, classes=("a", "b", "c"))
    assert main(["pack", str(root), "--out", str(tmp_path / "s"), "--classes", "a,c"]) == 0
    assert load_data(str(tmp_path / "s"), 16).classes == ["a", "c"]
    assert main(["pack", str(root), "--out", str(tmp_path / "s")]) == 2  # refuses a non-empty folder
