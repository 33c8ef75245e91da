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
PROBE_FEATURES = ("encoder", "joint")


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
    encoder: Optional[torch.Tensor] = None
    """``[N, D]`` encoder features (``encode_image_features``: pooled, final-normed, before the
    projection; L2-normalised), for the linear probe and k-shot; None unless asked for."""

    def probe_features(self, which: str) -> torch.Tensor:
        """The features a probe reads: ``encoder`` (default of the paper's tables) or ``joint``."""
        if which == "joint":
            return self.image
        if which == "encoder":
            if self.encoder is None:
                raise ValueError("encoder features were not extracted (extract_features(..., with_encoder=True))")
            return self.encoder
        raise ValueError(f"unknown probe features {which!r}; choose from {PROBE_FEATURES}")

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


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


@torch.no_grad()
def _encode_images(model, images: torch.Tensor, device, with_encoder: bool = False):
    """Normalised joint embeddings ``[B, E]`` (and encoder features ``[B, D]``, or None).
    Images are cast to the model's dtype: a bf16 model would reject fp32 pixels."""
    images = images.to(device, _model_dtype(model))
    joint = F.normalize(model.encode_image(images).float(), dim=-1).cpu()
    if not with_encoder:
        return joint, None
    return joint, F.normalize(model.encode_image_features(images).float(), dim=-1).cpu()


@torch.no_grad()
def extract_features(model, path: str, *, batch_size: int = 128, max_samples: int = 0,
                     with_text: bool = True, with_encoder: bool = False, layout: str = "laion") -> Features:
    """Encode a labelled dataset with a :func:`rils_scale.load_model` model. ``layout``: shards
    in the LAION layout (``KEY.txt`` + ``KEY.json``) or CLIP_benchmark's (``KEY.cls``, no caption).
    ``Features.skipped`` counts every sample the reader dropped, by reason."""
    device = next(model.parameters()).device
    if is_image_folder(path):
        return _image_folder_features(model, path, batch_size, max_samples, device, with_encoder)
    from ..data.pipeline import build_eval_loader
    cfg = model.cfg
    with_text = with_text and layout != "clip_benchmark"  # no captions there
    loader = build_eval_loader(path, model.tokenizer if with_text else None, cfg.vision.image_size, batch_size,
                               context_length=cfg.text.context_length, layout=layout)
    images, encoder, texts, labels, captions, names, skipped = [], [], [], [], [], {}, {}
    has_labels, seen = True, 0
    for batch in loader:
        take = len(batch["keys"]) if not max_samples else min(len(batch["keys"]), max_samples - seen)
        if take <= 0:
            break
        joint, enc = _encode_images(model, batch["images"][:take], device, with_encoder)
        images.append(joint)
        encoder.append(enc)
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
        seen += take
    skipped = dict(loader.skipped_total)  # complete: trailing bad samples come after the last batch
    if not images:
        hint = (" -- a split of a CLIP_benchmark set (KEY.cls labels, no captions)? pass the set's folder"
                if skipped.get("missing_caption") and layout == "laion" else "")
        raise ValueError(f"no usable samples in {path} (skipped: {skipped or 'none: no shard holds a sample'}){hint}")
    return Features(torch.cat(images), torch.tensor(labels) if has_labels else None,
                    torch.cat(texts) if with_text else None, captions, names, skipped,
                    torch.cat(encoder) if with_encoder else None)


def _image_folder_features(model, path, batch_size, max_samples, device, with_encoder=False) -> Features:
    from PIL import Image
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    files = [(os.path.join(path, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(path, c))) if f.lower().endswith(IMAGE_SUFFIXES)]
    if max_samples:
        files = files[:max_samples]
    feats, encoder, labels, skipped = [], [], [], {}
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
            joint, enc = _encode_images(model, torch.stack(batch), device, with_encoder)
            feats.append(joint)
            encoder.append(enc)
            labels += batch_labels
    if not feats:
        raise ValueError(f"no readable images under {path}")
    return Features(torch.cat(feats), torch.tensor(labels), None, [],
                    {i: c.replace("_", " ") for i, c in enumerate(classes)}, skipped,
                    torch.cat(encoder) if with_encoder else None)
