"""CLIP-style causal text transformer with end-of-text pooling."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..parallel.layers import VocabParallelEmbedding, initialized_tensor, normal_init
from .config import TextConfig
from .transformer import BlockInit, ParallelSpec, Transformer


class TextEncoder(nn.Module):
    """Token + learned position embedding -> causal blocks -> LayerNorm; returns the
    final-normed token at the end-of-text position (last non-pad token), ``[B, W]``."""

    def __init__(self, cfg: TextConfig, spec: ParallelSpec, dropout: float = 0.0, attn_backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = VocabParallelEmbedding(cfg.vocab_size, cfg.width, tp_group=spec.tp_group,
                                                      init_method=normal_init(0.02))
        self.positional_embedding = nn.Parameter(initialized_tensor((cfg.context_length, cfg.width), normal_init(0.01)))
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads, cfg.mlp_hidden, spec,
                                       eps=cfg.layer_norm_eps, qkv_bias="qkv", causal=True, dropout=dropout,
                                       init=BlockInit.clip_text(cfg.width, cfg.depth), attn_backend=attn_backend,
                                       activation=getattr(cfg, "activation", "gelu"))
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, token_ids: torch.Tensor, return_tokens: bool = False):
        """``[B, W]`` sentence features; with ``return_tokens`` also the final-normed token
        features ``[B, L, W]`` and their padding mask ``[B, L]`` (True = padding)."""
        if token_ids.shape[1] > self.cfg.context_length:
            raise ValueError(f"{token_ids.shape[1]} tokens > context length {self.cfg.context_length}")
        n = token_ids.shape[1]
        x = self.token_embedding(token_ids) + self.positional_embedding[:n]
        x = self.ln_final(self.transformer(x))
        eot = (token_ids != self.cfg.pad_id).sum(dim=1).clamp(min=1) - 1
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        if return_tokens:
            return pooled, x, torch.arange(n, device=x.device)[None] > eot[:, None]
        return pooled
