"""Bad data, injected for real (files, modes, folder names, symlinks): it is refused with an error
naming the class and the minimum, or used whole, with every skipped file named; never half-used."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, make_image_folder
from tuneflow.data import IMAGE_EXTENSIONS, DataBundle, DataError, Split, check_bundle, decode_image, load_data


def test_a_class_whose_files_are_all_unreadable_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=6)
    for p in (root / "b").iterdir():
        p.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"Each class needs at least 2 readable images in .*d, 1 to train on "
                                        r"and 1 to validate on.*'b' has 0 in .*b \(6 unreadable: .*b_x_000.png"):
        load_data(root, 16)


def test_a_class_of_one_image_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class={"a": 6, "b": 1})
    with pytest.raises(DataError, match=r"at least 2 readable images.*: 'b' has 1 in .*b\. To fix it, add images "
                                        r"to that class, remove its folder, or train on the other classes"):
        load_data(root, 16)


def test_an_empty_class_folder_is_refused_by_name(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=4)
    (root / "c").mkdir()
    with pytest.raises(DataError, match=r"'c' has 0 in .*c"):
        load_data(root, 16)


def test_leaving_a_broken_class_out_with_classes_reads_nothing_of_it(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=5)
    (root / "c" / "c_x_000.png").write_text("broken")
    for p in list((root / "c").iterdir())[1:]:
        p.unlink()
    b = load_data(root, 16, classes=("a", "b"))
    assert b.classes == ["a", "b"] and b.skipped == []


def test_two_images_give_one_to_train_and_one_to_validate(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class={"a": 2, "b": 2})
    b = load_data(root, 16, val_fraction=0.2)
    assert b.counts("train") == {"a": 1, "b": 1} and b.counts("val") == {"a": 1, "b": 1}


def test_every_class_needs_validation_images(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=3, split=True)
    for p in (root / "val" / "b").iterdir():
        p.unlink()
    (root / "val" / "c" / "c_val_000.png").write_text("broken")
    for p in list((root / "val" / "c").iterdir()):
        if p.name != "c_val_000.png":
            p.unlink()
    with pytest.raises(DataError, match=r"at least 1 readable image in .*val, to validate on, or its accuracy is "
                                        r"never measured: 'b' has 0 in .*val.b; 'c' has 0 in .*val.c \(1 unreadable"):
        load_data(root, 16)


def test_training_images_are_required_per_class_in_split_layouts(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=3, split=True)
    for p in (root / "train" / "a").iterdir():
        p.write_text("no")
    with pytest.raises(DataError, match=r"at least 1 readable image in .*train, to train on: 'a' has 0"):
        load_data(root, 16)


def test_a_16_bit_png_does_not_read_as_white(tmp_path):
    Image.fromarray(np.full((20, 20), 16384, np.uint16)).save(tmp_path / "dark.png")  # 25% grey
    x = decode_image(tmp_path / "dark.png", 16)
    assert abs(int(x.mean()) - 64) <= 1


def test_every_format_pil_reads_is_loaded_and_every_skip_is_named(tmp_path):
    root = tmp_path / "d"
    for c, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
        (root / c).mkdir(parents=True)
        im = Image.new("RGB", (24, 24), colour)
        for ext, fmt in ((".webp", "WEBP"), (".tif", "TIFF"), (".tiff", "TIFF"), (".ppm", "PPM"),
                         (".jfif", "JPEG"), (".bmp", "BMP"), (".gif", "GIF"), (".png", "PNG")):
            im.save(root / c / f"{c}{ext}", fmt)
    (root / "a" / "fake.webp").write_text("not an image at all")
    (root / "a" / "readme.txt").write_text("notes")
    (root / "a" / ".DS_Store").write_bytes(b"\0\0")
    b = load_data(root, 16)
    assert {".webp", ".tif", ".tiff", ".ppm", ".jfif"} <= set(IMAGE_EXTENSIONS)
    used = b.train.files + b.val.files
    assert len(used) == 16 and {os.path.splitext(f)[1] for f in used} >= {".webp", ".tif", ".ppm", ".jfif"}
    assert len(b.skipped) == 1 and "fake.webp" in b.skipped[0] and "not an image PIL can read" in b.skipped[0]
    assert b.ignored == [str(root / "a" / "readme.txt")]
    colours = np.concatenate([b.train.x, b.val.x]).reshape(16, -1, 3).mean(1)
    labels = np.concatenate([b.train.y, b.val.y])
    assert (colours[labels == 0, 0] > 150).all() and (colours[labels == 1, 2] > 150).all()


@pytest.mark.parametrize("train, val, test", [("Training", None, "Testing"), ("TRAIN", "Valid", None),
                                              ("train", "Validation", "TEST")])
def test_split_folders_match_case_insensitively(tmp_path, train, val, test):
    root = tmp_path / "d"
    make_image_folder(root / train, per_class=5)
    if val:
        make_image_folder(root / val, per_class=2, seed=1)
    if test:
        make_image_folder(root / test, per_class=2, seed=2)
    b = load_data(root, 16)
    assert b.classes == ["a", "b"]
    assert (b.test is not None) == bool(test) and (len(b.val) == 4 if val else len(b.train) + len(b.val) == 10)


def test_two_folders_for_one_split_are_refused(tmp_path):
    make_image_folder(tmp_path / "d" / "train", per_class=3)
    make_image_folder(tmp_path / "d" / "Training", per_class=3)
    with pytest.raises(DataError, match=r"has 2 train folders \(Training, train\); keep one"):
        load_data(tmp_path / "d", 16)


def test_symlink_loops_are_not_followed_and_linked_folders_are(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=4)
    os.symlink("..", root / "a" / "loop")  # a/loop -> d: a/loop/a/loop/... forever, and b's images as a's
    os.symlink(".", root / "b" / "self")
    (root / "b" / "deep").mkdir()
    os.symlink("../..", root / "b" / "deep" / "up")
    extra = make_image_folder(tmp_path / "elsewhere", classes=("a",), per_class=3, seed=5)
    os.symlink(extra / "a", root / "a" / "more")  # a real folder of more images, linked in
    os.symlink(extra / "a", root / "a" / "more_again")  # the same folder twice: read once
    b = load_data(root, 16)
    files = b.train.files + b.val.files
    labels = np.concatenate([b.train.y, b.val.y])
    assert len(files) == len({os.path.realpath(f) for f in files}) == 4 + 3 + 4
    assert all(os.path.basename(f).startswith(b.classes[y]) for f, y in zip(files, labels))
    loops = [s for s in b.skipped if "symlink loop" in s]
    assert sorted(os.path.basename(s.split(" ")[0]) for s in loops) == ["loop", "self", "up"]
    assert any("more_again" in s and "already read" in s for s in b.skipped)


@pytest.mark.parametrize("x, y, msg", [
    (np.zeros((6, 8, 8, 3), np.uint8), [0, 0, 0, 0, 0, 1], r"'1' has 1\. To fix it, add examples of that class"),
    (np.full((6, 8, 8), np.nan), [0, 1] * 3, r"holds NaN or infinite pixels"),
    (np.full((6, 8, 8), 300.0), [0, 1] * 3, r"pixel values 300\.\.300; tuneflow takes 0\.\.255"),
    (np.zeros((6, 8, 8), np.uint8), [0, 1, 0, 1, 0, -1], r"labels must be class indices"),
])
def test_bad_arrays_are_refused(x, y, msg):
    with pytest.raises(DataError, match=msg):
        load_data((x, np.asarray(y)), 8)


def test_16_bit_arrays_are_scaled():
    x = np.full((8, 8, 8), 32896, np.uint16)  # 50% grey in 16 bits
    b = load_data((x, np.arange(8) % 2), 8)
    assert int(np.concatenate([b.train.x, b.val.x]).mean()) == 128


@pytest.mark.slow
def test_cli_refuses_a_one_image_class_in_one_line(tmp_path):
    root = make_image_folder(tmp_path / "my data", classes=("cats", "dogs"), per_class={"cats": 5, "dogs": 1})
    r = subprocess.run([sys.executable, "-m", "tuneflow", "finetune", "small_similar", "--data", str(root),
                        "--out", str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "tuneflow: error: Each class needs at least 2 readable images" in r.stderr
    assert "'dogs' has 1" in r.stderr


def test_a_hand_built_bundle_without_validation_images_of_a_class_is_refused():
    x = np.zeros((4, 8, 8, 3), np.uint8)
    bundle = DataBundle(["cat", "dog"], Split(x, np.array([0, 1, 0, 1])), Split(x[:2], np.array([0, 0])), source="mine")
    with pytest.raises(DataError, match=r"in mine \(val\), to validate on.*'dog' has 0"):
        check_bundle(bundle)
    bundle.val.y[1] = 1
    assert check_bundle(bundle) is bundle


def test_a_quoted_home_folder_is_expanded(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "photos", per_class=4)
    monkeypatch.setenv("HOME", str(tmp_path))
    b = load_data("~/photos", 16)  # what make passes for DATA="~/photos": the shell left it as is
    assert b.source == str(tmp_path / "photos") and len(b.train) + len(b.val) == 8
