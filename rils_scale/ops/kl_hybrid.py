"""Hybrid backend of the patch-sentence KL: Triton for the fused parts, cuBLAS for the big products.

Forward: the Triton split-M kernel (:func:`.kl_triton.forward_stats`: logits and online statistics,
3 floats per row saved). Backward, per block of ``width`` prototype columns: a Triton kernel
recomputes the logits and writes ``G = (p - q) * g / tau_s`` for the block, rounded to the input
dtype (``[P, width]``, within a fixed byte budget: never P x M); then two tensor-core GEMMs with
fp32 output (``torch.mm(..., out_dtype=float32)`` on CUDA) give ``dS += G T_blk`` and
``dT_blk = G^T S``. Executed work: forward 2 logit products, backward 2 recomputed + 2 gradient
products (1 when prototypes need no gradient): the minimum for a recomputing backward.
On CPU (tests) the kernels run under ``TRITON_INTERPRET=1`` and the GEMMs in fp32 on the rounded G.
"""
from __future__ import annotations

import torch

from . import kl_triton
from .kl_streaming import mm_f32

__all__ = ["patch_sentence_kl_hybrid"]

# Bytes of the G block: 256 MiB on CUDA (P = 37,632 bf16 -> ~3,500 columns per block). On CPU (the
# Triton interpreter, tests only) 4 KiB, so the self-check's tiny cases run several column blocks.
_G_BUDGET = {"cuda": 256 * 2**20, "cpu": 4096}


def _width(device: torch.device, P: int, M: int, elt: int, block_m: int | None) -> int:
    if block_m:
        return max(1, min(M, block_m))
    w = _G_BUDGET.get(device.type, _G_BUDGET["cpu"]) // max(1, P * elt)
    q = 128 if device.type == "cuda" else 16
    return max(1, min(M, max(q, w // q * q)))


class _HybridKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, prototypes, student_temp, teacher_temp, block_m):
        st, te, T = kl_triton._prep(student, teacher, prototypes)
        loss, lse_a, lse_b = kl_triton.forward_stats(st, te, T, student_temp, teacher_temp)
        ctx.save_for_backward(st, te, T, lse_a, lse_b)
        ctx.cfg = (student_temp, teacher_temp, block_m, student.dtype, prototypes.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        st, te, T, lse_a, lse_b = ctx.saved_tensors
        student_temp, teacher_temp, block_m, s_dtype, t_dtype = ctx.cfg
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        P, D = st.shape
        M = T.shape[0]
        gs = (grad.float() / student_temp).contiguous()
        g_dtype = st.dtype                                     # bf16/fp16 G for the tensor cores
        width = _width(st.device, P, M, st.element_size(), block_m)
        d_s = torch.zeros(P, D, dtype=torch.float32, device=st.device) if need_s else None
        d_t = torch.empty(M, D, dtype=torch.float32, device=st.device) if need_t else None
        for m0 in range(0, M, width):
            m1 = min(M, m0 + width)
            G = kl_triton.g_tiles(st, te, T, lse_a, lse_b, gs, m0, m1, student_temp, teacher_temp, g_dtype)
            if need_s:
                d_s += mm_f32(G, T[m0:m1])
            if need_t:
                d_t[m0:m1] = mm_f32(G.T, st)
        return (d_s.to(s_dtype) if need_s else None, None, d_t.to(t_dtype) if need_t else None, None, None, None)


def patch_sentence_kl_hybrid(student, teacher, prototypes, *, student_temp: float, teacher_temp: float,
                             block_m: int | None = None) -> torch.Tensor:
    """Hybrid backend (fp32 loss ``[P]``); ``block_m`` forces the backward's column block (tests)."""
    ok, why = kl_triton.triton_status(student.device)
    if not ok:
        raise RuntimeError(f"backend='hybrid' unavailable: {why}")
    if student.shape[0] == 0:
        from .kl_streaming import patch_sentence_kl_streaming
        return patch_sentence_kl_streaming(student, teacher, prototypes, student_temp=student_temp,
                                           teacher_temp=teacher_temp)
    return _HybridKL.apply(student, teacher, prototypes, float(student_temp), float(teacher_temp), block_m)
