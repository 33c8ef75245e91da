"""Evaluation data: labelled image shards or ImageFolder directories -> frozen features.

Two sources, detected from the path:

- **shards** (a directory of ``.tar``, a brace pattern, a list): LAION layout with ``KEY.txt``
  captions and ``KEY.json`` holding ``label`` (int) and optionally ``class_name``; read with
  :func:`rils_scale.data.build_eval_loader` (ordered, no augmentation).
- **ImageFolder** (``ROOT/<class>/<image>``): labels from the sorted folder names, class names
  from the folder names (``_`` -> space); no captions, so no retrieval.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class Features:
    """Frozen, L2-normalised features of one split."""

    image: torch.Tensor
    """``[N, E]`` image embeddings (``encode_image``, normalised)."""
    labels: Optional[torch.Tensor] = None
    """``[N]`` int labels, or None when the data has none."""
    text: Optional[torch.Tensor] = None
    """``[N, E]`` caption embeddings (shards with captions only)."""
    captions: List[str] = field(default_factory=list)
    class_names: Dict[int, str] = field(default_factory=dict)
    """label -> name, from ``class_name`` in the shards' JSON or the ImageFolder folders."""
    skipped: Dict[str, int] = field(default_factory=dict)

    def __len__(self):
        return self.image.shape[0]


def is_image_folder(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    entries = os.listdir(path)
    if any(e.endswith(".tar") for e in entries):
        return False
    subdirs = [e for e in entries if os.path.isdir(os.path.join(path, e))]
    return bool(subdirs) and any(f.lower().endswith(IMAGE_SUFFIXES)
                                 for d in subdirs for f in os.listdir(os.path.join(path, d)))


@torch.no_grad()
def _encode_images(model, images: torch.Tensor, device) -> torch.Tensor:
    # Images in the model's dtype: a bf16 model (DeepSpeed bf16 weights) refuses fp32 pixels.
    dtype = next(model.parameters()).dtype
    return F.normalize(model.encode_image(images.to(device, dtype)).float(), dim=-1).cpu()


@torch.no_grad()
def extract_features(model, path: str, *, batch_size: int = 128, max_samples: int = 0,
                     with_text: bool = True) -> Features:
    """Encode a labelled dataset with a :func:`rils_scale.load_model` model."""
    device = next(model.parameters()).device
    if is_image_folder(path):
        return _image_folder_features(model, path, batch_size, max_samples, device)
    from ..data.pipeline import build_eval_loader
    cfg = model.cfg
    loader = build_eval_loader(path, model.tokenizer if with_text else None, cfg.vision.image_size, batch_size,
                               context_length=cfg.text.context_length)
    images, texts, labels, captions, names, skipped = [], [], [], [], {}, {}
    has_labels, seen = True, 0
    for batch in loader:
        take = len(batch["keys"]) if not max_samples else min(len(batch["keys"]), max_samples - seen)
        if take <= 0:
            break
        images.append(_encode_images(model, batch["images"][:take], device))
        if with_text:
            texts.append(F.normalize(model.encode_text(batch["token_ids"][:take].to(device)).float(), dim=-1).cpu())
        captions += batch["captions"][:take]
        for meta in batch["json"][:take]:
            if "label" not in meta:
                has_labels = False
                labels.append(-1)
                continue
            labels.append(int(meta["label"]))
            if "class_name" in meta:
                names[int(meta["label"])] = str(meta["class_name"])
        for k, v in batch.get("skipped", {}).items():
            skipped[k] = skipped.get(k, 0) + int(v)
        seen += take
    if not images:
        raise ValueError(f"no usable samples in {path} (skipped: {skipped})")
    return Features(torch.cat(images), torch.tensor(labels) if has_labels else None,
                    torch.cat(texts) if with_text else None, captions, names, skipped)


def _image_folder_features(model, path, batch_size, max_samples, device) -> Features:
    from PIL import Image
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    files = [(os.path.join(path, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(path, c))) if f.lower().endswith(IMAGE_SUFFIXES)]
    if max_samples:
        files = files[:max_samples]
    feats, labels, skipped = [], [], {}
    for start in range(0, len(files), batch_size):
        batch, batch_labels = [], []
        for file, label in files[start:start + batch_size]:
            try:
                with Image.open(file) as im:
                    batch.append(model.transform(im.convert("RGB")))
                batch_labels.append(label)
            except OSError:
                skipped["corrupt_image"] = skipped.get("corrupt_image", 0) + 1
        if batch:
            feats.append(_encode_images(model, torch.stack(batch), device))
            labels += batch_labels
    if not feats:
        raise ValueError(f"no readable images under {path}")
    return Features(torch.cat(feats), torch.tensor(labels), None, [],
                    {i: c.replace("_", " ") for i, c in enumerate(classes)}, skipped)
