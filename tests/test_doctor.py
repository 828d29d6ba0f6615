"""The doctor: quiet on clean data, and each planted fault caught by its own check; top losses."""
import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED, make_image_folder
from tuneflow.cli import main
from tuneflow.data import DataBundle, Split, load_data
from tuneflow.errors import RunError
from tuneflow.runs.pictures import top_losses, top_losses_grid
from tuneflow.workbench.doctor import doctor, label_suspects

FAST = {"input_size": 32, "backbone": "efficientnet_lite0", "precision": "float32"}


def _status(result):
    return {c["name"]: c["status"] for c in result["checks"]}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("doc") / "clean", classes=("a", "b", "c"), per_class=16)


def test_clean_folder_raises_no_fail_and_json_has_the_promised_shape(clean, tmp_path, capsys):
    argv = ["doctor", "--data", str(clean), "--out", str(tmp_path), "--json"]
    for k, v in FAST.items():
        argv += ["--set", f"{k}={v}"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(result) == ["checks", "verdict"]
    assert all(sorted(c) == ["detail", "name", "status"] for c in result["checks"])
    names = {c["name"] for c in result["checks"]}
    assert {"data.class_balance", "data.unreadable", "data.train_val_duplicates", "data.pixel_range",
            "labels.suspects", "model.initial_loss", "model.overfit_one_batch", "model.activations",
            "model.gradient_norms", "model.nan_inf", "model.update_size"} <= names
    assert "fail" not in _status(result).values(), result
    assert _status(result)["model.overfit_one_batch"] == "ok"
    assert "doctor" in (tmp_path / "doctor.md").read_text()


def test_shuffled_labels_fail_the_label_check(clean, tmp_path):
    b = load_data(clean, 32)
    rng = np.random.default_rng(1)
    y = rng.permutation(np.concatenate([b.train.y, b.val.y]))
    n = len(b.train)
    bundle = DataBundle(b.classes, Split(b.train.x, y[:n]), Split(b.val.x, y[n:]), source="shuffled")
    result = doctor(bundle, out=tmp_path, overrides=FAST)
    assert _status(result)["labels.suspects"] == "fail", result["checks"]
    assert (tmp_path / "suspects.png").stat().st_size > 5_000
    assert result["verdict"].startswith("not ready")


def test_labels_flipped_on_disk_are_the_worst_suspects(tmp_path):
    """Images moved into another class's folder (a wrong label on disk) lead the suspects."""
    root = make_image_folder(tmp_path / "flipped", classes=("a", "b", "c"), per_class=20)
    moved = []
    for src, dst in (("a", "b"), ("b", "c"), ("c", "a")):
        f = sorted((root / src).iterdir())[0]
        f.rename(root / dst / f"moved_{f.name}")
        moved.append(f"moved_{f.name}")
    result = doctor(root, out=tmp_path, overrides=FAST)
    check = next(c for c in result["checks"] if c["name"] == "labels.suspects")
    worst = check["detail"].split("worst: ")[1].split(", ")
    assert sorted(worst) == sorted(moved), check
    assert (tmp_path / "suspects.png").stat().st_size > 5_000


def test_label_suspects_flags_the_images_the_probe_doubts():
    """On given probabilities: the two images whose label the probabilities contradict, most
    doubtful first; none on confident, agreeing probabilities."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 30)
    probs = np.full((90, 3), 0.05)
    probs[np.arange(90), y] = 0.9 + rng.uniform(-0.05, 0.05, 90)
    assert len(label_suspects(probs / probs.sum(1, keepdims=True), y)) == 0
    probs[4] = [0.03, 0.95, 0.02]  # labelled 0, looks like 1
    probs[70] = [0.97, 0.02, 0.01]  # labelled 2, looks like 0: more doubtful
    assert list(label_suspects(probs / probs.sum(1, keepdims=True), y)) == [70, 4]


def test_duplicates_across_splits_fail(tmp_path):
    root = make_image_folder(tmp_path / "split", per_class=8, split=True)
    for f in sorted((root / "train" / "a").iterdir())[:3]:
        shutil.copy(f, root / "val" / "a" / f"copy_{f.name}")
    result = doctor(root, out=tmp_path, overrides=FAST)
    check = next(c for c in result["checks"] if c["name"] == "data.train_val_duplicates")
    assert check["status"] == "fail" and "copy_a_train_000.png" in check["detail"], check


def test_an_all_zero_image_is_named(tmp_path):
    root = make_image_folder(tmp_path / "zero", per_class=10)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "a" / "blank.png")
    result = doctor(root, out=tmp_path, overrides=FAST)
    check = next(c for c in result["checks"] if c["name"] == "data.pixel_range")
    assert check["status"] == "warn" and "1 all-zero" in check["detail"] and "blank.png" in check["detail"], check


def test_inputs_scaled_0_1_fail(clean, tmp_path):
    b = load_data(clean, 32)
    bundle = DataBundle(b.classes, Split(b.train.x / 255.0, b.train.y), Split(b.val.x / 255.0, b.val.y), source="0..1")
    result = doctor(bundle, out=tmp_path, overrides=FAST)
    check = next(c for c in result["checks"] if c["name"] == "data.pixel_range")
    assert check["status"] == "fail" and "scaled to 0..1" in check["detail"], check


def test_a_learning_rate_100x_too_high_is_flagged(clean, tmp_path):
    ok = doctor(clean, out=tmp_path, overrides={**FAST, "head_solver": "sgd"})
    high = doctor(clean, out=tmp_path, overrides={**FAST, "head_solver": "sgd", "head.lr": 0.1})  # default 1e-3
    assert _status(ok)["model.update_size"] == "ok"
    assert _status(high)["model.update_size"] == "warn", high["checks"]
    assert any("lr" in t for t in high["next"])


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("name", ["ants_bees", "cats_dogs"])
def test_clean_real_data_raises_no_fail(tmp_path, name):
    if not (SHARED / name).exists():
        pytest.skip(f"{SHARED / name} is absent")
    result = doctor(SHARED / name, out=tmp_path, overrides={"precision": "float32"})
    assert "fail" not in _status(result).values(), result["checks"]


def test_top_losses_ranks_by_the_true_class_probability(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=3)
    files = sorted(str(p) for p in root.rglob("*.png"))
    p_true = [0.9, 0.05, 0.6, 0.3, 0.99, 0.2]
    with open(tmp_path / "val_predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true_class", "predicted_class", "probability", "p_a", "p_b"])
        for path, p in zip(files, p_true):
            true = "a" if "/a/" in path else "b"
            pa = p if true == "a" else 1 - p
            w.writerow([path, true, "a" if pa >= 0.5 else "b", max(pa, 1 - pa), pa, 1 - pa])
    rows = top_losses(tmp_path / "val_predictions.csv", n=3)
    assert [r["p_true"] for r in rows] == pytest.approx([0.05, 0.2, 0.3])
    png = top_losses_grid(tmp_path, n=4)
    assert png == tmp_path / "top_losses.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(RunError, match="val_predictions.csv"):
        top_losses_grid(tmp_path / "imgs")


def test_image_grid_title_clears_the_captions():
    """top_losses.png and suspects.png: the figure title and the three-line captions under it do
    not touch (a gap of at least 2 px), nor do captions run into the row above."""
    from tuneflow.runs.pictures import grid_figure
    images = [np.full((160, 160, 3), 120, np.uint8)] * 16
    captions = [f"{i:06d}_0123456789abcdef.jpg\ntrue ants (0.10) pred bees (0.90)\nloss 2.26" for i in range(16)]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = grid_figure(images, captions, "Top losses: the 16 validation images the model is most wrong about")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    caps = [ax.title.get_window_extent(renderer) for ax in fig.axes]
    assert all(title.y0 - c.y1 >= 2 for c in caps), (title, max(c.y1 for c in caps))
    images_box = [ax.get_window_extent(renderer) for ax in fig.axes]
    for c in caps:
        assert not any(c.overlaps(im) for im in images_box), c
