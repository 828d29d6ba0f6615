"""The bytes signatures' decoder: TensorFlow ops giving the very pixels :func:`tuneflow.imageops.decode_pixels` gives.

An artifact's ``serving_default`` and ``embed`` signatures take encoded images, so a client without
tuneflow (TF Serving, a notebook with only TensorFlow) decodes inside the graph. To make that the
same decode as tuneflow's own clients (PIL), bit for bit:

- JPEG (and MPO, its first image): libjpeg's accurate integer IDCT (``INTEGER_ACCURATE``; PIL's
  default, TensorFlow's is the fast one, up to 8 grey levels apart), decoded at the DCT scale PIL's
  ``draft()`` picks (1/2, 1/4 or 1/8 while both sides stay >= the model's input), then the EXIF
  orientation read from the first APP1 ``Exif`` segment's IFD0 (tag 0x0112) applied.
- PNG: 8-bit as decoded, 16-bit grey scaled to 8 bits with rounding, 16-bit colour by its high
  byte (what PIL does); transparency (alpha, ``tRNS``) composited onto white with PIL's own
  integer arithmetic (``Image.alpha_composite``).
- GIF: the first frame; BMP: 24-bit and 8-bit grey.

What the graph cannot decode identically is named by :func:`graph_mismatch` (read from the
header PIL parses, before any decode): the HTTP service refuses those images by that name rather
than answer differently from the artifact.
"""
from __future__ import annotations

import tensorflow as tf
from PIL import Image

_PNG = b"\x89PNG\r\n\x1a\n"
_PAD = 16  # zero bytes appended before reading header fields, so a short read never fails


def graph_mismatch(im) -> str | None:
    """Why the bytes signatures would not give PIL's pixels for this opened (not loaded) PIL image,
    or None. The rule of :func:`decode_bytes`, stated on the header."""
    fmt, mode = im.format, im.mode
    if fmt in ("JPEG", "MPO"):
        if mode not in ("RGB", "L"):
            return f"a {mode} JPEG (TensorFlow's JPEG decoder converts {mode} otherwise than PIL)"
        return None
    if fmt == "PNG":
        exif = im.info.get("exif")  # an eXIf chunk before the image data (where the PNG spec puts it)
        if exif:
            ex = Image.Exif()
            ex.load(exif)
            if ex.get(0x0112, 1) != 1:
                return "a PNG with an EXIF orientation (the graph reads orientation from JPEG only)"
        return None
    if fmt == "GIF":
        if "transparency" in im.info:
            return "a GIF with transparency (TensorFlow's GIF decoder does not composite it onto white)"
        return None
    if fmt == "BMP":
        if mode not in ("RGB", "L") or im.tile and im.tile[0][0] != "raw":
            return f"a {mode} or compressed BMP (TensorFlow decodes 24-bit and 8-bit grey BMP only)"
        return None
    return f"{fmt} (the model's bytes signatures decode JPEG, PNG, GIF and BMP only)"


def _bytes_at(padded, length, pos, k: int):
    """k bytes (int32) at ``pos`` of the padded string; zeros where ``pos .. pos + k`` is outside."""
    ok = (pos >= 0) & (pos + k <= length)
    raw = tf.io.decode_raw(tf.strings.substr(padded, tf.where(ok, pos, 0), k), tf.uint8)
    return tf.where(ok, tf.cast(tf.reshape(raw[:k], [k]), tf.int32), 0)


def _uint(b, little):
    """Unsigned integer from bytes ``b`` (int32 vector), little- or big-endian; int32, so a
    4-byte value over 2**31 - 1 (never a real offset) reads as 2**31 - 1."""
    n = b.shape[0]
    b = tf.cast(b, tf.int64)
    big = sum(b[i] * (256 ** (n - 1 - i)) for i in range(n))
    small = sum(b[i] * (256 ** i) for i in range(n))
    return tf.cast(tf.minimum(tf.where(little, small, big), 2**31 - 1), tf.int32)


