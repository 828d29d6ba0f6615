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


def truncated_jpeg(path: Path, size=40):
    """A JPEG whose header reads fine and whose data stops half way: fails only while decoding."""
    import io
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    path.write_bytes(data[:len(data) // 2])
    with Image.open(path) as im:  # the header alone is valid
        assert im.size == (size, size)


@pytest.fixture(scope="session", autouse=True)
def _private_home(tmp_path_factory):
    """Keep converted weights and caches out of the user's home, shared across the session."""
    home = tmp_path_factory.mktemp("tuneflow_home")
    os.environ["TUNEFLOW_HOME"] = str(home)
    return home


@pytest.fixture
def on_disk(monkeypatch):
    """Every dataset goes to the memory-mapped store (threshold: 1 byte)."""
    monkeypatch.setenv("TUNEFLOW_INMEMORY_MAX_BYTES", "1")


@pytest.fixture
def tiny_folder(tmp_path):
    return make_image_folder(tmp_path / "tiny")


def fast_overrides(recipe_name: str, **extra) -> dict:
    """Overrides for a quick run of a recipe: Lite0 with random weights (``random_lite0_weights``)
    at 32 px, batch 8, float32, one epoch a stage; ``extra`` added last."""
    import tuneflow.recipes as registry
    kw = {"input_size": 32, "backbone": "efficientnet_lite0", "weights": random_lite0_weights(),
          "batch_size": 8, "precision": "float32"}
    kw.update({f"{s.name}__epochs": 1 for s in registry.get(recipe_name).stages})
    kw.update(extra)
    return kw


def random_lite0_weights() -> str:
    """A Lite0 weights file with random values, made once per checkout (shared with child processes).

    Tests that exercise frozen backbones use it: ``weights=None`` means training from scratch
    (every layer trains), which is another code path and much slower."""
    import hashlib
    import tempfile
    tag = hashlib.sha1(str(REPO).encode()).hexdigest()[:10]
    folder = Path(tempfile.gettempdir()) / f"tuneflow-tests-{tag}" / "random_lite0"
    target = folder / "backbone.weights.h5"
    if not target.exists():
        from tuneflow import build_backbone, save_backbone
        import keras
        keras.utils.set_random_seed(0)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent if folder.parent.exists() else None))
        folder.parent.mkdir(parents=True, exist_ok=True)
        save_backbone(build_backbone("efficientnet_lite0", weights=None, input_size=32), tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process made it first
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


@pytest.fixture(scope="session")
def serving_run(tmp_path_factory):
    """One small real run, shared by the serving tests (embed, index, serve, export) (Lite0 ImageNet
    weights, 64 px): made once per `make test`, by whichever test process asks first (the others
    wait on a lock and read it; nobody writes into it)."""
    import fcntl
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the folder the workers of one session share
    base = base / "serving_run"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (base / "run" / "model" / "saved_model.pb").exists():
            import tuneflow
            folder = make_image_folder(base / "images", classes=("a", "b", "c"), per_class=30, size=48)
            tuneflow.finetune("small_similar", str(folder), str(base / "run"),
                              overrides={"input_size": 64, "backbone": "efficientnet_lite0", "head.epochs": 2}, verbose=0, overwrite=True)
    return base / "run", base / "images"


def pytest_collection_modifyitems(config, items):
    """Files with the most slow tests run first, each file's tests kept together and in order:
    `make test` hands whole files to two processes in this order (xdist --dist loadfile), so the
    long files start at once and the short ones fill the end, instead of one long file last."""
    slow, first = {}, {}
    for i, item in enumerate(items):
        path = item.nodeid.split("::")[0]
        first.setdefault(path, i)
        slow[path] = slow.get(path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: (-slow[item.nodeid.split("::")[0]], first[item.nodeid.split("::")[0]]))
