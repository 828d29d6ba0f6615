"""Shared test set-up: quiet TensorFlow, a private weights cache, small image folders."""
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("PYTHONHASHSEED", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


def make_image_folder(root: Path, classes=("a", "b"), per_class=8, size=40, split=False,
                      seed=0, mode="RGB") -> Path:
    """Class folders of synthetic images whose class is visible (a colour and a shape per class)."""
    rng = np.random.default_rng(seed)
    palette = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 200, 30), (160, 40, 200)]
    splits = ("train", "val") if split else ("",)
    for sp in splits:
        for ci, cls in enumerate(classes):
            d = root / sp / cls if sp else root / cls
            d.mkdir(parents=True, exist_ok=True)
            n = per_class if not isinstance(per_class, dict) else per_class[cls]
            for i in range(n):
                img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
                c = palette[ci % len(palette)]
                lo, hi = size // 4 + rng.integers(-3, 4), 3 * size // 4 + rng.integers(-3, 4)
                if ci % 2:
                    img[lo:hi, lo:hi] = c
                else:
                    yy, xx = np.mgrid[:size, :size]
                    img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2] = c
                Image.fromarray(img).convert(mode).save(d / f"{cls}_{sp or 'x'}_{i:03d}.png")
    return root


@pytest.fixture(scope="session", autouse=True)
def _private_home(tmp_path_factory):
    """Keep converted weights and caches out of the user's home, shared across the session."""
    home = tmp_path_factory.mktemp("tuneflow_home")
    os.environ["TUNEFLOW_HOME"] = str(home)
    return home


@pytest.fixture
def tiny_folder(tmp_path):
    return make_image_folder(tmp_path / "tiny")
