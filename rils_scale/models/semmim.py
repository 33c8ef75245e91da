"""The SemMIM recipe's model: RILS's towers plus a momentum encoder, a text-fusion block and a
shared K-code head (Liu et al., LREC-COLING 2024, arXiv 2403.00249, as docs/method.md reads it).

Online branch (with gradient), on top of everything RILS computes:

- global feature of the masked view: mean of the masked pass's visible patch tokens;
- masked-patch predictions: the (text-conditioned) decoder's outputs, then the text-fusion block
  (a transformer block that cross-attends to the caption's tokens), at the masked positions;
- both through the code head: a projection to the code width, L2-normalised, against the K
  normalised codes (the shared encoding space).

Momentum branch (no gradient; its weights are an EMA of the online ones, set by
``rils_scale.train.ema``): the vision encoder on the **unmasked** image, its mean patch token as
the global feature, its patch tokens fused with the caption by the momentum copy of the fusion
block (text injection into the targets), and the momentum copy of the code head.

Model math only: the losses (centred and sharpened teacher, cross-entropies over the codes) live
in ``rils_scale.objectives.semmim_loss``; the EMA and its fp32 state in ``rils_scale.train.ema``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..parallel.layers import initialized_tensor, normal_init
from .config import RILSConfig
from .rils import MASK_STRATEGIES, RILS, Projection
from .transformer import ParallelSpec, Transformer
from .vision import VisionEncoder, random_masking

MOMENTUM_PREFIX = "momentum."
"""Parameter names of the momentum branch: ``momentum.<name of the online parameter it follows>``."""


def code_width(cfg: RILSConfig) -> int:
    return cfg.semmim.code_dim or cfg.embed_dim


class CodeHead(nn.Module):
    """Projection (no bias, replicated over TP) to the code width and the K codes.

    ``forward(*features)`` returns each input projected and L2-normalised, then the codes
    L2-normalised ``[K, E]`` (computed inside forward, so ZeRO-3 has the parameters gathered).
    Cosine logits against normalised codes are DINO's head with a weight-normalised last layer
    of fixed norm (``norm_last_layer``).
    """

    def __init__(self, in_features: int, code_dim: int, num_codes: int):
        super().__init__()
        if num_codes < 2:
            raise ValueError(f"SemMIM needs at least 2 codes, got {num_codes}")
        self.projection = Projection(in_features, code_dim)
        self.codes = nn.Parameter(initialized_tensor((num_codes, code_dim), normal_init(1.0)))

    def forward(self, *features: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        out = [F.normalize(self.projection(x), dim=-1) for x in features]
        return (*out, F.normalize(self.codes, dim=-1))


def text_fusion_block(cfg: RILSConfig, spec: ParallelSpec, attn_backend: str) -> Transformer:
    """One pre-norm block at encoder width: self-attention, cross-attention to the caption's
    final-normed tokens, MLP (an ALBEF-style fusion layer); TP like the decoder's blocks."""
    v = cfg.vision
    return Transformer(v.width, 1, v.heads, v.mlp_hidden, spec, eps=v.layer_norm_eps, qkv_bias="qv",
                       dropout=cfg.dropout, attn_backend=attn_backend, activation=getattr(v, "activation", "gelu"),
                       context_dim=cfg.text.width)


class MomentumBranch(nn.Module):
    """EMA copies of the vision encoder, the fusion block and the code head. Never trained by
    autograd (``requires_grad=False``) and always in eval mode (no dropout in the teacher)."""

    def __init__(self, cfg: RILSConfig, spec: ParallelSpec, attn_backend: str):
        super().__init__()
        self.visual = VisionEncoder(cfg.vision, spec, cfg.dropout, attn_backend)
        self.fusion = text_fusion_block(cfg, spec, attn_backend) if cfg.semmim.target_text_injection else None
        self.code_head = CodeHead(cfg.vision.width, code_width(cfg), cfg.semmim.num_codes)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):  # the teacher never drops out
        return super().train(False)

    def forward(self, images: torch.Tensor, context: torch.Tensor, context_padding: torch.Tensor):
        """Returns ``(global [B, E], patches [B, N, E], codes [K, E])``, normalised."""
        tokens = self.visual(images)[:, 1:]
        pooled = tokens.mean(dim=1)
        if self.fusion is not None:
            tokens = self.fusion(tokens, context, context_padding)
        return self.code_head(pooled, tokens)


