"""The one decoder and resize (tuneflow.imageops): every PIL mode to 8-bit RGB, scaled not clipped;
arrays, bytes and paths decoded alike; bad inputs refused with the file named; the resize a model does."""
import numpy as np
import pytest
from PIL import Image

from tuneflow.errors import DataError
from tuneflow.imageops import decode_pixels, resize_image, to_rgb8


def _grey_ramp(h=16, w=32):
    """A horizontal ramp 0..1 as floats, to be written in any bit depth."""
    return np.tile(np.linspace(0, 1, w), (h, 1))


@pytest.mark.parametrize("mode, write", [
    ("I;16", lambda r, p: Image.fromarray((r * 65535).round().astype(np.uint16)).save(p / "x.png")),
    ("I;16B", lambda r, p: Image.fromarray((r * 65535).round().astype(">u2")).save(p / "x.tif")),
    ("I", lambda r, p: Image.fromarray((r * 65535).round().astype(np.int32)).save(p / "x.tif")),
    ("F", lambda r, p: Image.fromarray(r.astype(np.float32)).save(p / "x.tif")),
    ("L", lambda r, p: Image.fromarray((r * 255).round().astype(np.uint8)).save(p / "x.png")),
    ("LA", lambda r, p: Image.fromarray((r * 255).round().astype(np.uint8)).convert("LA").save(p / "x.png")),
    ("CMYK", lambda r, p: Image.fromarray((r * 255).round().astype(np.uint8)).convert("CMYK").save(p / "x.tif")),
    ("P", lambda r, p: Image.fromarray((r * 255).round().astype(np.uint8)).convert("P").save(p / "x.gif")),
])
def test_every_mode_is_scaled_to_8_bits_not_clipped(tmp_path, mode, write):
    ramp = _grey_ramp()
    write(ramp, tmp_path)
    path = next(tmp_path.iterdir())
    with Image.open(path) as im:
        assert im.mode == mode  # the file really is in the mode under test
        rgb = to_rgb8(im)
    assert rgb.shape == (16, 32, 3) and rgb.dtype == np.uint8
    expected = (ramp * 255).round()
    np.testing.assert_allclose(rgb[..., 0], expected, atol=3 if mode != "CMYK" else 4)
    assert rgb[:, 0].max() <= 3 and rgb[:, -1].min() >= 250  # black stays black, white white


def test_one_bit_images_are_black_and_white(tmp_path):
    Image.fromarray(np.eye(8, dtype=bool)).save(tmp_path / "eye.png")
    with Image.open(tmp_path / "eye.png") as im:
        assert im.mode == "1"
        rgb = to_rgb8(im)
    assert set(np.unique(rgb)) == {0, 255} and rgb[0, 0, 0] == 255 and rgb[0, 1, 0] == 0


def test_arrays_of_any_channel_count_become_rgb8_and_bad_shapes_are_refused():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert decode_pixels(grey).shape == (3, 4, 3) and (decode_pixels(grey)[..., 2] == grey).all()
    assert decode_pixels(grey[..., None]).shape == (3, 4, 3)
    rgba = np.zeros((3, 4, 4), np.uint8)
    assert decode_pixels(rgba).shape == (3, 4, 3)
    floats = np.full((2, 2, 3), 300.4)
    assert decode_pixels(floats).dtype == np.uint8 and (decode_pixels(floats) == 255).all()  # clipped, rounded
    with pytest.raises(DataError, match=r"must be \(H, W\), \(H, W, 1\|3\|4\); got shape \(3, 4, 2\)"):
        decode_pixels(np.zeros((3, 4, 2), np.uint8))


def test_paths_and_bytes_decode_alike_and_bad_ones_are_named(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (6, 9, 3)).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")
    np.testing.assert_array_equal(decode_pixels(tmp_path / "x.png"), img)
    np.testing.assert_array_equal(decode_pixels((tmp_path / "x.png").read_bytes()), img)
    with pytest.raises(DataError, match="exceeds the limit of 50 pixels per image"):
        decode_pixels(tmp_path / "x.png", max_pixels=50)
    with pytest.raises(DataError, match=r"Empty image data \(0 bytes\)"):
        decode_pixels(b"")
    with pytest.raises(DataError, match="nope.png: no such file"):
        decode_pixels(tmp_path / "nope.png")
    (tmp_path / "fake.png").write_text("not an image")
    with pytest.raises(DataError, match="fake.png: not an image PIL can read"):
        decode_pixels(tmp_path / "fake.png")


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (20, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert decode_pixels(tmp_path / "r.jpg").shape == (20, 10, 3)


def test_resize_image_is_the_identity_at_its_size_and_crops_the_centre_square():
    img = np.random.default_rng(1).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    np.testing.assert_array_equal(resize_image(img, 8), img)
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = 200  # only the centre third is bright: crop sees it alone, squash the whole frame
    assert resize_image(wide, 10, "crop").min() > 150
    squash = resize_image(wide, 10, "squash")
    assert squash.shape == (10, 10, 3) and squash[:, 0].max() < 50
    with pytest.raises(DataError, match="resize='zoom' is not a resize mode"):
        resize_image(wide, 10, "zoom")
