"""Patch-sentence probability maps: which sentence each image patch "belongs to".

For images and S sentences, ``p[b, n, s] = softmax_s(patch_bn . sentence_s / tau)`` with
normalised projected patch tokens (``encode_patches``), normalised sentence embeddings and
tau = 0.04, the teacher temperature of RILS's reconstruction target: these are exactly the
distributions the decoder learns to predict for masked patches.

Rendering uses PIL only (no matplotlib dependency): one row per image with the image, the
argmax-sentence map over the image (legend below) and one heat map per sentence.
"""
from __future__ import annotations

import textwrap
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

TEACHER_TEMPERATURE = 0.04

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]
# viridis at 5 anchors, linearly interpolated
_HEAT = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float32)


@torch.no_grad()
def patch_sentence_probabilities(model, images: torch.Tensor, token_ids: torch.Tensor,
                                 temperature: float = TEACHER_TEMPERATURE) -> torch.Tensor:
    """``[B, N, S]`` probabilities over the S sentences for every patch of every image.

    ``model`` is a single-process RILS or, in training, the engine's module: under ZeRO-3 every
    rank must call this (each submodule's forward gathers its partitioned parameters).
    """
    patches = model.encode_patches(images, normalize=True).float()        # [B, N, E]
    text = F.normalize(model.encode_text(token_ids).float(), dim=-1)       # [S, E]
    return torch.softmax(patches @ text.t() / temperature, dim=-1)


