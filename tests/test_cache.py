"""The feature cache (tuneflow.features.cache): reused for the same backbone, weights, size, tap and
data; a new entry when any of them changes."""
from conftest import fast_overrides as _fast
from tuneflow import finetune
from tuneflow.features import cache as fcache


def test_feature_cache_is_reused_and_invalidated(tmp_path, tiny_folder):
    ov = _fast("small_similar")
    finetune("small_similar", tiny_folder, tmp_path / "r1", overrides=ov, verbose=0, export=False)
    n = len(list(fcache.cache_root().glob("*.npy")))
    finetune("small_similar", tiny_folder, tmp_path / "r2", overrides=ov, verbose=0, export=False)
    assert len(list(fcache.cache_root().glob("*.npy"))) == n  # reused
    finetune("small_similar", tiny_folder, tmp_path / "r3", overrides={**ov, "input_size": 40}, verbose=0, export=False)
    assert len(list(fcache.cache_root().glob("*.npy"))) == n + 2  # new size -> new train+val entries
    base = dict(backbone="b", weights="w", size=32, tap=None, data="d")
    k = fcache.cache_key(**base)
    for field, value in [("backbone", "c"), ("weights", "v"), ("size", 40), ("tap", "x"), ("data", "e")]:
        assert fcache.cache_key(**{**base, field: value}) != k
    from tuneflow.data import load_data
    b = load_data(tiny_folder, 32)
    f0 = b.fingerprint()
    b.train.x[0, 0, 0, 0] ^= 1
    assert b.fingerprint() != f0
