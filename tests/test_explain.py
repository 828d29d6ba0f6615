"""Grad-CAM (tuneflow.export.explain): the map follows the evidence, works on every backbone, and `tuneflow explain` writes its pictures."""
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from tuneflow.backbones import BACKBONES
from tuneflow.errors import DataError, RunError

SIZE = 256  # an 8 x 8 feature grid at Lite0's stride 32: each quadrant is 4 x 4 cells


def pasted(cls: int, quadrant: int, rng) -> np.ndarray:
    """A blank canvas with the class object (0: a red disk, 1: a blue square) in one quadrant
    (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right), jittered a little."""
    img = np.full((SIZE, SIZE, 3), 235, np.uint8)
    r = SIZE // 9
    cy = (quadrant // 2) * SIZE // 2 + SIZE // 4 + int(rng.integers(-8, 9))
    cx = (quadrant % 2) * SIZE // 2 + SIZE // 4 + int(rng.integers(-8, 9))
    if cls == 0:
        yy, xx = np.mgrid[:SIZE, :SIZE]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (200, 30, 30)
    else:
        img[cy - r:cy + r, cx - r:cx + r] = (30, 50, 200)
    return img


def quadrant_share(grid: np.ndarray, quadrant: int) -> float:
    h, w = grid.shape[0] // 2, grid.shape[1] // 2
    q = grid[(quadrant // 2) * h:(quadrant // 2 + 1) * h, (quadrant % 2) * w:(quadrant % 2 + 1) * w]
    return float(q.sum() / max(grid.sum(), 1e-12))


@pytest.fixture(scope="module")
def quadrant_run(tmp_path_factory):
    """A run trained on pasted objects (ImageNet Lite0 features, a linear head): 24 images a class."""
    import tuneflow
    base = tmp_path_factory.mktemp("quadrants")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("disk", "square")):
        (base / "images" / name).mkdir(parents=True)
        for i in range(24):
            Image.fromarray(pasted(c, i % 4, rng)).save(base / "images" / name / f"{i}.png")
    tuneflow.finetune("small_similar", str(base / "images"), str(base / "run"),
                      overrides={"input_size": SIZE, "backbone": "efficientnet_lite0", "head.epochs": 3}, verbose=0, overwrite=True)
    return base / "run"


@pytest.mark.slow
def test_heatmap_mass_lies_in_the_quadrant_holding_the_object(quadrant_run):
    from tuneflow.export.explain import Explainer
    ex = Explainer.from_run(quadrant_run)
    rng = np.random.default_rng(1)
    cases = [(k % 2, (k // 2) % 4) for k in range(16)]  # every class in every quadrant, twice
    batch = ex.prepare([pasted(c, q, rng) for c, q in cases])
    e = ex.explain(batch, classes=[c for c, _ in cases])
    assert e.grids.shape == (16, SIZE // 32, SIZE // 32)
    assert e.grids.min() >= 0 and np.allclose(e.grids.max(axis=(1, 2)), 1.0)
    shares = np.array([quadrant_share(g, q) for g, (_, q) in zip(e.grids, cases)])
    # chance is 0.25: a map blind to where the object is would put a quarter in each quadrant
    assert shares.mean() > 0.6 and shares.min() > 0.4, shares.round(3)
    peaks = [np.unravel_index(g.argmax(), g.shape) for g in e.grids]
    assert all(quadrant_share(np.eye(1, g.size, g.shape[1] * r + c).reshape(g.shape), q) == 1.0
               for g, (r, c), (_, q) in zip(e.grids, peaks, cases))  # the strongest cell is in the quadrant
    # explaining the default (predicted) class gives the same as naming it: the model is right here
    assert (e.probabilities.argmax(1) == [c for c, _ in cases]).all()
    np.testing.assert_allclose(ex.explain(batch).grids, e.grids, atol=1e-6)


def test_top_losses_png_shows_each_image_beside_its_heatmap(quadrant_run):
    from tuneflow.runs.pictures import top_losses
    rows = top_losses(quadrant_run / "val_predictions.csv")
    with Image.open(quadrant_run / "top_losses.png") as im:
        assert im.size[0] == round(2.6 * 3 * 2.0 * 90)  # three double-width tiles a row: image | heatmap
        px = np.asarray(im.convert("RGB"))
    # the first tile's right half is the heatmap over the pasted canvas: coloured, where the image is grey
    assert len(rows) >= 1 and (px.max(axis=2).astype(int) - px.min(axis=2) > 100).mean() > 0.05


def test_explainer_agrees_with_the_exported_model_and_names_bad_classes(quadrant_run):
    import tuneflow
    from tuneflow.export.explain import Explainer
    ex = Explainer.from_run(quadrant_run)
    batch = ex.prepare([pasted(1, 2, np.random.default_rng(3))])
    probs = tuneflow.load(quadrant_run).classify_prepared(batch)
    np.testing.assert_allclose(ex.explain(batch).probabilities, probs, atol=1e-5)
    with pytest.raises(DataError, match=r"class 'cat' is not one of this model's classes \(disk, square\)"):
        ex.explain(batch, classes=["cat"])
    with pytest.raises(RunError, match="holds no exported model"):
        Explainer.from_run(quadrant_run / "checkpoints")


def test_explain_cli_writes_one_overlay_png_per_image(quadrant_run, tmp_path):
    rng = np.random.default_rng(4)
    for i, (c, q) in enumerate([(0, 1), (1, 3)]):
        Image.fromarray(pasted(c, q, rng)).save(tmp_path / f"img{i}.png")
    out = tmp_path / "explained"
    r = subprocess.run([sys.executable, "-m", "tuneflow", "explain", str(quadrant_run), str(tmp_path / "img0.png"),
                        str(tmp_path / "img1.png"), "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["img0.explain.png", "img1.explain.png"]
    with Image.open(files[0]) as im:
        assert im.size[0] > 500 and im.size[1] > 200  # image, overlay, bars side by side
    r = subprocess.run([sys.executable, "-m", "tuneflow", "explain", str(quadrant_run), str(tmp_path / "none.png"),
                        "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "none.png: no such file or folder" in r.stderr


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_gradcam_runs_on_every_backbone(name):
    """Each registry backbone (random weights, 64 px) in an artifact's shape: a map per image over
    its last block's grid, non-negative, peak 1 (or all zero), and the softmax the classifier gives."""
    from tuneflow.backbones import build_backbone, get_spec
    from tuneflow.export.artifact import ArtifactInfo, ArtifactModels
    from tuneflow.export.explain import Explainer
    keras.utils.set_random_seed(0)
    size = max(64, get_spec(name).min_size)
    backbone = build_backbone(name, weights=None, input_size=size)
    features = keras.Model(backbone.input, backbone.output, name="features")
    head = keras.Sequential([keras.Input(features.output.shape[1:]), keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(3, activation="softmax")])
    info = ArtifactInfo(classes=["a", "b", "c"], input_size=size, resize="crop", backbone=name, recipe="t",
                        tap=None, embedding_dim=int(features.output.shape[-1]), penultimate_dim=int(features.output.shape[-1]))
    models = ArtifactModels(features, head, info)
    ex = Explainer(models.classifier, info)
    x = np.random.default_rng(0).integers(0, 256, (2, size, size, 3)).astype(np.float32)
    e = ex.explain(x, classes=[0, 2])
    grid = features.output.shape[1:3]
    assert e.grids.shape == (2, *grid) and np.isfinite(e.grids).all() and e.grids.min() >= 0
    assert all(g.max() == pytest.approx(1.0) or g.max() == 0 for g in e.grids)
    np.testing.assert_allclose(e.probabilities, models.classifier(x.astype(np.uint8)), atol=1e-4)
