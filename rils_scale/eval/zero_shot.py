"""Zero-shot classification: class embeddings = mean of normalised prompt embeddings
(CLIP's prompt ensembling), re-normalised; prediction = argmax cosine similarity."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")


@torch.no_grad()
def build_classifier(model, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """``[C, E]`` normalised class embeddings from ``templates`` (each with one ``{}``)."""
    if not class_names:
        raise ValueError("zero-shot classification needs class names")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("every prompt template needs a '{}' placeholder for the class name")
    device = next(model.parameters()).device
    rows = []
    for name in class_names:
        ids = model.tokenize([t.format(name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(ids).float(), dim=-1).mean(dim=0)
        rows.append(F.normalize(emb, dim=-1))
    return torch.stack(rows).cpu()


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> Dict[str, float]:
    out = {}
    for k in ks:
        k_eff = min(k, logits.shape[1])
        hit = (logits.topk(k_eff, dim=1).indices == labels[:, None]).any(dim=1)
        out[f"top{k}"] = hit.float().mean().item()
    return out


def zero_shot(model, image_features: torch.Tensor, labels: torch.Tensor, class_names: List[str],
              templates: Sequence[str]) -> Dict[str, float]:
    """Top-1 / top-5 accuracy of zero-shot classification on normalised image features."""
    classifier = build_classifier(model, class_names, templates)
    result = topk_accuracy(image_features @ classifier.t(), labels)
    result.update(num_classes=len(class_names), num_images=int(labels.numel()), num_templates=len(templates),
                  chance_top1=1.0 / len(class_names))
    return result
