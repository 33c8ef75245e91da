"""Pre-norm transformer block and stack shared by the vision encoder, decoder and text tower.

Reads as single-device math. Sharding comes from the layers it is built from: q/k/v and the
MLP's first layer are column-parallel (heads and hidden units split over TP), the output
projections row-parallel; with TP = 1 they are plain linear layers.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..parallel.layers import (ColumnParallelLinear, RowParallelLinear, SequenceParallelLayerNorm,
                               normal_init, sharded_parameter, xavier_uniform)
from ..parallel.mappings import (_size, gather_from_tensor_parallel_region,
                                 scatter_to_sequence_parallel_region)
from ..parallel.random import checkpoint, get_rng_tracker
from .attention import attention


@dataclass
class ParallelSpec:
    """How the layers of a tower are split: the one place that decides plain vs parallel."""

    tp_group: Optional[object] = None
    """Tensor-parallel process group (None: single process)."""
    sequence_parallel: bool = False
    """Split norm/residual regions along the sequence inside the TP group."""
    activation_checkpointing: float = 0.0
    """Fraction of each stack's blocks recomputed in backward instead of storing their
    activations: 0 / False none, 1 / True every block, in between the first
    ``ceil(fraction x depth)`` blocks of every stack (selective; :func:`checkpointed_blocks`)."""

    @property
    def tp_size(self) -> int:
        return _size(self.tp_group)


def checkpointed_blocks(depth: int, fraction: float) -> int:
    """Blocks of a ``depth``-block stack that activation checkpointing recomputes.

    Selective checkpointing recomputes whole blocks, the first ``ceil(fraction x depth)`` of each
    stack: per recomputed FLOP a whole block frees more memory than its MLP or attention alone
    (docs/performance.md, "Activation checkpointing"), and which blocks does not matter for the
    peak, which is reached when backward starts with every stack's saved tensors alive.
    """
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"activation checkpointing fraction must be in [0, 1], got {fraction}")
    return min(depth, math.ceil(fraction * depth - 1e-9))


@dataclass
class BlockInit:
    """Initialisers of one block's weights (MAE: xavier everywhere; CLIP text: scaled normals)."""

    qkv: Callable = xavier_uniform
    proj: Callable = xavier_uniform
    fc1: Callable = xavier_uniform
    fc2: Callable = xavier_uniform

    @classmethod
    def clip_text(cls, width: int, depth: int) -> "BlockInit":
        attn_std, proj_std, fc_std = width ** -0.5, width ** -0.5 * (2 * depth) ** -0.5, (2 * width) ** -0.5
        return cls(normal_init(attn_std), normal_init(proj_std), normal_init(fc_std), normal_init(proj_std))


class Attention(nn.Module):
    """Multi-head self-attention; this rank holds ``heads / TP`` heads.

    ``qkv_bias``: "qv" (BEiT style: learned q and v bias, k bias fixed at zero), "qkv" or "none".
    """

    def __init__(self, dim: int, heads: int, spec: ParallelSpec, *, qkv_bias: str = "qv",
                 causal: bool = False, dropout: float = 0.0, init: BlockInit = BlockInit(),
                 attn_backend: str = "auto"):
        super().__init__()
        tp = spec.tp_size
        if dim % heads:
            raise ValueError(f"width {dim} not divisible by heads {heads}")
        if heads % tp:
            raise ValueError(f"{heads} attention heads are not divisible by --tensor-parallel {tp}")
        self.heads_local, self.head_dim = heads // tp, dim // heads
        self.causal, self.dropout, self.attn_backend = causal, dropout, attn_backend
        sp = dict(sequence_parallel=spec.sequence_parallel)
        self.qkv = ColumnParallelLinear(dim, 3 * dim, tp_group=spec.tp_group, bias=(qkv_bias == "qkv"),
                                        stride=3, init_method=init.qkv, **sp)
        self.q_bias = self.v_bias = None
        if qkv_bias == "qv":
            self.q_bias = sharded_parameter((dim,), 0, spec.tp_group)
            self.v_bias = sharded_parameter((dim,), 0, spec.tp_group)
        self.proj = RowParallelLinear(dim, dim, tp_group=spec.tp_group, init_method=init.proj, **sp)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        qkv = self.qkv(x)
        if self.q_bias is not None:
            # Add the bias in the GEMM's output dtype: under autocast the bias is an fp32
            # parameter, and bf16 + fp32 would promote q, k, v to fp32 (flash-attn refuses
            # them; SDPA then runs on an fp32 copy). Its gradient still arrives in fp32.
            bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
            qkv = qkv + bias.to(qkv.dtype)
        b, n, _ = qkv.shape
        q, k, v = qkv.view(b, n, 3, self.heads_local, self.head_dim).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        # dropout on this rank's heads draws from the TP state; without dropout nothing is drawn
        # (and a compiled block cannot trace the state swap)
        with get_rng_tracker().fork() if p > 0 else contextlib.nullcontext():
            out = attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask,
                            dropout_p=p, backend=self.attn_backend)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class CrossAttention(nn.Module):
    """Multi-head attention from ``x`` to a context sequence (the caption's tokens).

    Tensor-parallel like :class:`Attention`: q (from ``x``) and k/v (from the context) are
    column-parallel (this rank's heads), the output projection row-parallel. The context is
    replicated on every TP rank, so its k/v projection never takes the sequence-parallel path.
    """

    def __init__(self, dim: int, context_dim: int, heads: int, spec: ParallelSpec, *,
                 init: BlockInit = BlockInit(), attn_backend: str = "auto"):
        super().__init__()
        tp = spec.tp_size
        if dim % heads or heads % tp:
            raise ValueError(f"cross-attention: width {dim} / heads {heads} / TP {tp} do not divide")
        self.heads_local, self.head_dim, self.attn_backend = heads // tp, dim // heads, attn_backend
        self.q = ColumnParallelLinear(dim, dim, tp_group=spec.tp_group, init_method=init.qkv,
                                      sequence_parallel=spec.sequence_parallel)
        self.kv = ColumnParallelLinear(context_dim, 2 * dim, tp_group=spec.tp_group, stride=2, init_method=init.qkv)
        self.proj = RowParallelLinear(dim, dim, tp_group=spec.tp_group, init_method=init.proj,
                                      sequence_parallel=spec.sequence_parallel)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_padding: Optional[torch.Tensor]) -> torch.Tensor:
        q = self.q(x)
        b, n, _ = q.shape
        q = q.view(b, n, self.heads_local, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads_local, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, key_padding_mask=context_padding, backend=self.attn_backend)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


