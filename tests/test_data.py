import numpy as np
import pytest
from PIL import Image

from conftest import make_image_folder
from tuneflow.data import DataError, kfold, load_data, split_fraction
from tuneflow.data.augment import PRESETS, make_augmenter, preview
from tuneflow.data.pipeline import class_weights, eval_dataset, train_dataset


def test_mixed_folder_corrupt_gray_rgba_nonimage(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=6)
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "a" / "notes.txt").write_text("not an image")
    Image.fromarray(np.full((30, 20), 128, np.uint8), "L").save(root / "b" / "gray.png")
    rgba = np.zeros((25, 25, 4), np.uint8)
    rgba[..., 0] = 255
    Image.fromarray(rgba, "RGBA").save(root / "b" / "transparent.png")  # alpha 0 -> white
    # EXIF orientation: a 20x10 image rotated by its tag must come out 10 wide, 20 tall
    im = Image.new("RGB", (20, 10), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 10))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(root / "a" / "rotated.jpg", exif=exif)
    b = load_data(root, 16, val_fraction=0.3)
    assert len(b.skipped) == 1 and "broken.jpg" in b.skipped[0]
    files = b.train.files + b.val.files
    assert not any(f.endswith(".txt") for f in files)
    both = np.concatenate([b.train.x, b.val.x])
    assert both.shape[1:] == (16, 16, 3) and both.dtype == np.uint8
    i = files.index(str(root / "b" / "transparent.png"))
    assert both[i].min() >= 250  # composited on white, RGB
    i = files.index(str(root / "a" / "rotated.jpg"))
    from tuneflow.data import decode_image
    raw = decode_image(root / "a" / "rotated.jpg", 20)
    assert raw[0, 15, 0] > 150 and raw[19, 15, 2] > 150  # red ends on top after the turn


def test_resize_crop_keeps_the_aspect_ratio_and_squash_keeps_the_frame(tmp_path):
    from tuneflow.data import decode_image
    im = np.zeros((10, 30, 3), np.uint8)  # a wide image: red | green | blue thirds
    im[:, :10, 0] = im[:, 10:20, 1] = im[:, 20:, 2] = 255
    Image.fromarray(im).save(tmp_path / "wide.png")
    crop = decode_image(tmp_path / "wide.png", 10, "crop")
    squash = decode_image(tmp_path / "wide.png", 10, "squash")
    assert crop.shape == squash.shape == (10, 10, 3)
    assert (crop[:, 1:-1, 1] > 200).all() and crop[:, 1:-1, [0, 2]].max() < 60  # only the centre
    assert squash[5, 0, 0] > 200 and squash[5, 5, 1] > 200 and squash[5, 9, 2] > 200  # all thirds
    arrays = load_data((np.stack([im] * 4), np.array([0, 1, 0, 1])), 10, resize="squash")
    assert arrays.train.x.shape[1:] == (10, 10, 3)
    with pytest.raises(DataError, match="resize='zoom' is not a resize mode; choose one of crop, squash"):
        load_data(tmp_path, 10, resize="zoom")


def test_hash_split_is_deterministic_and_stable_when_files_are_added(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=20)
    first = load_data(root, 16)
    make_image_folder(tmp_path / "more", per_class=5, seed=9)
    for p in (tmp_path / "more").rglob("*.png"):
        p.rename(root / p.parent.name / ("new_" + p.name))
    second = load_data(root, 16)
    assert set(first.val.files) <= set(second.val.files)
    assert set(first.train.files) <= set(second.train.files)
    assert 0 <= split_fraction("a/x.png") < 1


def test_explicit_splits_and_test_split(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=4, split=True)
    make_image_folder(tmp_path / "d" / "test", per_class=2)
    b = load_data(root, 16)
    assert len(b.train) == 8 and len(b.val) == 8 and len(b.test) == 4


@pytest.mark.parametrize("build, msg", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "holds no class folders"),
    (lambda p: make_image_folder(p / "one", classes=("only",)), "single class"),
    (lambda p: [(p / "e" / c).mkdir(parents=True) for c in "ab"] and p / "e", "hold no images"),
])
def test_bad_folders_explain_themselves(tmp_path, build, msg):
    with pytest.raises(DataError, match=msg):
        load_data(build(tmp_path), 16)


