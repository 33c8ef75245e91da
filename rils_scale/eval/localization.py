"""Localisation from patch–sentence similarity: does each object's phrase claim its patches?

For an image with objects k = 1..K (phrase + pixel mask, as the built-in ``scenes`` store
them in ``KEY.json``), every patch is assigned to the phrase it is most similar to, among
the image's own K phrases (argmax over k of ``cos(patch, phrase_k)``; projected, normalised
patch tokens of the unmasked image against normalised phrase embeddings -- the quantity RILS
reconstructs, without its temperature, which does not change an argmax). A patch is *inside*
object k when at least half of its pixels are in k's mask. Per object, the score is the
fraction of its inside patches assigned to its phrase; ``accuracy`` is the mean over objects
(so a map that gives every patch to one phrase scores exactly chance), ``patch_accuracy`` the
fraction over all inside patches. Chance is ``1/K`` per object (a uniformly random phrase).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.multi_scenes import rle_decode


def patch_coverage(mask: np.ndarray, image_size: int, patch_size: int) -> np.ndarray:
    """Fraction of each patch's pixels inside ``mask`` (resized to the model's input), ``[N]``."""
    if mask.shape != (image_size, image_size):
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((image_size, image_size),
                                                                                Image.NEAREST)) > 0
    g = image_size // patch_size
    return mask[:g * patch_size, :g * patch_size].reshape(g, patch_size, g, patch_size).mean(axis=(1, 3)).reshape(-1)


def object_masks(meta: dict) -> List[np.ndarray]:
    size = int(meta.get("image_size", 32))
    return [rle_decode(o["mask_rle"], (size, size)) for o in meta["objects"]]


class _PhraseCache:
    def __init__(self, model):
        self.model, self.cache = model, {}

    @torch.no_grad()
    def __call__(self, phrases: Sequence[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(phrases) if p not in self.cache]
        if missing:
            emb = F.normalize(self.model.encode_text(self.model.tokenize(missing)).float(), dim=-1).cpu()
            self.cache.update(zip(missing, emb))
        return torch.stack([self.cache[p] for p in phrases])


@torch.no_grad()
def patch_assignments(model, images: torch.Tensor, phrase_lists: Sequence[Sequence[str]],
                      phrases: Optional[_PhraseCache] = None) -> List[torch.Tensor]:
    """Per image, ``[N]`` index of the most similar of its own phrases for every patch."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    patches = model.encode_patches(images.to(device, dtype), normalize=True).float().cpu()  # [B, N, E]
    phrases = phrases or _PhraseCache(model)
    return [(patches[i] @ phrases(list(p)).t()).argmax(dim=1) for i, p in enumerate(phrase_lists)]


@torch.no_grad()
def localization(model, data: str, *, batch_size: int = 128, max_samples: int = 0,
                 inside_threshold: float = 0.5) -> Dict[str, object]:
    """Score a :func:`rils_scale.load_model` model on shards whose JSON lists ``objects``."""
    from ..data.pipeline import build_eval_loader
    cfg = model.cfg
    size, patch = cfg.vision.image_size, cfg.vision.patch_size
    loader = build_eval_loader(data, None, size, batch_size, context_length=cfg.text.context_length)
    cache = _PhraseCache(model)
    per_object, hits, inside_total, chance, images_seen, no_patch = [], 0, 0, [], 0, 0
    for batch in loader:
        metas = batch["json"]
        keep = [i for i, m in enumerate(metas) if len(m.get("objects", ())) >= 2]
        if max_samples:
            keep = keep[:max(0, max_samples - images_seen)]
        if not keep:
            if max_samples and images_seen >= max_samples:
                break
            continue
        phrase_lists = [[o["phrase"] for o in metas[i]["objects"]] for i in keep]
        assigned = patch_assignments(model, batch["images"][keep], phrase_lists, cache)
        for i, a in zip(keep, assigned):
            masks = object_masks(metas[i])
            for k, mask in enumerate(masks):
                inside = torch.from_numpy(patch_coverage(mask, size, patch) >= inside_threshold)
                if not inside.any():  # thin objects (a small ring) may cover no patch by half
                    no_patch += 1
                    continue
                correct = int((a[inside] == k).sum())
                per_object.append(correct / int(inside.sum()))
                hits += correct
                inside_total += int(inside.sum())
                chance.append(1.0 / len(masks))
        images_seen += len(keep)
    if not per_object:
        return {"skipped": f"no objects with masks in {data} (KEY.json 'objects', as --builtin scenes writes)"}
    return {"accuracy": float(np.mean(per_object)), "patch_accuracy": hits / inside_total,
            "chance": float(np.mean(chance)), "num_images": images_seen, "num_objects": len(per_object),
            "objects_without_inside_patch": no_patch, "inside_threshold": inside_threshold}


def map_phrases(meta: dict, background: Optional[str] = None) -> List[str]:
    """The phrases a scene's map is drawn against: its objects', then ``background`` with ``{}``
    replaced by the sample's background name (``"the {} background"`` -> ``"the black
    background"``; ``"the background"`` when the JSON names none)."""
    phrases = [o["phrase"] for o in meta["objects"]]
    if background:
        phrases.append(" ".join(background.replace("{}", str(meta.get("background", ""))).split()))
    return phrases


@torch.no_grad()
def render_localization_maps(model, data: str, num: int = 6, cell: int = 128,
                             background: Optional[str] = None) -> Image.Image:
    """Maps of the first ``num`` multi-object images of ``data`` against their own object
    phrases (one row per image: image | closest phrase | a heat map per phrase).
    ``background``: a phrase added last to each image's list, so background patches have a
    phrase of their own instead of going to the nearest object's; ``{}`` is replaced by the
    sample's background name (``KEY.json`` "background", e.g. "the {} background" -> "the black
    background"; "the" when the JSON has none)."""
    from ..data.pipeline import build_eval_loader
    from .visualize import TEACHER_TEMPERATURE, denormalize, render_maps
    cfg = model.cfg
    batch = next(iter(build_eval_loader(data, None, cfg.vision.image_size, max(num * 2, 16),
                                        context_length=cfg.text.context_length)))
    rows = [i for i, m in enumerate(batch["json"]) if len(m.get("objects", ())) >= 2][:num]
    cache = _PhraseCache(model)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    panels = []
    for i in rows:
        phrases = map_phrases(batch["json"][i], background)
        patches = model.encode_patches(batch["images"][i:i + 1].to(device, dtype), normalize=True).float().cpu()
        probs = torch.softmax(patches @ cache(phrases).t() / TEACHER_TEMPERATURE, dim=-1)
        panels.append(render_maps([denormalize(batch["images"][i])], probs, phrases, cell=cell))
    width = max(p.width for p in panels)
    canvas = Image.new("RGB", (width, sum(p.height for p in panels)), (255, 255, 255))
    y = 0
    for p in panels:
        canvas.paste(p, (0, y))
        y += p.height
    return canvas