def masked_positions(ids_restore: torch.Tensor, keep: int) -> torch.Tensor:
    """``[B, N - keep]`` indices of the masked patches (``random_masking`` masks exactly ``N - keep``
    per sample): the tail of the shuffle, ``argsort(ids_restore)`` being the shuffle itself."""
    return torch.argsort(ids_restore, dim=1)[:, keep:]


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class SemMIM(RILS):
    """RILS towers + text fusion + code head + momentum branch (module docstring)."""

    def __init__(self, cfg: RILSConfig, spec: Optional[ParallelSpec] = None, attn_backend: str = "auto"):
        if cfg.recon_target != "language":
            raise ValueError(f"--recon-target {cfg.recon_target} applies to the rils recipe; SemMIM's target is "
                             "the momentum encoder's codes")
        super().__init__(cfg, spec, attn_backend)
        spec = self.spec
        self.fusion = text_fusion_block(cfg, spec, attn_backend) if cfg.semmim.target_text_injection else None
        self.code_head = CodeHead(cfg.vision.width, code_width(cfg), cfg.semmim.num_codes)
        # Built without consuming the default generator (the momentum weights are copied below),
        # so every online weight is drawn as in a model without the momentum branch.
        with torch.random.fork_rng(devices=[]):
            self.momentum = MomentumBranch(cfg, spec, attn_backend)
        self.copy_online_to_momentum_()

    # ------------------------------------------------------------------ momentum bookkeeping
    def momentum_pairs(self) -> List[Tuple[str, str]]:
        """``(online name, momentum name)`` of every momentum parameter."""
        return [(name, MOMENTUM_PREFIX + name) for name, _ in self.momentum.named_parameters()]

    @torch.no_grad()
    def copy_online_to_momentum_(self) -> None:
        """Momentum weights := online weights, on what this process holds (under ZeRO-3 the local
        partitions, which line up element for element: same shape, same DP group)."""
        params = dict(self.named_parameters())
        for online, momentum in self.momentum_pairs():
            src, dst = params[online], params[momentum]
            if hasattr(src, "ds_tensor"):
                dst.ds_tensor.data.copy_(src.ds_tensor.data)
            else:
                dst.data.copy_(src.data)

    # ------------------------------------------------------------------ training step
    def forward(self, images: torch.Tensor, token_ids: torch.Tensor, *,
                mask_generator: Optional[torch.Generator] = None, mask_strategy: str = "random",
                mask_temperature: float = 0.1) -> Dict[str, torch.Tensor]:
        """One SemMIM step's features, all L2-normalised.

        Returns, besides RILS's ``image_features``, ``text_features``, ``logit_scale`` and ``mask``:
        ``student_global [B, E]`` / ``teacher_global [B, E]`` (masked-view and momentum global
        features in the code space), ``student_patches`` / ``teacher_patches`` ``[B, M, E]`` at the
        ``M = N - keep`` masked positions, ``teacher_patches_all [B, N, E]`` (the patch centre's
        rows) and the normalised codes ``student_codes`` / ``teacher_codes`` ``[K, E]``.
        """
        if mask_strategy not in MASK_STRATEGIES:
            raise ValueError(f"unknown mask strategy {mask_strategy!r}; choose from {MASK_STRATEGIES}")
        pooled, text_tokens, padding = self.text(token_ids, return_tokens=True)
        context = text_tokens.detach()  # stop-gradient: the text tower learns from the contrastive loss
        text_features = F.normalize(self.text_projection(pooled), dim=-1)

        tokens = self.visual(images)  # unmasked online pass: the contrastive loss
        image_features = F.normalize(self.image_projection(tokens[:, 1:].mean(dim=1)), dim=-1)
        b, n = images.shape[0], self.cfg.vision.num_patches
        scores = None
        if mask_strategy == "text-guided":
            with torch.no_grad():
                patches = F.normalize(self.image_projection(tokens[:, 1:].detach()), dim=-1)
                scores = torch.einsum("bnd,bd->bn", patches.float(), text_features.detach().float())
        ids_keep, mask, ids_restore = random_masking(b, n, self.cfg.mask_ratio, generator=mask_generator,
                                                     scores=scores, temperature=mask_temperature,
                                                     device=images.device)
        idx = masked_positions(ids_restore, ids_keep.shape[1])

        visible = self.visual(images, ids_keep)
        predictions = self.decoder(visible, ids_restore, context if self.cfg.decoder_text_conditioning else None,
                                   padding)
        if self.fusion is not None:
            predictions = self.fusion(predictions, context, padding)
        student_global, student_patches, student_codes = self.code_head(
            visible[:, 1:].mean(dim=1), _gather_rows(predictions, idx))

        with torch.no_grad():
            teacher_global, teacher_all, teacher_codes = self.momentum(images, context, padding)
        return {
            "image_features": image_features,
            "text_features": text_features,
            "logit_scale": self.logit_scale(),
            "mask": mask.to(images.dtype),
            "student_global": student_global,
            "student_patches": student_patches,
            "student_codes": student_codes,
            "teacher_global": teacher_global,
            "teacher_patches": _gather_rows(teacher_all, idx),
            "teacher_patches_all": teacher_all,
            "teacher_codes": teacher_codes,
        }
