"""A request's images: read from multipart or base64 JSON, checked against the limits, decoded and resized per request.

Every way a request can be wrong ends here as an :class:`ApiError` naming the problem (and the
image's position in the request), before anything reaches the shared inference worker, so a bad
image fails only its own request.
"""
from __future__ import annotations

import base64
import binascii
import io
import json

import numpy as np

from ..errors import DataError
from .config import ApiError, ServeConfig

# What PIL identifies and the predictor decodes; anything else PIL knows (TIFF, ICO, PSD...) is 415.
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP", "WEBP", "MPO"})


async def read_images(request, cfg: ServeConfig) -> list[bytes]:
    """The encoded images of a request, in order: multipart field ``files`` (one or more) or JSON
    ``{"images": ["<base64>", ...]}``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        blobs = await _multipart(request, cfg)
    elif ctype == "application/json":
        blobs = _json_images(await request.body())
    else:
        body = await request.body()
        if not body:
            raise ApiError(400, "empty_body", "the request body is empty; send images as multipart "
                           "field 'files' or JSON {\"images\": [\"<base64>\", ...]}.")
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type {ctype or '(none)'!r} is not accepted; use multipart/form-data "
                       "(field 'files') or application/json ({\"images\": [\"<base64>\", ...]}).")
    if not blobs:
        raise ApiError(400, "no_images", "the request holds no image; send at least one.")
    if len(blobs) > cfg.max_images:
        raise ApiError(413, "too_many_images", f"{len(blobs)} images in one request; the limit "
                       f"max_images is {cfg.max_images}: split the request.",
                       limit="max_images", value=cfg.max_images)
    return blobs


async def _multipart(request, cfg: ServeConfig) -> list[bytes]:
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    try:
        form = await request.form(max_files=cfg.max_images + 1, max_fields=cfg.max_images + 16)
    except HTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise ApiError(413, "too_many_images", f"more than {cfg.max_images} images in one request; "
                           f"the limit max_images is {cfg.max_images}: split the request.",
                           limit="max_images", value=cfg.max_images) from exc
        raise ApiError(400, "malformed_multipart", f"the multipart body cannot be parsed: {exc.detail}") from exc
    try:
        parts = form.getlist("files")
        if not parts:
            fields = sorted(set(form.keys()))
            raise ApiError(400, "no_images", "the multipart body has no field 'files'"
                           + (f" (it has {', '.join(map(repr, fields))})" if fields else "")
                           + "; send each image as files=@image.jpg.")
        blobs = []
        for i, part in enumerate(parts):
            if not isinstance(part, UploadFile):
                raise ApiError(400, "not_a_file", f"image {i}: field 'files' holds text, not a file; "
                               "send it as a file upload (files=@image.jpg).", image=i)
            blobs.append(await part.read())
        return blobs
    finally:
        await form.close()


def _json_images(body: bytes) -> list[bytes]:
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty; send JSON {\"images\": [\"<base64>\", ...]}.")
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON ({exc}).") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ApiError(422, "bad_json_shape", "the JSON body must be an object with a list \"images\" "
                       "of base64 strings: {\"images\": [\"<base64>\", ...]}.")
    blobs = []
    for i, s in enumerate(doc["images"]):
        if not isinstance(s, str):
            raise ApiError(422, "bad_json_shape", f"image {i}: expected a base64 string, got "
                           f"{type(s).__name__}.", image=i)
        if s.startswith("data:") and "," in s:  # a data URL: data:image/png;base64,....
            s = s.split(",", 1)[1]
        try:
            blobs.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ApiError(400, "malformed_base64", f"image {i}: not valid base64 ({exc}).", image=i) from exc
    return blobs


_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
          (b"BM", "BMP"))


def _signature(data: bytes) -> str | None:
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image(predictor, data: bytes, index: int, cfg: ServeConfig) -> np.ndarray:
    """Encoded bytes -> uint8 (H, W, 3) through the predictor's own decode, after cheap header
    checks that name the problem: empty, not an image, unsupported format, too many pixels."""
    from PIL import Image, UnidentifiedImageError
    if not data:
        raise ApiError(422, "empty_image", f"image {index} is empty (0 bytes).", image=index)
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            fmt, (w, h) = im.format, im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        kind = _signature(data)
        if kind:  # the right magic bytes, but the header does not parse: cut off or damaged
            raise ApiError(422, "truncated_image", f"image {index} starts like a {kind} but its header is "
                           f"cut short or damaged ({len(data)} bytes).", image=index) from exc
        raise ApiError(422, "not_an_image", f"image {index} is not an image: {len(data)} bytes starting "
                       f"{data[:12]!r}, in no image format PIL knows.", image=index) from exc
    if fmt not in SUPPORTED_FORMATS:
        raise ApiError(415, "unsupported_image_type", f"image {index} is {fmt}; accepted: "
                       f"{', '.join(sorted(SUPPORTED_FORMATS))}.", image=index)
    if w * h > cfg.max_pixels:
        raise ApiError(413, "image_too_large", f"image {index} is {w} x {h} = {w * h} pixels; the "
                       f"limit max_pixels is {cfg.max_pixels}: send a smaller image.",
                       limit="max_pixels", value=cfg.max_pixels, image=index)
    try:
        return predictor.decode(data, max_pixels=cfg.max_pixels)
    except DataError as exc:
        msg = str(exc)
        code = "truncated_image" if "truncat" in msg.lower() else "corrupt_image"
        raise ApiError(422, code, f"image {index} ({fmt}, {w} x {h}) cannot be decoded: {msg}",
                       image=index) from exc


def prepare_request(predictor, blobs: list[bytes], cfg: ServeConfig) -> np.ndarray:
    """A request's encoded images -> the model's float32 [n, S, S, 3] batch (its own resize)."""
    return np.asarray(predictor.prepare([decode_image(predictor, b, i, cfg) for i, b in enumerate(blobs)]),
                      dtype=np.float32)
