"""Patch-sentence probability maps: which sentence each image patch "belongs to".

For images and S sentences, ``p[b, n, s] = softmax_s(patch_bn . sentence_s / tau)`` with
normalised projected patch tokens (``encode_patches``), normalised sentence embeddings and
tau = 0.04, the teacher temperature of RILS's reconstruction target: these are exactly the
distributions the decoder learns to predict for masked patches.

Rendering uses PIL only (no matplotlib dependency). One row per image:

- the image;
- "closest phrase": the image again, with the patches split into regions by the phrase each is
  most likely to belong to (argmax), region borders drawn and every region labelled with its
  phrase's number. Numbers, not colours: the phrases name colours ("a blue triangle"), and a
  colour-coded legend would put a yellow swatch next to the word blue;
- one heat map per phrase (viridis, 0 to 1) and a colour bar giving the scale;

and below the row the legend: each number, its phrase and the share of patches it claims.
"""
from __future__ import annotations

import textwrap
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

TEACHER_TEMPERATURE = 0.04

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


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _components(labels: np.ndarray) -> list:
    """4-connected regions of equal label on a ``[g, g]`` grid: ``[(label, [(r, c), ...]), ...]``."""
    g = labels.shape[0]
    seen = np.zeros_like(labels, dtype=bool)
    out = []
    for r0 in range(g):
        for c0 in range(g):
            if seen[r0, c0]:
                continue
            stack, cells, seen[r0, c0] = [(r0, c0)], [], True
            while stack:
                r, c = stack.pop()
                cells.append((r, c))
                for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                    if 0 <= rr < g and 0 <= cc < g and not seen[rr, cc] and labels[rr, cc] == labels[r0, c0]:
                        seen[rr, cc] = True
                        stack.append((rr, cc))
            out.append((int(labels[r0, c0]), cells))
    return out


def _badge(draw: ImageDraw.ImageDraw, x: float, y: float, text: str, font, radius: int) -> None:
    """A dark disc with a white number, centred at (x, y): readable on any image colour."""
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(20, 20, 20), outline=(255, 255, 255))
    draw.text((x, y), text, fill=(255, 255, 255), font=font, anchor="mm")


