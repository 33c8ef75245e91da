"""The building blocks of the analytical FLOP and parameter counts: one transformer block, one
cross-attention, the patch embedding, token counts of the masked pass. Shared by the RILS count
(:mod:`.flops`) and the SemMIM count (:mod:`.semmim_flops`)."""
from __future__ import annotations

from typing import Dict

from ..models.config import RILSConfig, VisionConfig


def block_linear_flops(tokens: int, width: int, mlp_hidden: int) -> int:
    """Forward FLOPs of one block's linear layers (qkv, proj, fc1, fc2) for one sample."""
    return 2 * tokens * (4 * width * width + 2 * width * mlp_hidden)


def block_attention_flops(tokens: int, width: int) -> int:
    """Forward FLOPs of one block's ``QKᵀ`` and ``AV`` (all heads) for one sample."""
    return 4 * tokens * tokens * width


def block_flops(tokens: int, width: int, mlp_hidden: int) -> int:
    return block_linear_flops(tokens, width, mlp_hidden) + block_attention_flops(tokens, width)


def cross_attention_flops(tokens: int, context: int, width: int, context_width: int) -> int:
    """Forward FLOPs of one cross-attention layer (text conditioning) for one sample: q from the
    tokens, k/v from the context, ``QKᵀ`` and ``AV`` (tokens × context), output projection."""
    return 4 * tokens * width * width + context_projection_flops(context, width, context_width) \
        + 4 * tokens * context * width


def context_projection_flops(context: int, width: int, context_width: int) -> int:
    """The k/v projection of the context inside :func:`cross_attention_flops`. The context (caption
    tokens) is detached, so its backward is the weight gradient only (1x, not 2x)."""
    return 4 * context * context_width * width


def visible_tokens(cfg: RILSConfig) -> int:
    """Tokens of the masked pass: cls + kept patches (random_masking's ``int(N·(1-r))``)."""
    return 1 + int(cfg.vision.num_patches * (1 - cfg.mask_ratio))


def masked_patches(cfg: RILSConfig) -> int:
    return cfg.vision.num_patches - (visible_tokens(cfg) - 1)


def _patch_embed_flops(v: VisionConfig) -> int:
    return 2 * v.num_patches * 3 * v.patch_size ** 2 * v.width


def _block_params(width: int, mlp_hidden: int, qkv_bias: str) -> Dict[str, int]:
    """One block's parameters split into TP-sharded and replicated ones (parallel/layers.py)."""
    d, f = width, mlp_hidden
    bias = {"qkv": 3 * d, "qv": 2 * d, "none": 0}[qkv_bias]
    sharded = 3 * d * d + bias + d * d + d * f + f + f * d  # qkv(+bias), proj W, fc1 W+b, fc2 W
    replicated = 4 * d + d + d  # two LayerNorms, proj bias, fc2 bias (row-parallel biases)
    return {"sharded": sharded, "replicated": replicated}
