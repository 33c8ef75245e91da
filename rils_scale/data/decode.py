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
SKIP_REASONS = (MISSING_IMAGE, CORRUPT_IMAGE, MISSING_CAPTION, EMPTY_CAPTION, BAD_UTF8, BAD_JSON,
                TRUNCATED_SHARD, TRUNCATED_SAMPLE, UNREADABLE_SHARD)


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
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadSample(BAD_UTF8, str(err)) from None
    text = " ".join(text.split())
    if not text:
        raise BadSample(EMPTY_CAPTION)
    return text


def decode_json(sample: dict) -> dict:
    """The sample's JSON metadata (``{}`` when absent); raises BadSample when malformed."""
    raw = sample.get(JSON_EXTENSION)
    if raw is None:
        return {}
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
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
        array = np.asarray(image, dtype=np.float64)
        top = 255.0 if array.max(initial=0) <= 255 else (65535.0 if array.max() <= 65535 else array.max())
        array = np.clip(array / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Fully decode image bytes to RGB; raises BadSample(corrupt_image) on any failure.

    ``load()`` is forced here so a truncated file fails now, not later inside a transform.
    PIL's decompression-bomb guard stays on and counts as corrupt.
    """
    # open(formats=...) raises KeyError for a name PIL has not registered (Pillow 13 has no
    # separate MPO opener: JPEG reads those files), so pass only registered ones.
    Image.init()
    formats = [f for f in _ALLOWED_FORMATS if f in Image.OPEN]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=formats) as image:
                image.load()
                return to_rgb(image)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on bad input
        raise BadSample(CORRUPT_IMAGE, f"{type(err).__name__}: {err}") from None
