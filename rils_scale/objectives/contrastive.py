"""Symmetric InfoNCE over the global batch (OpenCLIP's "local loss, gather with gradient").

Each data-parallel rank scores its own rows against every rank's columns; features are
gathered over the **data-parallel group only** (with TP, every TP peer holds the same
replicated embeddings, so gathering over the world would duplicate them), with gradient,
and labels are offset by the DP rank. With DeepSpeed's averaging of gradients over DP this
is the gradient of the global-batch loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..parallel.mappings import _rank, all_gather_batch


@dataclass
class ContrastiveOutput:
    loss: torch.Tensor
    """Mean of the image->text and text->image cross-entropies over this rank's rows."""
    correct_image_to_text: torch.Tensor
    """[B] bool: this rank's images whose top-1 text in the global batch is their own."""
    all_text_features: torch.Tensor
    """[global B, E] gathered text embeddings (the sentence prototypes), with gradient."""
    image_to_text_logits: torch.Tensor
    """[B, global B] logits of this rank's images (scaled)."""


class ContrastiveLoss(torch.nn.Module):
    def __init__(self, dp_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.dp_group = dp_group

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> ContrastiveOutput:
        all_images = all_gather_batch(image_features, self.dp_group)
        all_texts = all_gather_batch(text_features, self.dp_group)
        b = image_features.shape[0]
        labels = torch.arange(b, device=image_features.device) + b * _rank(self.dp_group)
        logits_i2t = logit_scale * image_features @ all_texts.T
        logits_t2i = logit_scale * text_features @ all_images.T
        acc_dtype = torch.promote_types(logits_i2t.dtype, torch.float32)  # fp32 softmax for bf16
        loss = 0.5 * (F.cross_entropy(logits_i2t.to(acc_dtype), labels)
                      + F.cross_entropy(logits_t2i.to(acc_dtype), labels))
        correct = logits_i2t.detach().argmax(dim=-1) == labels
        return ContrastiveOutput(loss, correct, all_texts, logits_i2t)
