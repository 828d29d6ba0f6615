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
import re
import struct
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from ..errors import DataError
from ..export.graph_decode import graph_mismatch
from ..imageops import draft_size
from .budget import PixelBudget
from .config import ApiError, ServeConfig
from .lane import LARGE_PIXELS, LaneDied, LargeImageLane

# What PIL identifies and the artifact's bytes signatures decode to the same pixels (see
# tuneflow.export.graph_decode); anything else PIL knows (WEBP, TIFF, ICO, PSD...) is 415.
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP", "MPO"})


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


def probe_image(data: bytes, index: int, cfg: ServeConfig, size: int) -> int:
    """The decoded pixels an image will take, read from its header alone (nothing is decoded),
    after checks that name the problem: empty, not an image, cut short, unsupported, a format the
    model's own bytes signatures would decode otherwise (:func:`graph_mismatch`), too many pixels."""
    if not data:
        raise ApiError(422, "empty_image", f"image {index} is empty (0 bytes).", image=index)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels is checked below
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                fmt, (w, h) = im.format, im.size
                mismatch = graph_mismatch(im) if fmt in SUPPORTED_FORMATS else None
    except Image.DecompressionBombError as exc:  # PIL's own check (MAX_IMAGE_PIXELS from max_pixels)
        raise _too_large(index, _claimed_size(str(exc)), cfg) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        kind = _signature(data)
        if kind:  # the right magic bytes, but the header does not parse: cut off or damaged
            raise ApiError(422, "truncated_image", f"image {index} starts like a {kind} but its header is "
                           f"cut short or damaged ({len(data)} bytes).", image=index) from exc
        raise ApiError(422, "not_an_image", f"image {index} is not an image: {len(data)} bytes starting "
                       f"{data[:12]!r}, in no image format PIL knows.", image=index) from exc
    if fmt not in SUPPORTED_FORMATS:
        raise ApiError(415, "unsupported_image_type", f"image {index} is {fmt}; accepted: "
                       f"{', '.join(sorted(SUPPORTED_FORMATS))} (what the model's own bytes signatures "
                       "decode to the same pixels).", image=index)
    if w * h > cfg.max_pixels:
        raise _too_large(index, w * h, cfg, f"{w} x {h} = ")
    if mismatch:
        raise ApiError(415, "unsupported_image_type", f"image {index} is {mismatch}: the model's bytes "
                       "signatures would not see the pixels this server sees, so it is refused; convert "
                       "it to PNG or an RGB JPEG.", image=index)
    dw, dh = draft_size(fmt, w, h, size)
    return dw * dh


def _claimed_size(message: str) -> int:
    m = re.search(r"\((\d+) pixels\)", message)  # PIL: "Image size (200000000 pixels) exceeds limit ..."
    return int(m.group(1)) if m else 0


def _too_large(index: int, pixels: int, cfg: ServeConfig, shape: str = "") -> ApiError:
    return ApiError(413, "image_too_large", f"image {index} is {shape}{pixels or 'over'} pixels; the "
                    f"limit max_pixels is {cfg.max_pixels}: send a smaller image.",
                    limit="max_pixels", value=cfg.max_pixels, image=index)


def _undecodable(exc: Exception, index: int) -> ApiError:
    msg = str(exc)
    code = "truncated_image" if "truncat" in msg.lower() else "corrupt_image"
    return ApiError(422, code, f"image {index} cannot be decoded: {msg}", image=index)


def decode_and_resize(predictor, data: bytes, index: int, cfg: ServeConfig) -> np.ndarray:
    """One image's bytes -> the model's float32 (S, S, 3) input: decoded (a JPEG at its draft scale),
    then reduced at once, so only this image's decoded pixels are held, and only here."""
    try:
        pixels = predictor.decode(data, max_pixels=cfg.max_pixels)
    except DataError as exc:
        raise _undecodable(exc, index) from exc
    return predictor.prepare([pixels])[0]


async def _decode_large(lane: LargeImageLane, data: bytes, index: int) -> np.ndarray:
    try:
        return (await lane.run(data)).astype(np.float32)
    except DataError as exc:
        raise _undecodable(exc, index) from exc
    except LaneDied as exc:
        raise ApiError(422, "corrupt_image", f"image {index} cannot be decoded: {exc} (the image may crash "
                       "the decoder, or the machine ran out of memory); check the image.", image=index) from exc


def _probe_request(blobs: list[bytes], cfg: ServeConfig, size: int) -> list[int]:
    """Every image's decoded pixels, from the headers; a 413 as soon as the running total passes
    ``max_request_pixels`` (the rest of a request of 64 huge images is not even probed)."""
    pixels, total = [], 0
    for i, data in enumerate(blobs):
        pixels.append(probe_image(data, i, cfg, size))
        total += pixels[-1]
        if total > cfg.max_request_pixels:
            first = "" if i + 1 == len(blobs) else f"first {i + 1} of its "
            raise ApiError(413, "request_too_many_pixels", f"the request's {first}{len(blobs)} images decode to "
                           f"{total} pixels; the limit max_request_pixels is {cfg.max_request_pixels}: send fewer "
                           "or smaller images per request.", limit="max_request_pixels",
                           value=cfg.max_request_pixels)
    return pixels


async def prepare_request(predictor, blobs: list[bytes], cfg: ServeConfig, budget: PixelBudget,
                          lane: LargeImageLane | None = None) -> np.ndarray:
    """A request's encoded images -> the model's float32 [n, S, S, 3] batch. Every header is checked
    first (per-image and per-request pixel limits, before any decode); then each image, in turn,
    takes its decoded pixels from the server's budget while a worker thread decodes and reduces it
    (a large image, >= LARGE_PIXELS: in ``lane``'s low-priority child process, one at a time, so a
    client sending 36 Mpx PNGs does not take the CPU from everyone else)."""
    size = predictor.input_size
    pixels = await run_in_threadpool(_probe_request, blobs, cfg, size)
    out = np.empty((len(blobs), size, size, 3), np.float32)
    for i, (data, px) in enumerate(zip(blobs, pixels)):
        async with budget.hold(px):
            if lane is not None and px >= LARGE_PIXELS:
                out[i] = await _decode_large(lane, data, i)
            else:
                out[i] = await run_in_threadpool(decode_and_resize, predictor, data, i, cfg)
    return out
