"""The RILS model: vision encoder (two passes), RILS decoder, text tower, projections.

Model math only: no DeepSpeed, no losses. ``forward`` returns every tensor the objective
needs; ``encode_image`` / ``encode_text`` are the public faces for downstream use.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..parallel.layers import initialized_tensor, normal_init
from .config import RILSConfig
from .text import TextEncoder
from .transformer import ParallelSpec
from .vision import RILSDecoder, VisionEncoder, random_masking

MASK_STRATEGIES = ("random", "text-guided")


class Projection(nn.Module):
    """``x @ W`` without bias (CLIP's projection matrices), initialised with std ``in^-0.5``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(initialized_tensor((in_features, out_features), normal_init(in_features ** -0.5)))

    def forward(self, x):
        return x @ self.weight


class LogitScale(nn.Module):
    """Learned log temperature, clamped inside forward (a clamp after the optimizer step would
    read an empty partition under ZeRO-3, DESIGN §7)."""

    def __init__(self, init: float, maximum: float):
        super().__init__()
        self.value = nn.Parameter(torch.full((1,), float(init)))  # 1-d: ZeRO-3 cannot partition 0-d
        self.maximum = maximum

    def forward(self):
        return self.value.clamp(max=self.maximum).exp().squeeze(0)


class RILS(nn.Module):
    def __init__(self, cfg: RILSConfig, spec: Optional[ParallelSpec] = None, attn_backend: str = "auto"):
        super().__init__()
        spec = spec or ParallelSpec()
        self.cfg, self.spec = cfg, spec
        self.visual = VisionEncoder(cfg.vision, spec, cfg.dropout, attn_backend)
        self.decoder = RILSDecoder(cfg.vision, spec, cfg.dropout, attn_backend)
        self.image_projection = Projection(cfg.vision.width, cfg.embed_dim)
        self.text = TextEncoder(cfg.text, spec, cfg.dropout, attn_backend)
        self.text_projection = Projection(cfg.text.width, cfg.embed_dim)
        self.logit_scale = LogitScale(cfg.logit_scale_init, cfg.logit_scale_max)

    # ------------------------------------------------------------------ public faces
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Global image embedding: projected mean of final-normed patch tokens (cls excluded)."""
        tokens = self.visual(images)
        x = self.image_projection(tokens[:, 1:].mean(dim=1))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, token_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.text_projection(self.text(token_ids))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_patches(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Projected patch tokens of the unmasked image ``[B, N, E]`` (patch-sentence maps)."""
        x = self.image_projection(self.visual(images)[:, 1:])
        return F.normalize(x, dim=-1) if normalize else x

    # ------------------------------------------------------------------ training step
    def forward(self, images: torch.Tensor, token_ids: torch.Tensor, *,
                mask_generator: Optional[torch.Generator] = None, mask_strategy: str = "random",
                mask_temperature: float = 0.1) -> Dict[str, torch.Tensor]:
        """One RILS step's features, all L2-normalised.

        Returns ``image_features [B, E]``, ``text_features [B, E]``, ``logit_scale`` (scalar),
        ``teacher_patches [B, N, E]`` (unmasked pass), ``student_patches [B, N, E]``
        (decoder predictions), ``mask [B, N]`` (1 = masked).
        """
        if mask_strategy not in MASK_STRATEGIES:
            raise ValueError(f"unknown mask strategy {mask_strategy!r}; choose from {MASK_STRATEGIES}")
        text_features = F.normalize(self.encode_text(token_ids), dim=-1)

        # Unmasked pass (with gradient: it feeds the contrastive loss).
        tokens = self.visual(images)
        patch_proj = self.image_projection(tokens[:, 1:])
        image_features = F.normalize(self.image_projection(tokens[:, 1:].mean(dim=1)), dim=-1)
        teacher = F.normalize(patch_proj, dim=-1)

        # Masking: random, or guided by each patch's similarity to its own caption.
        b, n = images.shape[0], self.cfg.vision.num_patches
        scores = None
        if mask_strategy == "text-guided":
            scores = torch.einsum("bnd,bd->bn", teacher.detach().float(), text_features.detach().float())
        ids_keep, mask, ids_restore = random_masking(b, n, self.cfg.mask_ratio, generator=mask_generator,
                                                     scores=scores, temperature=mask_temperature,
                                                     device=images.device)

        # Masked pass and decoder.
        visible = self.visual(images, ids_keep)
        predictions = self.decoder(visible, ids_restore)
        student = F.normalize(self.image_projection(predictions), dim=-1)
        return {
            "image_features": image_features,
            "text_features": text_features,
            "logit_scale": self.logit_scale(),
            "teacher_patches": teacher,
            "student_patches": student,
            "mask": mask.to(images.dtype),
        }
