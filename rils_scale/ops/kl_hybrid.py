"""Hybrid backend of the patch-sentence KL: the Triton kernels for the fused parts, cuBLAS for the big products.

Forward: the Triton split-M kernel (:func:`.kl_triton.forward_stats`: logits and online statistics, the
two base-2 LSEs saved). Backward: :func:`.kl_triton.chunked_grads` -- per column chunk of the
prototypes (``[P, width]`` within a fixed byte budget: never P x M), the Triton G kernel recomputes the
logits once and writes ``G = p - q`` in the input dtype; the two gradient products of the chunk,
``dS += G T_chunk`` and ``dT_chunk = G^T S'``, run as cuBLAS tensor-core GEMMs with fp32 output
(``torch.mm(..., out_dtype=float32)`` on CUDA) instead of the Triton GEMM. Executed work: forward 2
logit products, backward 2 recomputed + 1 per gradient (2 + 2 + 2, or 2 + 2 + 1 without prototype
gradient): the minimum for a recomputing backward. On CPU (tests) the kernels run under
``TRITON_INTERPRET=1`` and the GEMMs in fp32 on the 16-bit-rounded operands.
"""
from __future__ import annotations

import torch

from . import kl_triton
from .kl_streaming import mm_f32

__all__ = ["patch_sentence_kl_hybrid"]


def _mm_cublas(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b`` (fp32 ``out``) through cuBLAS with fp32 output (:func:`.kl_streaming.mm_f32`)."""
    r = mm_f32(a, b)
    if accumulate:
        out.add_(r)
    else:
        out.copy_(r)


class _HybridKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, prototypes, student_temp, teacher_temp, block_m):
        st, te, T = kl_triton._prep(student, teacher, prototypes)
        loss, lse_a, lse_b = kl_triton.forward_stats(st, te, T, student_temp, teacher_temp)
        ctx.save_for_backward(st, te, T, lse_a, lse_b)
        ctx.cfg = (student_temp, teacher_temp, block_m, student.dtype, prototypes.dtype, student.shape[1])
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        st, te, T, lse_a, lse_b = ctx.saved_tensors
        student_temp, teacher_temp, block_m, s_dtype, t_dtype, D = ctx.cfg
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        d_s, d_t = kl_triton.chunked_grads(st, te, T, lse_a, lse_b, grad, need_s, need_t, student_temp,
                                           teacher_temp, mm=_mm_cublas, block_m=block_m)
        return (kl_triton._unpad(d_s, D, s_dtype), None, kl_triton._unpad(d_t, D, t_dtype), None, None, None)


def patch_sentence_kl_hybrid(student, teacher, prototypes, *, student_temp: float, teacher_temp: float,
                             block_m: int | None = None) -> torch.Tensor:
    """Hybrid backend (fp32 loss ``[P]``); ``block_m`` forces the backward's G chunk width (tests)."""
    ok, why = kl_triton.triton_status(student.device)
    if not ok:
        raise RuntimeError(f"backend='hybrid' unavailable: {why}")
    if student.shape[0] == 0:
        from .kl_streaming import patch_sentence_kl_streaming
        return patch_sentence_kl_streaming(student, teacher, prototypes, student_temp=student_temp,
                                           teacher_temp=teacher_temp)
    return _HybridKL.apply(student, teacher, prototypes, float(student_temp), float(teacher_temp), block_m)