def test_classes_differing_between_splits(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=3, split=True)
    make_image_folder(tmp_path / "x", classes=("zebra",), per_class=2)
    (tmp_path / "x" / "zebra").rename(root / "val" / "zebra")
    with pytest.raises(DataError, match=r"\['zebra'\] appear in .*val"):
        load_data(root, 16)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_fraction_outside_unit_interval(tmp_path, fraction):
    with pytest.raises(DataError, match="must be in"):
        load_data(make_image_folder(tmp_path / "d"), 16, fraction=fraction)


def test_subsampling_fraction_and_classes(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=20)
    b = load_data(root, 16, fraction=0.5, classes=("a", "c"))
    assert b.classes == ["a", "c"] and set(np.unique(b.train.y)) == {0, 1}
    full = load_data(root, 16)
    assert len(b.train) < 0.4 * len(full.train)
    with pytest.raises(DataError, match="not in the data"):
        load_data(root, 16, classes=("a", "zebra"))


def test_arrays_grayscale_and_unit_scaled():
    x = np.random.default_rng(0).uniform(0, 1, (30, 20, 20))
    y = np.arange(30) % 3
    with pytest.warns(UserWarning, match="0..1"):
        b = load_data((x, y), 16)
    assert b.train.x.shape[1:] == (16, 16, 3) and len(b.train) + len(b.val) == 30
    with pytest.raises(DataError, match="single class"):
        load_data((x, np.zeros(30)), 16)


def test_leaks_between_train_and_val_are_reported(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=3, split=True)
    src = next((root / "train" / "a").glob("*.png"))
    (root / "val" / "a" / "copy.png").write_bytes(src.read_bytes())
    b = load_data(root, 16)
    assert any(k == "identical bytes" and a == str(src) for a, _, k in b.leaks)


def test_kfold_partitions_and_reports_bad_k(tmp_path):
    b = load_data(make_image_folder(tmp_path / "d", per_class=10), 16)
    folds = list(kfold(b, 5))
    total = len(b.train) + len(b.val)
    assert len(folds) == 5 and sum(len(f.val) for f in folds) == total
    with pytest.raises(DataError, match="smallest class"):
        list(kfold(b, 50))


def test_class_weights_and_balanced_sampling():
    y = np.array([0] * 90 + [1] * 10)
    w = class_weights(y, 2, "balanced")
    np.testing.assert_allclose(w, [100 / 180, 100 / 20])
    from tuneflow.data import Split
    split = Split(np.zeros((100, 8, 8, 3), np.uint8), y)
    ds = train_dataset(split, 50, sampling="balanced", weights=w)
    labels = np.concatenate([b[1].numpy() for b in ds])
    assert len(labels) == 100 and 35 < labels.sum() < 65  # ~half minority after oversampling
    xb, yb, wb = next(iter(ds))
    np.testing.assert_allclose(wb.numpy(), w[yb.numpy()])


@pytest.mark.parametrize("backend", ["keras", "albumentations"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_change_training_images_only(backend, preset):
    from tuneflow.data import Split
    x = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3)).astype(np.uint8)
    split = Split(x, np.arange(8) % 2)
    xa, _ = next(iter(train_dataset(split, 8, augment=preset, backend=backend)))
    assert xa.shape == (8, 32, 32, 3) and xa.dtype.name == "float32"
    changed = not np.allclose(np.sort(xa.numpy().ravel()), np.sort(x.astype(np.float32).ravel()))
    assert changed == (preset != "none") or preset == "light"  # light may flip only
    xv, _ = next(iter(eval_dataset(split, 8)))
    np.testing.assert_array_equal(xv.numpy(), x.astype(np.float32))


def test_unknown_preset_and_backend():
    with pytest.raises(ValueError, match="Unknown augmentation preset 'wild'"):
        make_augmenter("wild", "keras", 32)
    with pytest.raises(ValueError, match="backend 'torchvision'"):
        make_augmenter("light", "torchvision", 32)


