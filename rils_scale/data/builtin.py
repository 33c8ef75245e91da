"""Built-in image–caption dataset for the demo and tests: captioned handwritten digits.

Made from scikit-learn's bundled ``load_digits`` (1797 8×8 images, no download), so the whole
pipeline — shards, tokenizer, pre-training, zero-shot evaluation — runs offline in minutes on
a CPU. Each digit is upscaled, drawn in a random foreground colour on a different background
colour with a small random scale and offset, and captioned with one of several templates that
name the digit, so captions vary and contrastive learning has something to learn.

Split: source image ``i`` is held out when ``i % 5 == 0`` (360 images, 20 %); train uses the
other 1437, possibly rendered several times (``augment_copies``). A held-out source image is
never rendered into train.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

from .seeding import sample_seed
from .shards import ShardWriter

_CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_COLOURS = {  # name -> RGB; luminance spread so that a contrasting pair always exists
    "black": (15, 15, 15), "white": (245, 245, 245), "red": (210, 30, 30), "green": (30, 150, 50),
    "blue": (30, 60, 200), "yellow": (240, 220, 40), "orange": (245, 140, 20), "purple": (130, 40, 160),
    "pink": (245, 150, 190), "grey": (128, 128, 128), "brown": (120, 70, 30), "cyan": (40, 210, 220),
}

_CAPTION_TEMPLATES = (
    "a photo of the number {name}.",
    "a handwritten {digit} in {fg} on {a_bg} background",
    "the digit {name}",
    "{a_fg} {name} on {bg}",
    "an image of a handwritten digit {name}, drawn in {fg}",
    "number {name} ({digit}) written in {fg} ink",
    "a small picture of the numeral {name} on {a_bg} background",
    "{name}, a handwritten digit",
    "a blurry {fg} digit {name}",
    "{a_bg} square with the number {name} written on it",
)

_ZERO_SHOT_TEMPLATES = (
    "a photo of the number {}.",
    "the digit {}",
    "a handwritten {}.",
    "an image of the numeral {}.",
)

HELDOUT_EVERY = 5
"""Source image ``i`` is held out when ``i % HELDOUT_EVERY == 0``."""


def class_names() -> list[str]:
    """The 10 class names, index = digit."""
    return list(_CLASS_NAMES)


def zero_shot_templates() -> list[str]:
    """Prompt templates for zero-shot classification; ``{}`` takes a class name."""
    return list(_ZERO_SHOT_TEMPLATES)


def split_indices(num_images: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, held-out) source indices; disjoint by construction."""
    heldout = [i for i in range(num_images) if i % HELDOUT_EVERY == 0]
    train = [i for i in range(num_images) if i % HELDOUT_EVERY != 0]
    return train, heldout


