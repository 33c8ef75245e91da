"""Safe decoding of shard members: images, captions and JSON only — never pickle.

Web-scale shards contain broken files; a worker that raises on one kills the run. Every
function here either returns a value or raises ``BadSample(reason)``, and the pipeline counts
the reason. Members with any other extension (``.pyd``, ``.pickle``, ``.pth``, ``.npy`` ...)
are never looked at, because decoding them would execute or trust arbitrary data.
"""
from __future__ import annotations

import io
import json
import warnings

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Member extensions read as the sample's image, in order of preference."""
CAPTION_EXTENSION = "txt"
JSON_EXTENSION = "json"

# Only these PIL decoders may run on untrusted bytes (MPO: multi-picture JPEGs from cameras).
_ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")

# Skip reasons, as counted in each batch's ``skipped`` dict (documented in docs/data.md).
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
BAD_UTF8 = "bad_utf8"
BAD_JSON = "bad_json"
TRUNCATED_SHARD = "truncated_shard"
TRUNCATED_SAMPLE = "truncated_sample"
UNREADABLE_SHARD = "unreadable_shard"
EMPTY_SHARD = "empty_shard"
LINK_MEMBER = "link_member"
OVERSIZED_MEMBER = "oversized_member"
OVERSIZED_IMAGE = "oversized_image"
BAD_LABEL = "bad_label"  # evaluation of CLIP_benchmark shards: KEY.cls missing or not a class id
ABANDONED_SHARD = "abandoned_shard"
SKIP_REASONS = (MISSING_IMAGE, CORRUPT_IMAGE, MISSING_CAPTION, EMPTY_CAPTION, BAD_UTF8, BAD_JSON,
                TRUNCATED_SHARD, TRUNCATED_SAMPLE, UNREADABLE_SHARD, EMPTY_SHARD, LINK_MEMBER,
                OVERSIZED_MEMBER, OVERSIZED_IMAGE, ABANDONED_SHARD, BAD_LABEL)

USED_EXTENSIONS = frozenset((*IMAGE_EXTENSIONS, CAPTION_EXTENSION, JSON_EXTENSION))
"""The only members the tar reader reads; every other member is skipped unread."""

MAX_CAPTION_BYTES = 16 << 10
"""Captions are cut to this many bytes (at a character boundary) before anything else: a
77-token context needs a few hundred, and SentencePiece's cost grows with the input."""
MAX_JSON_BYTES = 1 << 20
"""Larger JSON metadata counts as ``bad_json``."""
MAX_IMAGE_PIXELS = 1 << 25
"""Images with more pixels (about 5800 x 5800) count as ``oversized_image``, decided from the
header before decoding: a decoded 9400 x 9400 RGB image alone is 265 MB."""


class BadSample(Exception):
    """A sample that must be skipped; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def find_image_member(sample: dict) -> str | None:
    """The extension of the sample's image member, or None."""
    return next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)


def decode_caption(sample: dict) -> str:
    """Strict UTF-8 caption with whitespace collapsed; raises BadSample when unusable."""
    raw = sample.get(CAPTION_EXTENSION)
    if raw is None:
        raise BadSample(MISSING_CAPTION)
    cut = len(raw) > MAX_CAPTION_BYTES
    raw = raw[:MAX_CAPTION_BYTES]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if not (cut and err.reason == "unexpected end of data"):
            raise BadSample(BAD_UTF8, str(err)) from None
        text = raw[:err.start].decode("utf-8")  # the cut split a multi-byte character
    text = " ".join(text.split())
    if not text:
        raise BadSample(EMPTY_CAPTION)
    return text


def decode_cls_label(sample: dict) -> dict:
    """CLIP_benchmark's ``KEY.cls`` (the class id as text) as metadata ``{"label": id}``; raises
    BadSample(bad_label) when missing or not a non-negative integer."""
    raw = sample.get("cls")
    try:
        label = int(raw.decode("ascii").strip()) if raw is not None and len(raw) <= 32 else -1
    except (UnicodeDecodeError, ValueError):
        label = -1
    if label < 0:
        raise BadSample(BAD_LABEL)
    return {"label": label}


def decode_json(sample: dict) -> dict:
    """The sample's JSON metadata (``{}`` when absent); raises BadSample when malformed."""
    raw = sample.get(JSON_EXTENSION)
    if raw is None:
        return {}
    if len(raw) > MAX_JSON_BYTES:
        raise BadSample(BAD_JSON, f"{len(raw)} bytes > {MAX_JSON_BYTES}")
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # 200k-deep nesting recurses
        raise BadSample(BAD_JSON, str(err)) from None
    if not isinstance(value, dict):
        raise BadSample(BAD_JSON, f"expected an object, got {type(value).__name__}")
    return value


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB so that odd images are used, not dropped.

    Transparency (RGBA, LA, palette with a transparent index) is composited on white, the way
    a browser shows the image; 16/32-bit integer and float images are rescaled to 0..255
    (PIL's plain ``convert`` would clip them to white); CMYK, YCbCr, L, 1 and P convert as usual.
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        return Image.fromarray(_to_uint8(image), mode="L").convert("RGB")
    return image.convert("RGB")


def _to_uint8(image: Image.Image) -> np.ndarray:
    """Rescale a 16/32-bit or float single-channel image to uint8 (0..255 kept, 0..65535 scaled).

    Integer images stay in integer arithmetic, in place on one int32 copy (about 9 bytes per
    pixel at the peak, PIL's own buffer included, where a float64 path cost 2.2 GB for a 187 KB
    16-bit PNG); float images in float32.
    """
    if image.mode == "F":
        array = np.array(image, dtype=np.float32)
        top = max(float(array.max(initial=0)), 1.0)
        top = 255.0 if top <= 255 else (65535.0 if top <= 65535 else top)
        array *= 255.0 / top
        return np.clip(np.rint(array, out=array), 0, 255, out=array).astype(np.uint8)
    array = np.array(image, dtype=np.int32)
    np.clip(array, 0, None, out=array)
    top = int(array.max(initial=0))
    if top <= 255:
        return array.astype(np.uint8)
    if top > 65535:  # full 32-bit range: 255 * top would overflow int32
        return (array.astype(np.int64) * 255 // top).astype(np.uint8)
    array *= 255
    array += 32767
    array //= 65535
    return array.astype(np.uint8)


def open_image(data: bytes) -> Image.Image:
    """Open image bytes lazily (header only); raises BadSample for unknown formats or too many pixels.

    The caller may still choose a reduced JPEG decode (``Image.draft``) before ``load()``.
    """
    Image.init()
    formats = [f for f in _ALLOWED_FORMATS if f in Image.OPEN]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)
    except Exception as err:
        raise BadSample(CORRUPT_IMAGE, f"{type(err).__name__}: {err}") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise BadSample(OVERSIZED_IMAGE, f"{width}x{height}")
    return image


def load_rgb(image: Image.Image) -> Image.Image:
    """Decode an opened image to RGB; raises BadSample(corrupt_image) on any failure."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            return to_rgb(image)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on bad input
        raise BadSample(CORRUPT_IMAGE, f"{type(err).__name__}: {err}") from None


def decode_image(data: bytes) -> Image.Image:
    """Fully decode image bytes to RGB; raises BadSample(corrupt_image) on any failure.

    ``load()`` is forced here so a truncated file fails now, not later inside a transform.
    PIL's decompression-bomb guard stays on and counts as corrupt.
    """
    # open(formats=...) raises KeyError for a name PIL has not registered (Pillow 13 has no
    # separate MPO opener: JPEG reads those files), so open_image passes only registered ones.
    with open_image(data) as image:
        return load_rgb(image)