def _tiff_orientation(padded, length, t):
    """The Orientation tag (0x0112) of IFD0 of the TIFF structure at ``t``; 1 if absent."""
    little = tf.reduce_all(tf.equal(_bytes_at(padded, length, t, 2), [0x49, 0x49]))
    ifd = t + _uint(_bytes_at(padded, length, t + 4, 4), little)
    count = tf.minimum(_uint(_bytes_at(padded, length, ifd, 2), little), 1024)

    def body(i, found):
        e = ifd + 2 + 12 * i
        tag = _uint(_bytes_at(padded, length, e, 2), little)
        kind = _uint(_bytes_at(padded, length, e + 2, 2), little)
        value = tf.where(kind == 4, _uint(_bytes_at(padded, length, e + 8, 4), little),
                         _uint(_bytes_at(padded, length, e + 8, 2), little))
        return i + 1, tf.where((found == 0) & (tag == 0x0112) & ((kind == 3) | (kind == 4)), value, found)
    _, found = tf.while_loop(lambda i, f: (i < count) & (f == 0), body, [tf.constant(0), tf.constant(0)])
    return tf.where(found == 0, 1, found)


def jpeg_orientation(data):
    """EXIF orientation (1..8) of a JPEG's first APP1 ``Exif`` segment before the scan; 1 if none."""
    length = tf.strings.length(data)
    padded = tf.strings.join([data, tf.constant(b"\0" * _PAD)])

    def body(pos, orient, done):
        b = _bytes_at(padded, length, pos, 4)
        marker, seglen = b[1], b[2] * 256 + b[3]
        stop = (b[0] != 0xFF) | (marker == 0xDA) | (marker == 0xD9) | (seglen < 2)
        is_exif = (~stop) & (marker == 0xE1) & tf.equal(
            tf.strings.substr(padded, tf.minimum(pos + 4, length), 6), b"Exif\0\0")
        o = tf.cond(is_exif, lambda: _tiff_orientation(padded, length, pos + 10), lambda: tf.constant(1))
        return pos + 2 + seglen, tf.where(is_exif, o, orient), stop | is_exif
    _, orient, _ = tf.while_loop(lambda p, o, d: (~d) & (p + 4 <= length), body,
                                 [tf.constant(2), tf.constant(1), tf.constant(False)])
    return orient


def apply_orientation(img, orientation):
    """PIL's ``ImageOps.exif_transpose`` on an (H, W, C) tensor."""
    t = lambda: tf.transpose(img, [1, 0, 2])  # noqa: E731 - PIL's TRANSPOSE: x and y swapped
    branches = [lambda: img,                                  # 1 (and anything unknown): as stored
                lambda: tf.reverse(img, [1]),                 # 2: FLIP_LEFT_RIGHT
                lambda: tf.reverse(img, [0, 1]),              # 3: ROTATE_180
                lambda: tf.reverse(img, [0]),                 # 4: FLIP_TOP_BOTTOM
                t,                                            # 5: TRANSPOSE
                lambda: tf.image.rot90(img, 3),               # 6: ROTATE_270 (clockwise)
                lambda: tf.reverse(t(), [0, 1]),              # 7: TRANSVERSE
                lambda: tf.image.rot90(img, 1)]               # 8: ROTATE_90 (counter-clockwise)
    index = tf.where((orientation >= 1) & (orientation <= 8), orientation - 1, 0)
    return tf.switch_case(index, branches)


def draft_scale(height, width, size: int):
    """PIL's ``JpegImageFile.draft`` scale for a (size, size) request: 8, 4, 2 or 1."""
    s = tf.minimum(width // size, height // size)
    return tf.where(s >= 8, 8, tf.where(s >= 4, 4, tf.where(s >= 2, 2, 1)))


def _decode_jpeg(data, size: int):
    shape = tf.image.extract_jpeg_shape(data)
    scale = draft_scale(shape[0], shape[1], size)
    branch = tf.where(scale == 8, 3, tf.where(scale == 4, 2, tf.where(scale == 2, 1, 0)))
    img = tf.switch_case(branch, [
        (lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r, dct_method="INTEGER_ACCURATE"))
        for r in (1, 2, 4, 8)])
    return apply_orientation(img, jpeg_orientation(data))


