"""CUDA backend: the autograd Function around the fused extension in ``kernels/`` (built by
:mod:`rils_scale.ops._extension`)."""
from __future__ import annotations

import torch

__all__ = ["patch_sentence_kl_cuda"]


class _CudaKL(torch.autograd.Function):
    """Launcher for ``kernels/patch_sentence_kl_kernel.cu``: forward returns the per-row loss and
    the two base-2 LSEs (saved for backward only); backward recomputes the logit tiles and returns
    dStudent and (optionally) dPrototypes. Both backward kernels are atomic-free and fixed-order, so
    ``deterministic`` is accepted but changes nothing."""

    @staticmethod
    def forward(ctx, student, teacher, prototypes, student_temp, teacher_temp, deterministic):
        from ._extension import load_extension
        ext = load_extension()
        s, t, T = student.detach().contiguous(), teacher.detach().contiguous(), prototypes.detach().contiguous()
        if t.dtype != s.dtype:
            t = t.to(s.dtype)
        if T.dtype != s.dtype:
            T = T.to(s.dtype)
        loss, lse_a, lse_b = ext.forward(s, t, T, 1.0 / student_temp, 1.0 / teacher_temp)
        ctx.save_for_backward(s, t, T, lse_a, lse_b)
        ctx.cfg = (student_temp, teacher_temp, deterministic, student.dtype, prototypes.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        from ._extension import load_extension
        s, t, T, lse_a, lse_b = ctx.saved_tensors
        student_temp, teacher_temp, deterministic, s_dtype, t_dtype = ctx.cfg
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if not (need_s or need_t):
            return None, None, None, None, None, None
        g = grad.to(lse_a.dtype).contiguous()
        d_s, d_t = load_extension().backward(g, s, t, T, lse_a, lse_b, 1.0 / student_temp, 1.0 / teacher_temp,
                                             bool(need_t), bool(deterministic))
        return (d_s.to(s_dtype) if need_s else None, None,
                d_t.to(t_dtype) if need_t else None, None, None, None)


def patch_sentence_kl_cuda(student, teacher, prototypes, *, student_temp: float, teacher_temp: float,
                           deterministic: bool = False) -> torch.Tensor:
    """Fused CUDA backend; raises with build instructions when the extension is unavailable."""
    from ._extension import load_extension
    if student.device.type != "cuda":
        raise ValueError("backend='cuda' needs CUDA tensors")
    load_extension(raise_on_error=True)
    return _CudaKL.apply(student, teacher, prototypes, float(student_temp), float(teacher_temp), bool(deterministic))