ACTIVATIONS = ("gelu", "quick_gelu")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's (and the RILS release's text tower's) approximation: ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


def activation_fn(name: str) -> Callable:
    if name == "gelu":
        return F.gelu
    if name == "quick_gelu":
        return quick_gelu
    raise ValueError(f"unknown activation {name!r}; choose from {ACTIVATIONS}")


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, spec: ParallelSpec, init: BlockInit = BlockInit(),
                 activation: str = "gelu"):
        super().__init__()
        sp = dict(sequence_parallel=spec.sequence_parallel)
        self.fc1 = ColumnParallelLinear(dim, hidden, tp_group=spec.tp_group, init_method=init.fc1, **sp)
        self.fc2 = RowParallelLinear(hidden, dim, tp_group=spec.tp_group, init_method=init.fc2, **sp)
        self.act = activation_fn(activation)  # elementwise: acts on this rank's hidden units alone

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_hidden: int, spec: ParallelSpec, *, eps: float = 1e-6,
                 qkv_bias: str = "qv", causal: bool = False, dropout: float = 0.0,
                 init: BlockInit = BlockInit(), attn_backend: str = "auto", activation: str = "gelu",
                 context_dim: Optional[int] = None):
        super().__init__()
        norm = dict(eps=eps, tp_group=spec.tp_group, sequence_parallel=spec.sequence_parallel)
        self.norm1 = SequenceParallelLayerNorm(dim, **norm)
        self.attn = Attention(dim, heads, spec, qkv_bias=qkv_bias, causal=causal, dropout=dropout,
                              init=init, attn_backend=attn_backend)
        self.cross_norm = self.cross_attn = None
        if context_dim is not None:  # pre-norm cross-attention between self-attention and MLP
            self.cross_norm = SequenceParallelLayerNorm(dim, **norm)
            self.cross_attn = CrossAttention(dim, context_dim, heads, spec, init=init, attn_backend=attn_backend)
        self.norm2 = SequenceParallelLayerNorm(dim, **norm)
        self.mlp = MLP(dim, mlp_hidden, spec, init, activation)
        self.dropout = dropout
        self.sequence_parallel = spec.sequence_parallel and spec.tp_size > 1

    def _drop(self, x):
        if not self.training or self.dropout == 0:
            return x
        if self.sequence_parallel:  # different tokens on each rank: draw from the TP state
            with get_rng_tracker().fork():
                return F.dropout(x, self.dropout)
        return F.dropout(x, self.dropout)

    def forward(self, x, key_padding_mask: Optional[torch.Tensor] = None, context: Optional[torch.Tensor] = None,
                context_padding: Optional[torch.Tensor] = None):
        x = x + self._drop(self.attn(self.norm1(x), key_padding_mask))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this block cross-attends: pass the context (caption token features)")
            x = x + self._drop(self.cross_attn(self.cross_norm(x), context, context_padding))
        return x + self._drop(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """A stack of blocks, with the sequence-parallel region and activation checkpointing (of
    the first :func:`checkpointed_blocks` blocks).

    Under sequence parallelism the token dimension (dim 1) is padded to a multiple of TP
    (ViT sequences such as 197 or 50 rarely divide), the padding is masked out as keys, the
    stack runs on this rank's tokens, and the full sequence is gathered at the end.
    """

    def __init__(self, dim: int, depth: int, heads: int, mlp_hidden: int, spec: ParallelSpec, **block_kw):
        super().__init__()
        self.spec = spec
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_hidden, spec, **block_kw) for _ in range(depth)])
        self.causal = block_kw.get("causal", False)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                context_padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``context [B, L, C]`` / ``context_padding [B, L]`` (True = pad): for cross-attending blocks."""
        tp, group = self.spec.tp_size, self.spec.tp_group
        sequence_parallel = self.spec.sequence_parallel and tp > 1
        n = x.shape[1]
        pad_mask = None
        if sequence_parallel:
            pad = (-n) % tp
            if pad:
                x = F.pad(x, (0, 0, 0, pad))
                if not self.causal:  # causal attention never looks at the trailing padding
                    pad_mask = torch.zeros(x.shape[0], n + pad, dtype=torch.bool, device=x.device)
                    pad_mask[:, n:] = True
            x = scatter_to_sequence_parallel_region(x, group, dim=1)
        recompute = checkpointed_blocks(len(self.blocks), self.spec.activation_checkpointing) \
            if self.training and torch.is_grad_enabled() else 0
        for i, block in enumerate(self.blocks):
            if i < recompute:
                x = checkpoint(block, x, pad_mask, context, context_padding)
            else:
                x = block(x, pad_mask, context, context_padding)
        if sequence_parallel:
            x = gather_from_tensor_parallel_region(x, group, dim=1)[:, :n]
        return x
