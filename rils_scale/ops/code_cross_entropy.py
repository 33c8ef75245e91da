"""K-way code cross-entropy of SemMIM's self-distillation (DINO/iBOT form), streamed over the codes.

For one row ``i`` (a global image feature or a masked patch) with L2-normalised student and teacher
features ``s_i``, ``t_i``, normalised student and teacher codes (prototypes) ``C_s``, ``C_t`` ``[K, E]``
and the teacher's centre ``c`` ``[K]``::

    a_ij = (t_i . C_t,j - c_j) / tau_t        teacher logits: centred, sharpened, stop-gradient
    b_ij =  s_i . C_s,j / tau_s               student logits
    q_i = softmax(a_i),  p_i = softmax(b_i)
    CE_i = -sum_j q_ij log p_ij = LSE(b_i) - sum_j q_ij b_ij
    dCE_i/ds_i    = (1/tau_s) sum_j (p_ij - q_ij) C_s,j
    dCE/dC_s,j    = (1/tau_s) sum_i g_i (p_ij - q_ij) s_i            (g = upstream gradient)

No gradient reaches ``teacher``, ``teacher_codes`` or ``center`` (the teacher is the momentum
encoder's EMA, the centre a running mean). Two statistics of the teacher come out of the same
pass, without gradient: ``usage_j = sum_i w_i q_ij`` (the unnormalised mean code distribution:
its perplexity is the collapse check) and the per-row teacher entropy ``H(q_i)``.

Never ``rows x K`` in memory: like the patch-sentence KL (``kl_streaming``), the forward walks
over tiles of ``block_rows x block_codes`` logits. Per row block it makes two passes over the
code tiles: the first finds the teacher's log-sum-exp (online max and sum, base 2), the second
has the exact ``q`` and accumulates ``sum q b``, the student's online log-sum-exp, the usage
column sums and the entropy. Saved for backward: the inputs and two log-sum-exps per row;
backward recomputes both logit tiles and forms ``G = (p - q) g / tau_s``, then
``dS += G C_s``, ``dC_s += G^T S``. Products: 3 forward (teacher twice, student once), 4 backward.
bf16/fp16 inputs on CUDA use the KL op's tensor-core GEMMs with fp32 outputs (``mm_f32``);
everything else runs in fp32 (fp64 for fp64 inputs).

:func:`code_cross_entropy_reference` is the naive form (materialises ``rows x K``): the test
oracle, float64-capable. docs/method.md ("SemMIM") has the derivation and where it is used.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .kl_streaming import _default_blocks, mm_f32, use_lp_gemm

__all__ = ["code_cross_entropy", "code_cross_entropy_reference", "check_code_inputs"]

_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)


def check_code_inputs(student, teacher, student_codes, teacher_codes, center) -> None:
    if student.dim() != 2 or teacher.shape != student.shape:
        raise ValueError(f"code_cross_entropy: student and teacher must be [R, E] of one shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student_codes.dim() != 2 or teacher_codes.shape != student_codes.shape \
            or student_codes.shape[1] != student.shape[1]:
        raise ValueError(f"code_cross_entropy: codes must be [K, E] matching the features, got student "
                         f"{tuple(student_codes.shape)}, teacher {tuple(teacher_codes.shape)}, E={student.shape[1]}")
    if center.shape != (student_codes.shape[0],):
        raise ValueError(f"code_cross_entropy: centre must be [K]={student_codes.shape[0]}, got {tuple(center.shape)}")
    if student_codes.shape[0] == 0:
        raise ValueError("code_cross_entropy needs at least one code (K >= 1)")
    if len({x.device for x in (student, teacher, student_codes, teacher_codes, center)}) != 1:
        raise ValueError("code_cross_entropy: every input must be on the same device")


def code_cross_entropy_reference(student, teacher, student_codes, teacher_codes, center, *, student_temp: float,
                                 teacher_temp: float, weights: Optional[torch.Tensor] = None
                                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Naive form (``rows x K`` matrices): ``(ce [R], usage [K], teacher_entropy [R])``, float64 for
    float64 inputs, else float32. Gradient reaches ``student`` and ``student_codes`` only."""
    check_code_inputs(student, teacher, student_codes, teacher_codes, center)
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    a = (teacher.detach().to(dtype) @ teacher_codes.detach().to(dtype).T - center.detach().to(dtype)) / teacher_temp
    log_q = torch.log_softmax(a, dim=-1)
    q = log_q.exp()
    log_p = torch.log_softmax(student.to(dtype) @ student_codes.to(dtype).T / student_temp, dim=-1)
    ce = -(q * log_p).sum(dim=-1)
    w = torch.ones(student.shape[0], dtype=dtype, device=student.device) if weights is None else weights.to(dtype)
    usage = (w[:, None] * q).sum(dim=0)
    entropy = -(q * log_q).sum(dim=-1)
    return ce, usage.detach(), entropy.detach()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _CodeCrossEntropy(torch.autograd.Function):
    """Streaming form (module docstring). Works in base 2: ``log2(e)`` is folded into the scales,
    so the exponentials are ``exp2``; results are converted back to nats."""

    @staticmethod
    def forward(ctx, student, teacher, student_codes, teacher_codes, center, weights, student_temp, teacher_temp,
                block_rows, block_codes):
        R, K = student.shape[0], student_codes.shape[0]
        lp = use_lp_gemm(student)
        cdt = torch.float32 if lp else _compute_dtype(student)
        gdt = student.dtype if lp else cdt                # dtype of the GEMM operands
        dev = student.device
        s = student.detach().to(gdt).contiguous()
        t = teacher.detach().to(gdt).contiguous()
        cs = student_codes.detach().to(gdt).contiguous()
        ct = teacher_codes.detach().to(gdt).contiguous()
        c2 = center.detach().to(cdt) * (_LOG2E / teacher_temp)     # centre in base-2 logit units
        w = weights.detach().to(cdt)
        alpha_s, alpha_t = _LOG2E / student_temp, _LOG2E / teacher_temp
        ce = torch.empty(R, dtype=cdt, device=dev)
        entropy = torch.empty(R, dtype=cdt, device=dev)
        lse_a = torch.empty(R, dtype=cdt, device=dev)
        lse_b = torch.empty(R, dtype=cdt, device=dev)
        usage = torch.zeros(K, dtype=cdt, device=dev)
        tiles = [(k0, min(K, k0 + block_codes)) for k0 in range(0, K, block_codes)]

        def teacher_tile(r0, r1, k0, k1):
            return mm_f32(t[r0:r1], ct[k0:k1].T).mul_(alpha_t).sub_(c2[k0:k1]) if lp else \
                torch.mm(t[r0:r1], ct[k0:k1].T).mul_(alpha_t).sub_(c2[k0:k1])

        def student_tile(r0, r1, k0, k1):
            return mm_f32(s[r0:r1], cs[k0:k1].T).mul_(alpha_s) if lp else torch.mm(s[r0:r1], cs[k0:k1].T).mul_(alpha_s)

        for r0 in range(0, R, block_rows):
            r1 = min(R, r0 + block_rows)
            n = r1 - r0
            # pass 1: the teacher's log-sum-exp (online max / sum of exp2)
            m = torch.full((n,), -math.inf, dtype=cdt, device=dev)
            acc = torch.zeros(n, dtype=cdt, device=dev)
            for k0, k1 in tiles:
                a = teacher_tile(r0, r1, k0, k1)
                new_m = torch.maximum(m, a.amax(dim=1))
                acc.mul_(torch.exp2(m - new_m)).add_(torch.exp2(a - new_m[:, None]).sum(dim=1))
                m = new_m
            la = m + torch.log2(acc)
            # pass 2: exact q; sum q b, sum q a, usage, and the student's online log-sum-exp
            m_b = torch.full((n,), -math.inf, dtype=cdt, device=dev)
            s_b = torch.zeros(n, dtype=cdt, device=dev)
            qb = torch.zeros(n, dtype=cdt, device=dev)
            qa = torch.zeros(n, dtype=cdt, device=dev)
            for k0, k1 in tiles:
                a = teacher_tile(r0, r1, k0, k1)
                b = student_tile(r0, r1, k0, k1)
                q = torch.exp2(a - la[:, None])
                qa.add_((q * a).sum(dim=1))
                qb.add_((q * b).sum(dim=1))
                usage[k0:k1] += w[r0:r1] @ q
                new_m = torch.maximum(m_b, b.amax(dim=1))
                s_b.mul_(torch.exp2(m_b - new_m)).add_(b.sub_(new_m[:, None]).exp2_().sum(dim=1))
                m_b = new_m
            lb = m_b + torch.log2(s_b)
            lse_a[r0:r1], lse_b[r0:r1] = la, lb
            ce[r0:r1] = (lb - qb) * _LN2
            entropy[r0:r1] = (la - qa) * _LN2
        ctx.save_for_backward(s, t, cs, ct, c2, lse_a, lse_b)
        ctx.cfg = (student_temp, teacher_temp, block_rows, block_codes, lp, cdt, student.dtype, student_codes.dtype)
        ctx.mark_non_differentiable(usage, entropy)
        out_dtype = torch.float64 if cdt == torch.float64 else torch.float32
        return ce.to(out_dtype), usage.to(out_dtype), entropy.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ce, _grad_usage, _grad_entropy):
        need_s, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        nones = (None,) * 8
        if not (need_s or need_c) or grad_ce is None:
            return (None, None) + nones
        s, t, cs, ct, c2, lse_a, lse_b = ctx.saved_tensors
        student_temp, teacher_temp, block_rows, block_codes, lp, cdt, s_dtype, c_dtype = ctx.cfg
        R, K = s.shape[0], cs.shape[0]
        dev = s.device
        alpha_s, alpha_t = _LOG2E / student_temp, _LOG2E / teacher_temp
        g = grad_ce.to(cdt).reshape(R) / student_temp
        mm = mm_f32 if lp else torch.mm
        d_s = torch.zeros(R, s.shape[1], dtype=cdt, device=dev) if need_s else None
        d_c = torch.zeros(K, s.shape[1], dtype=cdt, device=dev) if need_c else None
        for r0 in range(0, R, block_rows):
            r1 = min(R, r0 + block_rows)
            for k0 in range(0, K, block_codes):
                k1 = min(K, k0 + block_codes)
                q = mm(t[r0:r1], ct[k0:k1].T).mul_(alpha_t).sub_(c2[k0:k1]).sub_(lse_a[r0:r1, None]).exp2_()
                p = mm(s[r0:r1], cs[k0:k1].T).mul_(alpha_s).sub_(lse_b[r0:r1, None]).exp2_()
                G = p.sub_(q).mul_(g[r0:r1, None])
                if lp:
                    G = G.to(s.dtype)
                if need_s:
                    d_s[r0:r1] += mm(G, cs[k0:k1])
                if need_c:
                    d_c[k0:k1] += mm(G.T, s[r0:r1])
        return (d_s.to(s_dtype) if need_s else None, None, d_c.to(c_dtype) if need_c else None, None, None,
                None) + (None,) * 4


