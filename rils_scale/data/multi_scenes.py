"""Multi-object scenes: the demo's default built-in dataset (``--builtin scenes``).

Each 32 px image holds two or three coloured shapes (one large, the others small, never
overlapping, all with distinct colours) on a dark or grey background. The caption names every
object ("a large red circle and a small blue cross", in varied phrasings), and the sample's
``KEY.json`` stores, per object, its phrase ("a red circle"), colour, shape and pixel mask
(run-length encoded), so localisation can be scored: does each patch inside an object's mask
belong, under the patch–sentence similarity, to that object's phrase rather than the others'?
(``rils_scale.eval.localization``.)

Zero-shot classes are the 30 "{colour} {shape}" pairs of the **large** object (the label);
the small objects are distractors, so zero-shot is harder than on ``shapes``.
Held-out scenes come from a separate random stream (``sample_seed(..., "heldout")``).
"""
from __future__ import annotations

import os
import random
from typing import Dict, List

import numpy as np
from PIL import Image, ImageDraw

from .scenes import BACKGROUNDS, COLOURS, SHAPES, _draw, class_names, write_rendered_splits, zero_shot_templates

_JOINERS = (" and ", ", ", " next to ", " with ")
_CAPTIONS = ("{objs}", "{objs} on a {b} background", "a picture of {objs}", "there is {objs}",
             "a scene with {objs}", "{objs} in an image")

__all__ = ["class_names", "zero_shot_templates", "render_multi_scene", "write_multi_scenes_dataset",
           "rle_encode", "rle_decode"]


def rle_encode(mask: np.ndarray) -> List[int]:
    """Row-major run lengths of a binary mask, starting with a (possibly empty) run of zeros."""
    flat = np.concatenate([[False], mask.astype(bool).reshape(-1)])
    change = np.flatnonzero(flat[1:] != flat[:-1])  # first pixel of each new run
    bounds = np.concatenate([[0], change, [flat.size - 1]])
    return [int(r) for r in np.diff(bounds)]


def rle_decode(runs: List[int], shape) -> np.ndarray:
    values = np.arange(len(runs)) % 2 == 1
    flat = np.repeat(values, runs)
    if flat.size != int(np.prod(shape)):
        raise ValueError(f"run lengths cover {flat.size} pixels, mask {tuple(shape)} has {int(np.prod(shape))}")
    return flat.reshape(shape)


def _place(rng: random.Random, radii: List[float], size: int, tries: int = 200):
    """Centres for circles of ``radii`` inside the image, pairwise apart (rejection sampling)."""
    for _ in range(tries):
        centres = []
        for r in radii:
            for _ in range(50):
                c = (rng.uniform(r, size - r), rng.uniform(r, size - r))
                if all((c[0] - o[0]) ** 2 + (c[1] - o[1]) ** 2 >= (r + ro + 1) ** 2
                       for o, ro in zip(centres, radii)):
                    centres.append(c)
                    break
            else:
                break
        if len(centres) == len(radii):
            return centres
    return None


def render_multi_scene(rng: random.Random, image_size: int = 32):
    """One (image, caption, meta) triple; ``meta['objects']`` lists the objects (large first)."""
    count = rng.choice((2, 2, 3))
    colours = rng.sample(sorted(COLOURS), count)
    shapes = [rng.choice(SHAPES) for _ in range(count)]
    background = rng.choice(sorted(BACKGROUNDS))
    radii = [rng.uniform(0.26, 0.34) * image_size] + [rng.uniform(0.15, 0.2) * image_size for _ in range(count - 1)]
    centres = _place(rng, radii, image_size)
    while centres is None:  # three objects do not always fit: shrink them a little (deterministic in rng)
        radii = [r * 0.9 for r in radii]
        centres = _place(rng, radii, image_size)
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    masks = []
    for colour, shape, r, (cx, cy) in zip(colours, shapes, radii, centres):
        _draw(draw, shape, COLOURS[colour], cx, cy, r)
        mask_image = Image.new("L", (image_size, image_size), 0)
        _draw(ImageDraw.Draw(mask_image), shape, 255, cx, cy, r)
        masks.append(np.asarray(mask_image) > 0)
    objects: List[Dict] = []
    for i, (colour, shape) in enumerate(zip(colours, shapes)):
        visible = masks[i] & ~np.any(masks[i + 1:], axis=0) if i + 1 < count else masks[i]  # drawn later: on top
        objects.append({"phrase": f"a {colour} {shape}", "colour": colour, "shape": shape,
                        "size": "large" if i == 0 else "small", "mask_rle": rle_encode(visible)})
    order = list(range(count))
    rng.shuffle(order)  # captions name the objects in any order
    named = [f"a {'large' if i == 0 and rng.random() < 0.5 else ('small' if i and rng.random() < 0.5 else '')} "
             f"{colours[i]} {shapes[i]}".replace("a  ", "a ") for i in order]
    joiner = rng.choice(_JOINERS)
    objs = joiner.join(named[:-1]) + (" and " if joiner == ", " else joiner) + named[-1]
    caption = rng.choice(_CAPTIONS).format(objs=objs, b=background)
    label = SHAPES.index(shapes[0]) * len(COLOURS) + sorted(COLOURS).index(colours[0])
    meta = {"label": label, "class_name": f"{colours[0]} {shapes[0]}", "background": background,
            "image_size": image_size, "objects": objects}
    return image, caption, meta


def write_multi_scenes_dataset(out_dir: str | os.PathLike, image_size: int = 32, num_train: int = 4000,
                               num_heldout: int = 600, shard_size: int = 500, seed: int = 0) -> dict:
    """Write ``out_dir/train`` and ``out_dir/heldout`` shards; deterministic in the arguments."""
    result = {"image_size": image_size, "class_names": class_names(), "seed": seed, "dataset": "scenes"}
    return write_rendered_splits(out_dir, result, render_multi_scene, "multi_scenes", seed, image_size,
                                 {"train": num_train, "heldout": num_heldout}, shard_size)
