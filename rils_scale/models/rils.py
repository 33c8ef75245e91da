"""The RILS model: vision encoder (two passes), RILS decoder, text tower, projections.

Model math only: no DeepSpeed, no losses. ``forward`` returns every tensor the objective
needs; ``encode_image`` / ``encode_text`` are the public faces for downstream use.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..parallel.layers import ColumnParallelLinear, initialized_tensor, normal_init
from .config import RILSConfig
from .text import TextEncoder
from .transformer import ParallelSpec
from .vision import RILSDecoder, VisionEncoder, random_masking

MASK_STRATEGIES = ("random", "text-guided")
RECON_TARGETS = ("language", "pixel", "vision")


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, 3, H, W]`` -> ``[B, N, p*p*3]`` in MAE's order (row-major patches, then p, q, c)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def normalized_pixel_targets(images: torch.Tensor, patch_size: int, eps: float = 1e-6) -> torch.Tensor:
    """MAE's ``norm_pix_loss`` targets: each patch's pixels standardised by its own mean and
    (unbiased, as MAE's ``var``) variance."""
    x = patchify(images, patch_size)
    mean, var = x.mean(dim=-1, keepdim=True), x.var(dim=-1, keepdim=True)
    return (x - mean) / (var + eps) ** 0.5


class Projection(nn.Module):
    """``x @ W`` without bias (CLIP's projection matrices), initialised with std ``in^-0.5``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(initialized_tensor((in_features, out_features), normal_init(in_features ** -0.5)))

    def forward(self, x):
        return x @ self.weight


class LogitScale(nn.Module):
    """Learned log temperature, capped at ``maximum``.

    The parameter itself is kept <= the cap by an in-place clamp after every optimizer step
    (``rils_scale.train.param_clamp``, ZeRO-3 safe), as OpenCLIP does. Forward caps the value
    too, as a safety for a parameter loaded from elsewhere, but straight-through: a plain
    ``clamp`` has zero gradient above the cap, and with the parameter exempt from weight decay
    nothing would ever bring it back.
    """

    def __init__(self, init: float, maximum: float):
        super().__init__()
        self.value = nn.Parameter(torch.full((1,), float(init)))  # 1-d: ZeRO-3 cannot partition 0-d
        self.maximum = maximum

    def forward(self):
        v = self.value
        capped = v - (v - v.clamp(max=self.maximum)).detach()  # value of clamp, gradient of identity
        return capped.exp().squeeze(0)


class RILS(nn.Module):
    def __init__(self, cfg: RILSConfig, spec: Optional[ParallelSpec] = None, attn_backend: str = "auto"):
        super().__init__()
        spec = spec or ParallelSpec()
        self.cfg, self.spec = cfg, spec
        self.visual = VisionEncoder(cfg.vision, spec, cfg.dropout, attn_backend)
        if cfg.recon_target not in RECON_TARGETS:
            raise ValueError(f"unknown reconstruction target {cfg.recon_target!r}; choose from {RECON_TARGETS}")
        self.decoder = RILSDecoder(cfg.vision, spec, cfg.dropout, attn_backend,
                                   context_dim=cfg.text.width if cfg.decoder_text_conditioning else None)
        if cfg.recon_target == "pixel":  # MAE's pixel head on the decoder's (encoder-width) output
            self.pixel_head = ColumnParallelLinear(cfg.vision.width, cfg.vision.patch_size ** 2 * 3)
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

    def encode_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder features ``[B, D]`` for probes: the mean of the final-normed patch tokens,
        before ``image_projection`` (what the paper's linear-probe and k-shot tables use)."""
        return self.visual(images)[:, 1:].mean(dim=1)

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
        ``mask [B, N]`` (1 = masked), ``masked_ids [B, N - K]`` (the masked positions, ascending)
        and the reconstruction's target and prediction per patch,
        ``teacher_patches`` / ``student_patches``, by ``cfg.recon_target``: language -- the
        projected, normalised unmasked-pass patches and decoder predictions ``[B, N, E]``;
        pixel -- MAE's normalised pixels and the pixel head's output ``[B, N, p*p*3]``;
        vision -- the unmasked pass's final-normed patch features (stop-gradient) and the
        decoder's predictions ``[B, N, D]``.
        """
        if mask_strategy not in MASK_STRATEGIES:
            raise ValueError(f"unknown mask strategy {mask_strategy!r}; choose from {MASK_STRATEGIES}")
        target = self.cfg.recon_target
        context = context_padding = None
        if self.cfg.decoder_text_conditioning:
            pooled, text_tokens, context_padding = self.text(token_ids, return_tokens=True)
            # Stop-gradient, like the prototypes: the text tower learns from the contrastive loss.
            context = text_tokens.detach()
        else:
            pooled = self.text(token_ids)
        text_features = F.normalize(self.text_projection(pooled), dim=-1)

        # Unmasked pass (with gradient: it feeds the contrastive loss).
        tokens = self.visual(images)
        image_features = F.normalize(self.image_projection(tokens[:, 1:].mean(dim=1)), dim=-1)
        teacher = None
        if target == "language" or mask_strategy == "text-guided":
            teacher = F.normalize(self.image_projection(tokens[:, 1:]), dim=-1)

        # Masking: random, or guided by each patch's similarity to its own caption.
        b, n = images.shape[0], self.cfg.vision.num_patches
        scores = None
        if mask_strategy == "text-guided":
            scores = torch.einsum("bnd,bd->bn", teacher.detach().float(), text_features.detach().float())
        ids_keep, mask, ids_restore = random_masking(b, n, self.cfg.mask_ratio, generator=mask_generator,
                                                     scores=scores, temperature=mask_temperature,
                                                     device=images.device)
        # The masked positions as a fixed-size [B, N - K] tensor: losses gather their rows without
        # a host sync (objectives/rows.py). Every sample hides exactly N - K patches.
        masked_ids = torch.sort(mask, dim=1, descending=True, stable=True).indices[:, :n - ids_keep.shape[1]]

        # Masked pass and decoder.
        visible = self.visual(images, ids_keep)
        predictions = self.decoder(visible, ids_restore, context, context_padding)
        if target == "language":
            student = F.normalize(self.image_projection(predictions), dim=-1)
        elif target == "pixel":
            student = self.pixel_head(predictions)
            teacher = normalized_pixel_targets(images, self.cfg.vision.patch_size)
        else:  # vision: the unmasked pass's own patch features, no text prototypes
            student, teacher = predictions, tokens[:, 1:].detach()
        return {
            "image_features": image_features,
            "text_features": text_features,
            "logit_scale": self.logit_scale(),
            "teacher_patches": teacher,
            "student_patches": student,
            "mask": mask.to(images.dtype),
            "masked_ids": masked_ids,
        }
