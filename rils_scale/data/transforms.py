"""Image transforms for pre-training and evaluation, with per-sample reproducible randomness.

torchvision's ``RandomResizedCrop`` draws from the global torch RNG, whose state depends on
which worker saw which samples before: a resumed run would crop differently. Here the crop
parameters come from a ``random.Random`` seeded by ``seeding.sample_seed(seed, epoch, key)``, so
each sample's augmentation is a pure function of (seed, epoch, key) — resuming, changing the
number of workers or skipping batches does not change any later sample.
"""
from __future__ import annotations

import math
import random

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .decode import to_rgb

# OpenAI CLIP normalisation, used by SLIP and RILS pre-training.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def random_resized_crop_params(width: int, height: int, rng: random.Random,
                               scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` drawn like torchvision's RandomResizedCrop.get_params, from ``rng``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: central crop clamped to the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainTransform:
    """RandomResizedCrop(scale=(0.5, 1)) -> tensor -> CLIP normalisation (SLIP/RILS recipe).

    Call as ``transform(image, rng)``; ``rng`` is the sample's own ``random.Random``. Without
    one, a fresh unseeded generator is used (not reproducible, fine for ad-hoc use).
    """

    def __init__(self, image_size: int, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                 interpolation: InterpolationMode = InterpolationMode.BICUBIC):
        self.image_size, self.scale, self.ratio, self.interpolation = image_size, scale, ratio, interpolation

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        image = to_rgb(image)
        rng = rng if rng is not None else random.Random()
        top, left, h, w = random_resized_crop_params(image.width, image.height, rng, self.scale, self.ratio)
        image = TF.resized_crop(image, top, left, h, w, [self.image_size, self.image_size],
                                interpolation=self.interpolation, antialias=True)
        return TF.normalize(TF.to_tensor(image), CLIP_MEAN, CLIP_STD)

    def __repr__(self):
        return f"TrainTransform(image_size={self.image_size}, scale={self.scale}, ratio={self.ratio})"


class EvalTransform:
    """Resize (shorter side) -> CenterCrop -> tensor -> CLIP normalisation; deterministic."""

    def __init__(self, image_size: int, interpolation: InterpolationMode = InterpolationMode.BICUBIC):
        self.image_size, self.interpolation = image_size, interpolation

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        image = TF.resize(to_rgb(image), self.image_size, interpolation=self.interpolation, antialias=True)
        image = TF.center_crop(image, [self.image_size, self.image_size])
        return TF.normalize(TF.to_tensor(image), CLIP_MEAN, CLIP_STD)

    def __repr__(self):
        return f"EvalTransform(image_size={self.image_size})"


def train_transform(image_size: int, scale=(0.5, 1.0)) -> TrainTransform:
    return TrainTransform(image_size, scale=scale)


def eval_transform(image_size: int) -> EvalTransform:
    return EvalTransform(image_size)