def code_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, student_codes: torch.Tensor,
                       teacher_codes: torch.Tensor, center: torch.Tensor, *, student_temp: float, teacher_temp: float,
                       weights: Optional[torch.Tensor] = None, block_rows: Optional[int] = None,
                       block_codes: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``CE(softmax((t C_t^T - c)/tau_t), softmax(s C_s^T/tau_s))``, streamed over the codes.

    Args:
        student, teacher: ``[R, E]`` normalised features; ``teacher`` gets no gradient.
        student_codes, teacher_codes: ``[K, E]`` normalised codes; gradient only to ``student_codes``.
        center: ``[K]`` teacher centre (subtracted from the teacher's cosine logits before ``/tau_t``).
        weights: ``[R]`` row weights of the ``usage`` statistic (e.g. 0 for padding rows); default 1.
        block_rows, block_codes: tile shape (default: the KL op's per-device tiles).
    Returns:
        ``(ce [R], usage [K], teacher_entropy [R])``: float32 (float64 for float64 inputs); only
        ``ce`` is differentiable.
    """
    check_code_inputs(student, teacher, student_codes, teacher_codes, center)
    R, K = student.shape[0], student_codes.shape[0]
    bp, bk = _default_blocks(student.device, R, K)
    w = torch.ones(R, device=student.device) if weights is None else weights
    return _CodeCrossEntropy.apply(student, teacher, student_codes, teacher_codes, center, w, float(student_temp),
                                   float(teacher_temp), max(1, block_rows or bp), max(1, block_codes or bk))