def on_white(rgb, alpha):
    """PIL's ``alpha_composite`` of int32 (H, W, 3) colour with (H, W, 1) alpha over opaque white."""
    precision = 7  # PIL's AlphaComposite.c PRECISION_BITS
    coef1 = alpha * (1 << precision)
    coef2 = (255 - alpha) * (1 << precision)
    tmp = rgb * coef1 + 255 * coef2 + (0x80 << precision)
    shr = tf.bitwise.right_shift
    return shr(shr(shr(tmp, 8) + tmp, 8), precision)


def _png_has_trns(padded, length):
    """Whether a ``tRNS`` chunk comes before the first ``IDAT`` (walks the chunk list)."""
    def body(pos, found, done):
        size = _uint(_bytes_at(padded, length, pos, 4), tf.constant(False))
        kind = tf.strings.substr(padded, tf.minimum(pos + 4, length), 4)
        return pos + 12 + size, tf.equal(kind, b"tRNS"), tf.equal(kind, b"IDAT") | tf.equal(kind, b"tRNS")
    _, found, _ = tf.while_loop(lambda p, f, d: (~d) & (p + 8 <= length), body,
                                [tf.constant(8), tf.constant(False), tf.constant(False)])
    return found


def _decode_png(data):
    length = tf.strings.length(data)
    padded = tf.strings.join([data, tf.constant(b"\0" * _PAD)])
    depth_type = _bytes_at(padded, length, 24, 2)
    depth16, grey = depth_type[0] == 16, depth_type[1] == 0

    def eight():
        rgba = tf.cast(tf.io.decode_png(data, channels=4), tf.int32)
        # below 8 bits, libpng fills a missing alpha with (1 << depth) - 1, not 255
        opaque = (depth_type[0] < 8) & ~_png_has_trns(padded, length)
        return tf.where(opaque, tf.concat([rgba[..., :3], tf.fill(tf.shape(rgba[..., :1]), 255)], -1), rgba)

    def sixteen():
        v = tf.cast(tf.io.decode_png(data, channels=4, dtype=tf.uint16), tf.int32)
        # PIL: 16-bit grey ("I;16") scaled with rounding (imageops._scale_to_uint8), no alpha;
        # 16-bit colour and grey+alpha by their high byte
        scaled = tf.cast(tf.round(tf.cast(v, tf.float64) * (255.0 / 65535.0)), tf.int32)
        return tf.where(grey, tf.concat([scaled[..., :3], tf.fill(tf.shape(v[..., :1]), 255)], -1),
                        tf.bitwise.right_shift(v, 8))
    rgba = tf.cond(depth16, sixteen, eight)
    return tf.cast(on_white(rgba[..., :3], rgba[..., 3:]), tf.uint8)


def _decode_gif(data):
    return tf.io.decode_gif(data)[0]


def _decode_bmp(data):
    check = tf.debugging.assert_equal(tf.strings.substr(data, 0, 2), b"BM", message=(
        "not an image the model decodes: JPEG, PNG, GIF or BMP bytes expected"))
    with tf.control_dependencies([check]):
        return tf.io.decode_bmp(data, channels=3)


@tf.autograph.experimental.do_not_convert  # graph ops throughout: nothing for AutoGraph to rewrite
def decode_bytes(data, size: int):
    """One encoded image (scalar tf.string) -> uint8 (H, W, 3), as ``decode_pixels(data, size=size)``."""
    head = tf.strings.substr(tf.strings.join([data, tf.constant(b"\0" * _PAD)]), 0, 8)
    first3, first4 = tf.strings.substr(head, 0, 3), tf.strings.substr(head, 0, 4)
    img = tf.case([(tf.equal(first3, b"\xff\xd8\xff"), lambda: _decode_jpeg(data, size)),
                   (tf.equal(head, _PNG), lambda: _decode_png(data)),
                   (tf.equal(first4, b"GIF8"), lambda: _decode_gif(data))],
                  default=lambda: _decode_bmp(data), exclusive=True)
    img.set_shape([None, None, 3])
    return img