def _region_panel(base: Image.Image, arg: np.ndarray, grid: int, cell: int, font) -> Image.Image:
    """The image with the argmax regions' borders and their phrase numbers (1-based)."""
    panel = Image.blend(base, Image.new("RGB", base.size, (0, 0, 0)), 0.15)
    draw = ImageDraw.Draw(panel)
    labels = arg.reshape(grid, grid)
    edge = [round(k * cell / grid) for k in range(grid + 1)]
    borders = []  # between patches of different phrases
    for r in range(grid):
        for c in range(grid):
            if c + 1 < grid and labels[r, c] != labels[r, c + 1]:
                borders.append([(edge[c + 1], edge[r]), (edge[c + 1], edge[r + 1])])
            if r + 1 < grid and labels[r, c] != labels[r + 1, c]:
                borders.append([(edge[c], edge[r + 1]), (edge[c + 1], edge[r + 1])])
    for fill, width in (((0, 0, 0), 4), ((255, 255, 255), 2)):  # white on black: visible on any colour
        for line in borders:
            draw.line(line, fill=fill, width=width)
    radius = max(5, min(11, cell // grid // 2 + 2))
    regions = _components(labels)
    largest = {}
    for label, cells in regions:
        largest[label] = max(largest.get(label, 0), len(cells))
    for label, cells in regions:  # every region of 2+ patches, and the largest of each phrase
        if len(cells) < 2 and len(cells) < largest[label]:
            continue
        cy, cx = np.mean(cells, axis=0)
        r, c = min(cells, key=lambda rc: (rc[0] - cy) ** 2 + (rc[1] - cx) ** 2)  # a cell inside the region
        _badge(draw, (edge[c] + edge[c + 1]) / 2, (edge[r] + edge[r + 1]) / 2, str(label + 1), font, radius)
    return panel


def _colour_bar(height: int, font) -> Image.Image:
    """A vertical viridis bar for probabilities 0..1 with ticks."""
    bar_w, width = 12, 44
    bar = Image.new("RGB", (width, height), (255, 255, 255))
    values = np.linspace(1, 0, height)[:, None].repeat(bar_w, axis=1)
    bar.paste(Image.fromarray(_heat(values)), (0, 0))
    draw = ImageDraw.Draw(bar)
    draw.rectangle([0, 0, bar_w - 1, height - 1], outline=(0, 0, 0))
    for v in (1.0, 0.5, 0.0):
        y = round((1 - v) * (height - 1))
        draw.line([(bar_w, y), (bar_w + 3, y)], fill=(0, 0, 0))
        draw.text((bar_w + 5, min(max(y, 6), height - 7)), f"{v:g}", fill=(0, 0, 0), font=font, anchor="lm")
    return bar


def render_maps(images: Sequence[Image.Image], probs: torch.Tensor, sentences: Sequence[str], *,
                cell: int = 160, max_heatmaps: Optional[int] = None) -> Image.Image:
    """One row per image: image | closest-phrase regions (numbered) | a heat map per phrase |
    colour bar, with the legend (number, phrase, share of patches) under the row."""
    b, n, s = probs.shape
    grid = int(round(n ** 0.5))
    if grid * grid != n:
        raise ValueError(f"{n} patches do not form a square grid")
    if len(sentences) != s or len(images) != b:
        raise ValueError(f"{b} images / {s} sentences do not match probabilities {tuple(probs.shape)}")
    shown = list(range(s if max_heatmaps is None else min(s, max_heatmaps)))
    font, small, badge_font = _font(13), _font(11), _font(12)
    title_h, pad, line_h = 34, 8, 18
    legend_h = line_h * s + 6
    bar = _colour_bar(cell, small)
    width = 2 * (cell + pad) + len(shown) * (cell + pad) + bar.width + 2 * pad
    row_h = title_h + cell + legend_h + pad
    canvas = Image.new("RGB", (width, b * row_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    p = probs.detach().float().cpu().numpy()
    for i, image in enumerate(images):
        y0 = pad + i * row_h
        top = y0 + title_h
        base = image.convert("RGB").resize((cell, cell), Image.BICUBIC)
        x = pad
        canvas.paste(base, (x, top))
        draw.text((x, y0 + 2), "image", fill=(0, 0, 0), font=font)
        x += cell + pad
        arg = p[i].argmax(axis=1)
        canvas.paste(_region_panel(base, arg, grid, cell, badge_font), (x, top))
        draw.text((x, y0 + 2), "closest phrase", fill=(0, 0, 0), font=font)
        draw.text((x, y0 + 17), "(numbers: legend below)", fill=(90, 90, 90), font=small)
        ly = top + cell + 6
        for j, sentence in enumerate(sentences):  # legend: the same badges as on the map
            share = float((arg == j).mean())
            _badge(draw, pad + 8, ly + line_h * j + 8, str(j + 1), badge_font, 8)
            draw.text((pad + 22, ly + line_h * j + 1), f"{sentence[:110]}: {100 * share:.0f}% of patches",
                      fill=(0, 0, 0), font=font)
        for j in shown:  # per-phrase heat maps, one shared scale (the colour bar)
            x += cell + pad
            canvas.paste(Image.fromarray(_heat(_grid(p[i, :, j], grid, cell))), (x, top))
            label = textwrap.shorten(f"{j + 1}: {sentences[j]}", width=max(10, cell // 7), placeholder="..")
            draw.text((x, y0 + 2), label, fill=(0, 0, 0), font=font)
            draw.text((x, y0 + 17), f"p(patch -> {j + 1}), max {p[i, :, j].max():.2f}", fill=(90, 90, 90), font=small)
        x += cell + pad
        canvas.paste(bar, (x, top))
        draw.text((x, y0 + 17), "p", fill=(0, 0, 0), font=font)
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
