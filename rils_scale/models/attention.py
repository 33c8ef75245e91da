"""One attention function for both towers, with the backend chosen per call.

Order: ``flash_attn`` (FlashAttention-2 package) when importable and the tensors are CUDA
bf16/fp16; otherwise ``torch.nn.functional.scaled_dot_product_attention`` (which itself
dispatches to FlashAttention / cuDNN / memory-efficient kernels on GPU and to math on CPU).
``math`` is the explicit softmax(QK^T)V path, kept for tests and debugging.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:  # optional accelerator: never required
    from flash_attn import flash_attn_func as _flash_attn_func
    HAS_FLASH_ATTN = True
except Exception:  # ImportError, or a broken CUDA build
    _flash_attn_func = None
    HAS_FLASH_ATTN = False

BACKENDS = ("auto", "flash_attn", "sdpa", "math")
_logged = set()


def _log_once(name: str) -> None:
    if name not in _logged:
        _logged.add(name)
        log.info("attention backend: %s", name)


def resolve_backend(q: torch.Tensor, requested: str = "auto", has_mask: bool = False) -> str:
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose from {BACKENDS}")
    flash_ok = (HAS_FLASH_ATTN and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
                and not has_mask)
    if requested == "flash_attn" and not flash_ok:
        raise RuntimeError("attention backend 'flash_attn' needs the flash-attn package "
                           "(pip install flash-attn --no-build-isolation), CUDA bf16/fp16 "
                           "tensors and no padding mask")
    if requested == "auto":
        return "flash_attn" if flash_ok else "sdpa"
    return requested


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              key_padding_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
              backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for ``[B, H, N, d]`` tensors; returns ``[B, H, N, d]``.

    ``key_padding_mask``: ``[B, N]`` bool, True where a key is padding (never attended).
    """
    name = resolve_backend(q, backend, key_padding_mask is not None)
    if not torch.compiler.is_compiling():  # logging is a side effect a compiled block cannot hold
        _log_once(name)
    if name == "flash_attn":
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                               dropout_p=dropout_p, causal=causal)
        return out.transpose(1, 2)
    mask = None
    if key_padding_mask is not None:
        mask = ~key_padding_mask[:, None, None, :]
        if causal:
            n = q.shape[-2]
            mask = mask & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            causal = False
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=causal)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[-2]
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v
