"""ViT encoder (MAE/BEiT details of the RILS release), patch masking and the RILS decoder."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..parallel.layers import ColumnParallelLinear, initialized_tensor, normal_init, xavier_uniform
from .config import VisionConfig
from .transformer import ParallelSpec, Transformer


def sincos_2d_position_embedding(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding of MAE, ``[1 + grid², dim]`` (cls row zero)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs width divisible by 4, got {dim}")
    gh, gw = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    # MAE's convention: the first half encodes the w coordinate (meshgrid(w, h) order)
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def encode(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([encode(gh), encode(gw)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return torch.from_numpy(emb).float()


class PatchEmbed(nn.Module):
    """Conv patchify; weight initialised in place (xavier on the flattened kernel, as MAE)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        w = initialized_tensor((dim, in_chans * patch_size * patch_size), xavier_uniform)
        self.weight = nn.Parameter(w.view(dim, in_chans, patch_size, patch_size))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(images, self.weight, self.bias, stride=self.patch_size)
        return x.flatten(2).transpose(1, 2)  # [B, N, D]


def random_masking(batch: int, num_patches: int, mask_ratio: float, *, generator: Optional[torch.Generator] = None,
                   scores: Optional[torch.Tensor] = None, temperature: float = 1.0,
                   device=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE per-sample shuffle. Returns ``ids_keep [B, K]``, ``mask [B, N]`` (1 = masked) and
    ``ids_restore [B, N]``.

    With ``scores`` (text-guided masking, SemMIM-style), patches are masked without replacement
    with probability proportional to ``softmax(scores / temperature)`` via Gumbel top-k:
    a patch is masked when ``scores / T + Gumbel`` is among the largest ``N - K``.
    """
    keep = int(num_patches * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(f"mask ratio {mask_ratio} keeps no patch of {num_patches}")
    # Drawn on CPU from a CPU generator: identical on every TP peer, on any device. The copy is
    # non-blocking: a blocking host-to-device copy waits for every kernel queued before it.
    noise = torch.rand(batch, num_patches, generator=generator).to(device or "cpu", non_blocking=True)
    if scores is not None:
        gumbel = -torch.log(-torch.log(noise.clamp(1e-9, 1 - 1e-9)))
        noise = scores.detach().float().to(gumbel.device) / temperature + gumbel
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: lowest are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore


class VisionEncoder(nn.Module):
    """ViT: patchify, fixed sin-cos positions, cls token, pre-norm blocks, final LayerNorm."""

    def __init__(self, cfg: VisionConfig, spec: ParallelSpec, dropout: float = 0.0, attn_backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, 3, cfg.width)
        self.cls_token = nn.Parameter(initialized_tensor((1, 1, cfg.width), normal_init(0.02)))
        self.register_buffer("pos_embed", sincos_2d_position_embedding(cfg.width, cfg.grid_size)[None],
                             persistent=False)
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads, cfg.mlp_hidden, spec,
                                       eps=cfg.layer_norm_eps, qkv_bias="qv", dropout=dropout,
                                       attn_backend=attn_backend, activation=getattr(cfg, "activation", "gelu"))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, images: torch.Tensor, ids_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encode ``[B, 3, H, W]``; with ``ids_keep`` only those patches (masked pass).
        Returns final-normed tokens ``[B, 1 + K, D]`` (cls first)."""
        pos = self.pos_embed.to(self.cls_token.dtype)  # fixed buffer: follow the weights' dtype
        x = self.patch_embed(images) + pos[:, 1:]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        return self.norm(self.transformer(x))


class RILSDecoder(nn.Module):
    """Light decoder: Linear -> mask tokens + sin-cos positions -> block(s) -> LayerNorm -> Linear.

    Predicts an encoder-width feature for every patch position (cls dropped). With
    ``context_dim`` (text conditioning) every block also cross-attends to the caption's tokens.
    """

    def __init__(self, cfg: VisionConfig, spec: ParallelSpec, dropout: float = 0.0, attn_backend: str = "auto",
                 context_dim: Optional[int] = None):
        super().__init__()
        dim = cfg.width  # "one transformer block as wide as the encoder"
        self.embed = ColumnParallelLinear(cfg.width, dim)
        self.mask_token = nn.Parameter(initialized_tensor((1, 1, dim), normal_init(0.02)))
        self.register_buffer("pos_embed", sincos_2d_position_embedding(dim, cfg.grid_size)[None],
                             persistent=False)
        self.transformer = Transformer(dim, cfg.decoder_depth, cfg.heads, cfg.mlp_hidden, spec,
                                       eps=cfg.layer_norm_eps, qkv_bias="qv", dropout=dropout,
                                       attn_backend=attn_backend, activation=getattr(cfg, "activation", "gelu"),
                                       context_dim=context_dim)
        self.norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.pred = ColumnParallelLinear(dim, cfg.width)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor, context: Optional[torch.Tensor] = None,
                context_padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``tokens [B, 1 + K, D]`` from the masked pass -> predictions ``[B, N, D]``."""
        x = self.embed(tokens)
        b, n = ids_restore.shape
        fill = self.mask_token.expand(b, n + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], fill], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed.to(x.dtype)
        x = self.norm(self.transformer(x, context, context_padding))
        return self.pred(x[:, 1:])