def _luminance(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _pick_colours(rng: random.Random) -> tuple[str, str]:
    """A (foreground, background) pair of different, visibly contrasting colours."""
    names = sorted(_COLOURS)
    while True:
        fg, bg = rng.sample(names, 2)
        if abs(_luminance(_COLOURS[fg]) - _luminance(_COLOURS[bg])) >= 60:
            return fg, bg


def render_digit(pixels: np.ndarray, image_size: int, rng: random.Random) -> tuple[Image.Image, str, str]:
    """Render one 8×8 digit (values 0..16) as an RGB image; returns (image, fg name, bg name)."""
    fg, bg = _pick_colours(rng)
    mask = Image.fromarray(np.clip(pixels / 16.0 * 255.0, 0, 255).astype(np.uint8), mode="L")
    glyph = max(4, int(round(image_size * rng.uniform(0.65, 1.0))))
    mask = mask.resize((glyph, glyph), Image.BICUBIC)
    slack = image_size - glyph
    canvas_mask = Image.new("L", (image_size, image_size), 0)
    canvas_mask.paste(mask, (rng.randint(0, slack), rng.randint(0, slack)))
    image = Image.composite(Image.new("RGB", canvas_mask.size, _COLOURS[fg]),
                            Image.new("RGB", canvas_mask.size, _COLOURS[bg]), canvas_mask)
    return image, fg, bg


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def make_caption(label: int, fg: str, bg: str, rng: random.Random) -> str:
    template = rng.choice(_CAPTION_TEMPLATES)
    return template.format(name=_CLASS_NAMES[label], digit=label, fg=fg, bg=bg,
                           a_fg=_with_article(fg), a_bg=_with_article(bg))


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """``(images [1797, 8, 8] in 0..16, labels [1797])`` from scikit-learn (bundled, offline)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    return digits.images, digits.target.astype(int)


def write_builtin_dataset(out_dir: str | os.PathLike, image_size: int = 32, shard_size: int = 256,
                          seed: int = 0, augment_copies: int = 1, image_format: str = "png") -> dict:
    """Write ``out_dir/train/*.tar`` and ``out_dir/heldout/*.tar``; returns paths and counts.

    Every sample carries ``KEY.json`` = ``{"label", "class_name", "source_index", "copy"}``.
    Train samples are written in a seeded random order so every shard mixes classes. The same
    arguments always produce the same shards.
    """
    if augment_copies < 1:
        raise ValueError(f"augment_copies must be >= 1, got {augment_copies}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    images, labels = load_digit_images()
    train_idx, heldout_idx = split_indices(len(images))
    out_dir = Path(out_dir)

    train_items = [(i, c) for i in train_idx for c in range(augment_copies)]
    random.Random(sample_seed("builtin-order", seed)).shuffle(train_items)
    heldout_items = [(i, 0) for i in heldout_idx]

    result = {"image_size": image_size, "class_names": class_names(), "seed": seed}
    for split, items in (("train", train_items), ("heldout", heldout_items)):
        with ShardWriter(out_dir / split, shard_size) as writer:
            for index, copy in items:
                rng = random.Random(sample_seed("builtin", seed, split, index, copy))
                label = int(labels[index])
                image, fg, bg = render_digit(images[index], image_size, rng)
                meta = {"label": label, "class_name": _CLASS_NAMES[label], "source_index": index, "copy": copy}
                writer.write(image, make_caption(label, fg, bg, rng), meta, ext=image_format)
        result[split] = {"dir": str(out_dir / split), "shards": writer.shard_paths, "count": writer.count}
    return result


# ---------------------------------------------------------------------------- registry
BUILTIN_DATASETS = ("scenes", "shapes", "digits")
"""``scenes``: multi-object scenes with per-object masks (rils_scale.data.multi_scenes, the demo's
default); ``shapes``: one object per image (rils_scale.data.scenes); ``digits``: this module."""


def write_named_builtin(name: str, out_dir: str | os.PathLike, *, image_size: int = 32, shard_size: int | None = None,
                        seed: int = 0, augment_copies: int = 1) -> dict:
    """Write a built-in dataset by name, plus ``out_dir/classes.json`` (class names and
    zero-shot templates) so evaluation needs nothing but the directory."""
    import json

    if name == "digits":
        result = write_builtin_dataset(out_dir, image_size=image_size, shard_size=shard_size or 256, seed=seed,
                                       augment_copies=augment_copies)
        names, templates = class_names(), zero_shot_templates()
    elif name == "scenes":
        from . import multi_scenes
        result = multi_scenes.write_multi_scenes_dataset(out_dir, image_size=image_size, shard_size=shard_size or 500,
                                                         seed=seed, num_train=4000 * augment_copies)
        names, templates = multi_scenes.class_names(), multi_scenes.zero_shot_templates()
    elif name == "shapes":
        from . import scenes
        result = scenes.write_scenes_dataset(out_dir, image_size=image_size, shard_size=shard_size or 500,
                                             seed=seed, num_train=4000 * augment_copies)
        names, templates = scenes.class_names(), scenes.zero_shot_templates()
    else:
        raise ValueError(f"unknown built-in dataset {name!r}; choose from {BUILTIN_DATASETS}")
    with open(Path(out_dir) / "classes.json", "w") as f:
        json.dump({"dataset": name, "class_names": names, "templates": templates}, f, indent=1)
    result["dataset"] = name
    return result
