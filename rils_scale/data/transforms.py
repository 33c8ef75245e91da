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
import warnings

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
import torch.nn.functional as F

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


class CropResize:
    """The training crop on undecoded bytes: ``TrainTransform``'s distribution, a cheaper sample.

    ``transform(data, rng) -> uint8 [S, S, 3]`` (channels-last). The crop box is drawn from the
    sample's ``rng`` on the *header* size, exactly as ``TrainTransform`` draws it, so every
    sample gets the same crop as before. Then:

    * JPEG draft mode: when the crop, reduced by 2, 4 or 8, is still at least ``S`` pixels on
      both sides, libjpeg decodes at that reduced scale (DCT-domain scaling) and the box is
      scaled to match. This is an approximation: pixels differ slightly from a full decode +
      antialiased bicubic resize (a box filter precedes the bicubic one), the crop is the same.
      At 224 px from 512x384 photos the crop is never 2x larger than 224, so it rarely applies;
      it matters for large originals. ``draft=False`` turns it off.
    * crop first (a view), then torch's uint8 antialiased bicubic kernel (the one torchvision
      v2's resize calls; a port of PIL's antialias filter) on a channels-last copy of the crop,
      so the result lands in the batch row with a memcpy (0.34 ms CPU here, against 0.90 ms
      through v2's resize with its CHW output, and 1.6 ms for PIL or torchvision v1 on a 400x300
      crop to 224); values match PIL's resize to within rounding, not bit for bit.
    * no float conversion or normalisation here: the batch stays uint8 (4x less to copy
      through shared memory); ``prepare_images`` normalises on the device.
    """

    def __init__(self, image_size: int, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), draft: bool = True):
        self.image_size, self.scale, self.ratio, self.draft = image_size, scale, ratio, draft

    def __call__(self, data: bytes, rng: random.Random | None = None, out=None) -> torch.Tensor:
        """``out``: an optional uint8 numpy ``[S, S, 3]`` view (a row of the batch) to write into."""
        import numpy as np
        from .decode import load_rgb, open_image
        rng = rng if rng is not None else random.Random()
        size = self.image_size
        with open_image(data) as image:
            width, height = image.size
            top, left, h, w = random_resized_crop_params(width, height, rng, self.scale, self.ratio)
            if self.draft and image.format in ("JPEG", "MPO"):
                reduce = 8
                while reduce > 1 and (h // reduce < size or w // reduce < size):
                    reduce //= 2
                if reduce > 1:
                    image.draft("RGB", (-(-width // reduce), -(-height // reduce)))
            image = load_rgb(image)
            sx, sy = image.width / width, image.height / height
            with warnings.catch_warnings():  # a read-only view of PIL's bytes (one copy, not two); never written
                warnings.simplefilter("ignore", UserWarning)
                pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8))  # [H, W, 3]
        top, left = int(round(top * sy)), int(round(left * sx))
        h, w = max(1, int(round(h * sy))), max(1, int(round(w * sx)))
        crop = pixels[top:top + h, left:left + w].permute(2, 0, 1)[None]
        # torch's uint8 antialiased bicubic kernel (what torchvision v2's resize calls: bit-identical
        # output) on a channels-last copy of the crop returns channels-last, so the copy into the
        # batch row is a memcpy; v2's resize returns CHW (a strided copy). 0.34 vs 0.90 ms here.
        resized = F.interpolate(crop.contiguous(memory_format=torch.channels_last), size=(size, size),
                                mode="bicubic", antialias=True)[0].permute(1, 2, 0)
        if out is None:
            return resized.contiguous()
        out[...] = resized.numpy()
        return out

    def __repr__(self):
        return f"CropResize(image_size={self.image_size}, scale={self.scale}, ratio={self.ratio}, draft={self.draft})"


def prepare_images(images: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """Loader batch -> model input on ``device``: uint8 ``[B, S, S, 3]`` becomes normalised
    ``[B, 3, S, S]`` of ``dtype`` there (the cast runs on the accelerator, not in a worker).
    Float ``[B, 3, S, S]`` batches (already normalised: eval loaders) are only moved and cast."""
    if images.dtype != torch.uint8:
        return images.to(device, dtype, non_blocking=True)
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    # non_blocking: torch.tensor(..., device=cuda) copies blocking, i.e. waits for the queued step
    mean = torch.tensor(CLIP_MEAN).to(x.device, non_blocking=True).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).to(x.device, non_blocking=True).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).to(dtype).contiguous()