def denormalize(image: torch.Tensor, mean=None, std=None) -> Image.Image:
    """A CLIP-normalised ``[3, H, W]`` tensor back to a PIL image."""
    from ..data.transforms import CLIP_MEAN, CLIP_STD
    mean = torch.tensor(mean or CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(std or CLIP_STD).view(3, 1, 1)
    x = (image.detach().float().cpu() * std + mean).clamp(0, 1)
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _heat(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 (viridis)."""
    pos = np.clip(values, 0, 1) * (len(_HEAT) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_HEAT) - 2)
    frac = (pos - lo)[..., None]
    return (_HEAT[lo] * (1 - frac) + _HEAT[lo + 1] * frac).round().astype(np.uint8)


def _grid(values: np.ndarray, grid: int, cell: int) -> np.ndarray:
    """``[N]`` per-patch values -> ``[cell, cell]`` nearest-neighbour upsampled map."""
    return np.kron(values.reshape(grid, grid), np.ones((cell // grid + 1, cell // grid + 1)))[:cell, :cell]


def render_maps(images: Sequence[Image.Image], probs: torch.Tensor, sentences: Sequence[str], *,
                cell: int = 160, max_heatmaps: Optional[int] = None) -> Image.Image:
    """One row per image: image | argmax map + legend | one heat map per sentence."""
    b, n, s = probs.shape
    grid = int(round(n ** 0.5))
    if grid * grid != n:
        raise ValueError(f"{n} patches do not form a square grid")
    if len(sentences) != s or len(images) != b:
        raise ValueError(f"{b} images / {s} sentences do not match probabilities {tuple(probs.shape)}")
    shown = list(range(s if max_heatmaps is None else min(s, max_heatmaps)))
    font = ImageFont.load_default()
    title_h, pad = 28, 6
    legend_h = 14 * s + 6
    cols = 2 + len(shown)
    width = cols * (cell + pad) + pad
    row_h = title_h + cell + legend_h + pad
    canvas = Image.new("RGB", (width, b * row_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    p = probs.detach().float().cpu().numpy()
    for i, image in enumerate(images):
        y0 = pad + i * row_h
        base = image.convert("RGB").resize((cell, cell), Image.BICUBIC)
        x = pad
        canvas.paste(base, (x, y0 + title_h))
        draw.text((x, y0 + 2), "image", fill=(0, 0, 0), font=font)
        # argmax map blended with the image
        x += cell + pad
        arg = p[i].argmax(axis=1)
        colours = np.array([_PALETTE[j % len(_PALETTE)] for j in range(s)], dtype=np.uint8)
        arg_map = colours[_grid(arg, grid, cell).astype(int)]
        blend = Image.blend(base, Image.fromarray(arg_map), 0.6)
        canvas.paste(blend, (x, y0 + title_h))
        draw.text((x, y0 + 2), "argmax sentence", fill=(0, 0, 0), font=font)
        ly = y0 + title_h + cell + 4
        for j, sentence in enumerate(sentences):  # legend
            share = float((arg == j).mean())
            draw.rectangle([pad, ly + 14 * j + 2, pad + 10, ly + 14 * j + 12], fill=tuple(int(c) for c in colours[j]))
            draw.text((pad + 14, ly + 14 * j), f"[{j}] {sentence[:110]}  ({100 * share:.0f}% of patches)",
                      fill=(0, 0, 0), font=font)
        for j in shown:  # per-sentence heat maps
            x += cell + pad
            heat = _heat(_grid(p[i, :, j], grid, cell))
            canvas.paste(Image.fromarray(heat), (x, y0 + title_h))
            label = textwrap.shorten(f"[{j}] {sentences[j]}", width=max(10, cell // 6), placeholder="..")
            draw.text((x, y0 + 2), label, fill=(0, 0, 0), font=font)
            draw.text((x, y0 + 14), f"max p = {p[i, :, j].max():.2f}", fill=(80, 80, 80), font=font)
    return canvas


def visualize(model, images: Sequence[Image.Image], sentences: Sequence[str], *,
              temperature: float = TEACHER_TEMPERATURE, cell: int = 160) -> Image.Image:
    """PIL images + sentences -> rendered grid, with a :func:`rils_scale.load_model` model."""
    device = next(model.parameters()).device
    batch = torch.stack([model.transform(im) for im in images]).to(device)
    dtype = next(model.parameters()).dtype  # a bf16 model refuses fp32 pixels
    probs = patch_sentence_probabilities(model, batch.to(dtype), model.tokenize(list(sentences)), temperature)
    return render_maps([denormalize(t) for t in batch], probs, sentences, cell=cell)


# ------------------------------------------------------------------------------ training hook
def _fixed_samples(trainer, count: int):
    """The first ``count`` samples of the first training shard (same on every rank), cached."""
    cached = getattr(trainer, "_viz_samples", None)
    if cached is not None:
        return cached
    from ..data.pipeline import build_eval_loader
    from ..data.sources import expand_urls
    cfg = trainer.model_cfg
    first = expand_urls(trainer.cfg.train_data)[:1]
    batch = next(iter(build_eval_loader(first, trainer.tokenizer, cfg.vision.image_size, count,
                                        context_length=cfg.text.context_length)))
    trainer._viz_samples = batch
    return batch


def training_visualization(trainer, logger, num_images: int = 4, temperature: float = TEACHER_TEMPERATURE) -> None:
    """Called by ``Trainer`` every ``--visualize-every`` steps, on every rank.

    Maps of a few fixed training samples against their own captions, logged to TensorBoard as
    ``patch_sentence/maps`` by rank 0. All ranks run the forward: under ZeRO-3 the parameters
    are partitioned over DP and the TP layers communicate, so a rank that skipped it would hang
    the others.
    """
    batch = _fixed_samples(trainer, num_images)
    module = trainer.engine.module
    was_training = module.training
    module.eval()
    try:
        images = batch["images"].to(trainer.device, trainer.dtype)
        probs = patch_sentence_probabilities(module, images, batch["token_ids"].to(trainer.device), temperature)
    finally:
        module.train(was_training)
    if not trainer.is_main:
        return
    grid = render_maps([denormalize(t) for t in batch["images"]], probs, batch["captions"], cell=128)
    logger.add_image("patch_sentence/maps", np.asarray(grid), trainer.step)