def test_custom_albumentations_compose_and_preview_png(tmp_path):
    import albumentations as A
    x = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3)).astype(np.uint8)
    fn = make_augmenter(A.Compose([A.VerticalFlip(p=1.0)]), "albumentations", 32)
    np.testing.assert_array_equal(np.asarray(fn(x)), x[:, ::-1].astype(np.float32))
    out = preview(x, "heavy", "keras", tmp_path / "p.png", rows=2, cols=4)
    assert Image.open(out).size[0] > 100


def test_tfds_by_name_with_mocked_local_data():
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=40):  # random labels: 40 give each of the 5 classes >= 2
        b = load_data("tfds:tf_flowers", 32)
    assert b.classes[:2] == ["dandelion", "daisy"] and len(b.train) + len(b.val) == 40
    assert set(b.counts("val").values()) != {0}


TINY_TFDS_BUILDER = '''
import numpy as np
import tensorflow_datasets as tfds


class TuneflowTinyShapes(tfds.core.GeneratorBasedBuilder):
    """Two classes of flat grey images, prepared locally: nothing is downloaded."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, supervised_keys=("image", "label"),
                                     features=tfds.features.FeaturesDict({
                                         "image": tfds.features.Image(shape=(24, 24, 3)),
                                         "label": tfds.features.ClassLabel(names=["dark", "light"])}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(16), "test": self._generate_examples(6)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": np.full((24, 24, 3), 30 + 190 * (i % 2), np.uint8), "label": i % 2}
'''


@pytest.mark.slow
def test_tfds_builds_and_loads_a_local_dataset_offline(tmp_path):
    """The real TFDS path (builder in a package, download_and_prepare, tfds.load), which imports
    importlib_resources: it failed before setup.cfg listed it. A subprocess keeps TFDS's global
    registry and TFDS_DATA_DIR out of this process."""
    import os
    import subprocess
    import sys
    from conftest import REPO
    (tmp_path / "tinypkg").mkdir()
    (tmp_path / "tinypkg" / "__init__.py").write_text("")
    (tmp_path / "tinypkg" / "shapes.py").write_text(TINY_TFDS_BUILDER)
    code = ("import tinypkg.shapes\nfrom tuneflow.data import load_data\n"
            "b = load_data('tfds:tuneflow_tiny_shapes', 16)\n"
            "print('LOADED', b.classes, len(b.train), len(b.val), int(b.val.x[b.val.y == 1].min()))")
    env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"), PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert "LOADED ['dark', 'light'] 16 6 220" in r.stdout, r.stdout + r.stderr[-3000:]
    assert (tmp_path / "tfds" / "tuneflow_tiny_shapes" / "1.0.0" / "dataset_info.json").exists()


def test_tfds_unknown_name():
    with pytest.raises(DataError, match="TFDS has no dataset 'tf_flowerz'.*tf_flowers"):
        load_data("tfds:tf_flowerz", 32)


def test_random_affine_is_one_exact_resampling():
    from tuneflow.data.augment import _random_affine_layer
    x = np.zeros((4, 32, 32, 3), np.float32)
    x[:, 8:24, 8:24] = 255.0
    Affine = _random_affine_layer()
    np.testing.assert_array_equal(np.asarray(Affine()(x)), x)  # no parameters: the identity
    z = np.asarray(Affine(zoom=0.5, seed=3)(x))
    assert z.shape == x.shape and (z[:, 16, 16] == 255).all()  # zooming in keeps the centre
    assert (z[:, 8:24, 8:24] >= x[:, 8:24, 8:24] - 1e-3).all()  # and only enlarges the square
    r = np.asarray(Affine(rotate=np.pi / 2 * 0.999, seed=4)(x))
    assert not np.allclose(r, x) and r.min() >= 0 and r.max() <= 255.0


@pytest.mark.parametrize("preset", ["light", "medium", "heavy"])
def test_keras_augmentation_stays_float32_under_mixed_precision(preset):
    """precision=auto picks mixed_bfloat16 on AVX512-BF16 CPUs: augmentation must not follow it."""
    import keras
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        fn = make_augmenter(preset, "keras", 32, seed=0)
        x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
        out = fn(x)
        assert out.dtype == "float32" and out.shape == (4, 32, 32, 3)
        assert np.isfinite(np.asarray(out)).all()
    finally:
        keras.mixed_precision.set_global_policy("float32")
