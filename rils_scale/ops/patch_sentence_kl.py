"""Patch-sentence KL: ``KL(softmax(teacher T^T / tau_t) || softmax(student T^T / tau_s))`` per row.

For one patch row ``i`` with teacher logits ``a_j = teacher_i . T_j / tau_t`` and student logits
``b_j = student_i . T_j / tau_s`` over the ``M`` sentence prototypes ``T``::

    KL_i = sum_j q_j (a_j - b_j) - LSE(a) + LSE(b),      q = softmax(a), p = softmax(b)
    dKL_i/dstudent_i = (1/tau_s) sum_j (p_j - q_j) T_j
    dKL/dT_j         = (1/tau_s) sum_i g_i (p_ij - q_ij) student_i     (g = upstream grad)

The teacher logits are a stop-gradient target: no gradient reaches ``teacher`` (even when it
requires grad) nor reaches ``prototypes`` through the teacher logits (DESIGN.md section 2).

Backends (``backend=``):

* ``"reference"`` -- :func:`patch_sentence_kl_reference`, the naive form that materialises the
  ``P x M`` matrices. Test oracle and benchmark baseline only.
* ``"streaming"`` -- :class:`_StreamingKL`, plain PyTorch on any device. With gradients: full-row
  blocks (the exponentials of ``rows x M`` logits within a fixed budget), exact per-row softmax and
  the gradient products in forward; backward only rescales (recomputing dPrototypes only when the
  upstream gradient is not uniform). Otherwise online softmax over tiles of ``block_p x block_m``
  logits; forward keeps five scalars per row (two running maxima, two running sums of exponentials
  and ``sum exp(a) (a - b)``), backward recomputes the tiles from the two saved log-sum-exps.
* ``"cuda"`` -- :class:`_CudaKL`, the fused extension in ``kernels/`` (see ``_extension.py``).
* ``"auto"`` -- ``cuda`` for CUDA tensors when the extension loads and passed its first-use
  self-check on that device, else ``streaming`` (one warning says why when CUDA tensors could not
  use the extension).

See docs/kernels.md for the derivation, build instructions and measured numbers.
"""
from __future__ import annotations

import math
import threading
import warnings

import torch

__all__ = ["patch_sentence_kl", "patch_sentence_kl_reference", "patch_sentence_kl_streaming", "cuda_backend_status"]

_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)
_BACKENDS = ("auto", "reference", "streaming", "cuda")


# --------------------------------------------------------------------------------------------
# reference (test oracle)
# --------------------------------------------------------------------------------------------
def patch_sentence_kl_reference(student: torch.Tensor, teacher: torch.Tensor, prototypes: torch.Tensor, *,
                                student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Naive form (materialises the P x M matrices): the test oracle. Returns float32 ``[P]``
    (float64 for float64 inputs). The teacher logits are a stop-gradient target: neither ``teacher``
    nor ``prototypes`` receive gradient through them."""
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    t = prototypes.to(dtype)
    log_q = torch.log_softmax(teacher.detach().to(dtype) @ t.detach().T / teacher_temp, dim=-1)
    log_p = torch.log_softmax(student.to(dtype) @ t.T / student_temp, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=-1).to(torch.float32 if dtype != torch.float64 else dtype)


# --------------------------------------------------------------------------------------------
# streaming (PyTorch, any device)
# --------------------------------------------------------------------------------------------
def _default_blocks(device: torch.device, P: int, M: int) -> tuple[int, int]:
    """Tile shape ``(block_p, block_m)``.

    CPU: a 256 x 1024 fp32 tile is 1 MiB, so the ~6 elementwise passes over it run from L2 while
    the two GEMMs per tile stay at full MKL/oneDNN speed (measured: 150-190 GFLOP/s on 2 threads
    for 256..512-row tiles, see docs/kernels.md). CUDA: large tiles keep the GEMMs efficient; the
    workspace is ~4 tiles of fp32 (4 x 64 MiB at 4096 x 4096).
    """
    if device.type == "cuda":
        return min(P, 4096) or 1, min(M, 4096)
    return min(P, 256) or 1, min(M, 1024)


def _stage_rows(X, te, st, p0, p1, alpha_t, alpha_s):
    """Rows p0:p1 of teacher and student stacked in ``X`` (teacher first), upcast to the compute
    dtype, then scaled by their log2-prescaled inverse temperatures: one GEMM gives both logits."""
    n = p1 - p0
    x = X[: 2 * n]
    x[:n].copy_(te[p0:p1]).mul_(alpha_t)
    x[n:].copy_(st[p0:p1]).mul_(alpha_s)
    return x


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# Full-row path (see _StreamingKL): fp32 bytes of the [2 * rows, M] logit buffer per row block.
# CPU: 16 MiB -> 128 rows at M = 16384 (GEMMs with k or m = 128 run at ~150 GFLOP/s on 2 threads,
# 64 rows at ~120), i.e. ~0.6 % of the naive peak at P = 8192; elementwise passes are done in
# column chunks of _FULLROW_CHUNK so they run from L2. CUDA: 256 MiB.
_FULLROW_BUDGET = {"cpu": 16 * 2**20, "cuda": 256 * 2**20}
_FULLROW_CHUNK = 1024
# Whether the last full-row backward that needed dPrototypes saw a "uniform" upstream gradient
# (see _StreamingKL.backward). Only a speed hint: it decides whether the forward speculatively
# computes the unweighted dPrototypes; the result is exact either way.
_uniform_hint = [True]


def _full_row_rows(device: torch.device, P: int, M: int, elt: int, block_p: int | None) -> int:
    """Rows per block of the full-row path, 0 when one row of logits exceeds the budget."""
    cap = _FULLROW_BUDGET.get(device.type, _FULLROW_BUDGET["cpu"]) // (2 * M * elt)
    if cap <= 0:
        return 0
    return max(1, min(cap, block_p or cap, max(P, 1)))


def _chunked_grads(student, teacher, T, lse_a, lse_b, g, need_s, need_t, student_temp, teacher_temp, bp, bm):
    """Backward of the M-chunked form: recompute the logit tiles from the saved base-2 LSEs, then
    dS += G T_c, dT_c += G^T (student * g / tau_s). Returns (d_s, d_t) in the compute dtype."""
    P, M = student.shape[0], T.shape[0]
    cdt, dev = T.dtype, T.device
    alpha_s, alpha_t = _LOG2E / student_temp, _LOG2E / teacher_temp
    d_s = torch.zeros(P, T.shape[1], dtype=cdt, device=dev) if need_s else None
    d_t = torch.zeros_like(T) if need_t else None
    AB = torch.empty(2 * bp, bm, dtype=cdt, device=dev)
    X = torch.empty(2 * bp, T.shape[1], dtype=cdt, device=dev)
    for p0 in range(0, P, bp):
        p1 = min(P, p0 + bp)
        n = p1 - p0
        x = X[: 2 * n]
        x[:n].copy_(teacher[p0:p1].detach()).mul_(alpha_t)
        x[n:].copy_(student[p0:p1].detach()).mul_(alpha_s)
        neg_lse = torch.cat([lse_a[p0:p1], lse_b[p0:p1]]).neg_()[:, None]
        s_w = student[p0:p1].detach().to(cdt) * (g[p0:p1, None] / student_temp) if need_t else None
        ds_blk = d_s[p0:p1] if need_s else None
        for m0 in range(0, M, bm):
            m1 = min(M, m0 + bm)
            Tc = T[m0:m1]
            full = n == bp and m1 - m0 == bm
            qp = torch.addmm(neg_lse, x, Tc.T, out=AB) if full else torch.addmm(neg_lse, x, Tc.T)
            qp.exp2_()                                 # rows [:n] = q, rows [n:] = p
            G = qp[n:].sub_(qp[:n])                    # p - q
            if need_s:
                ds_blk.addmm_(G, Tc)
            if need_t:
                d_t[m0:m1].addmm_(G.T, s_w)
    if need_s:
        d_s.mul_(g[:, None] / student_temp)
    return d_s, d_t


def _full_row_forward(st, te, T, alpha_s, alpha_t, rows, chunk, need_s, want_dt):
    """Forward of the full-row path. Per block of ``rows`` rows, phase 1 walks over column chunks of
    ``chunk`` prototypes: ONE GEMM gives the teacher and student logit tiles (base 2), the online
    max / sum of exp2 / KL statistics are updated while the tile is in cache, and the tile's
    exponentials ``2^(x - m_c)`` are KEPT (chunk-major, each tile contiguous) together with the
    running max ``m_c``. Phase 2 knows the exact LSEs: per chunk G = p - q (rescaled in place,
    in cache) and the gradient products. Returns loss, lse2_a, lse2_b, d_dir = G T ([P, D] or
    None) and d_tu = G^T (student * alpha_s) ([M, D] or None), all in the compute dtype."""
    P, M, D = st.shape[0], T.shape[0], T.shape[1]
    cdt, dev = T.dtype, T.device
    loss = torch.empty(P, dtype=cdt, device=dev)
    lse_a = torch.empty(P, dtype=cdt, device=dev)
    lse_b = torch.empty(P, dtype=cdt, device=dev)
    d_dir = torch.zeros(P, D, dtype=cdt, device=dev) if need_s else None
    d_tu = torch.zeros(M, D, dtype=cdt, device=dev) if want_dt else None
    keep = need_s or want_dt
    cw = min(M, chunk)
    E = torch.empty(2 * rows * (M if keep else cw), dtype=cdt, device=dev)
    Dt = torch.empty(rows * cw, dtype=cdt, device=dev)
    X = torch.empty(2 * rows, D, dtype=cdt, device=dev)
    chunks = [(c0, min(M, c0 + cw)) for c0 in range(0, M, cw)]
    for p0 in range(0, P, rows):
        p1 = min(P, p0 + rows)
        n = p1 - p0
        x = _stage_rows(X, te, st, p0, p1, alpha_t, alpha_s)
        m = torch.full((2 * n,), -math.inf, dtype=cdt, device=dev)   # [:n] teacher, [n:] student
        s = torch.zeros(2 * n, dtype=cdt, device=dev)
        u = torch.zeros(n, dtype=cdt, device=dev)
        maxes = []
        for c0, c1 in chunks:
            w = c1 - c0
            off = 2 * n * c0 if keep else 0
            ab = torch.mm(x, T[c0:c1].T, out=E[off: off + 2 * n * w].view(2 * n, w))
            a, b = ab[:n], ab[n:]
            d = torch.sub(a, b, out=Dt[: n * w].view(n, w))
            new_m = torch.maximum(m, ab.amax(dim=1))
            corr = torch.exp2(m - new_m)
            ab.sub_(new_m[:, None]).exp2_()
            s.mul_(corr).add_(ab.sum(dim=1))
            u.mul_(corr[:n]).add_(d.mul_(a).sum(dim=1))  # sum_j 2^(a2 - m) (a2 - b2)
            m = new_m
            maxes.append(new_m)
        lse = m + torch.log2(s)
        lse_a[p0:p1], lse_b[p0:p1] = lse[:n], lse[n:]
        loss[p0:p1] = (u / s[:n] - lse[:n] + lse[n:]) * _LN2
        if not keep:
            continue
        for (c0, c1), m_c in zip(chunks, maxes):
            w = c1 - c0
            ab = E[2 * n * c0: 2 * n * c1].view(2 * n, w)
            sc = (m_c - lse).exp2_()                    # 2^(x - m_c) * sc = softmax
            G = ab[n:].mul_(sc[n:, None]).addcmul_(ab[:n], sc[:n, None].neg())   # p - q, in place
            if need_s:
                d_dir[p0:p1].addmm_(G, T[c0:c1])
            if want_dt:
                d_tu[c0:c1].addmm_(G.T, x[n:])
    return loss, lse_a, lse_b, d_dir, d_tu


class _StreamingKL(torch.autograd.Function):
    """Tiled KL. Works in base 2 (``log2(e)`` folded into the input scaling, so the exponentials are
    ``exp2``, ~3x cheaper than ``exp`` on AVX-512 CPUs) and converts back at the end.

    **Full-row path** (``full_rows > 0``: gradients required and ``rows x M`` logits fit the budget,
    see _full_row_rows). Rows are processed in blocks with their COMPLETE logit rows, so softmax,
    LSE and KL are exact per row (no online rescaling) and G = p - q is available in forward:
        dS_dir = G T            (exact for any upstream gradient g: backward scales row i by g_i/tau_s)
        dT_u   = G^T student    (only if prototypes need grad; exact iff g is "uniform")
    Backward: dS = dS_dir * g/tau_s; dT = (c/tau_s) dT_u when g_i == c for every row with a non-zero
    student row (sum / mean, zero-padded rows), else dT is recomputed by the M-chunked backward
    (3 products). Products: 3 (student only), 4 (both, uniform g), 6 (both, other g: the forward
    then skips dT_u when the previous call's g was not uniform, else 7 once).

    **M-chunked path** (``block_m`` given, or even one row of logits exceeds the budget): online
    softmax, per row and per tile of ``a2 = a log2 e``, ``b2 = b log2 e`` (running max ``m``):
        S_a = sum 2^(a2 - m_a),  U = sum 2^(a2 - m_a) (a2 - b2),  S_b = sum 2^(b2 - m_b)
        KL  = ln 2 * (U / S_a - (m_a + log2 S_a) + (m_b + log2 S_b))
    Saved for backward: the inputs and the two base-2 LSEs (2 floats per row).
    When only ``student`` needs a gradient, forward also accumulates sum_j q_j T_j and
    sum_j p_j T_j (online-rescaled, as FlashAttention's output) and backward just scales their
    difference by g/tau_s. Otherwise backward (_chunked_grads), per tile: q = 2^(a2 - lse2_a),
    p = 2^(b2 - lse2_b), G = p - q, then
        dS_blk += G @ T_c              (rows scaled by g/tau_s at the end)
        dT_c   += G^T @ (student_blk * g/tau_s)
    """

    @staticmethod
    def forward(ctx, student, teacher, prototypes, student_temp, teacher_temp, block_p, block_m, grad_enabled,
                full_rows):
        P, M = student.shape[0], prototypes.shape[0]
        cdt = _compute_dtype(student)
        dev = student.device
        T = prototypes.detach().to(cdt).contiguous()
        st, te = student.detach(), teacher.detach()
        alpha_s, alpha_t = _LOG2E / student_temp, _LOG2E / teacher_temp
        ctx.student_dtype = student.dtype
        out_dtype = torch.float64 if cdt == torch.float64 else torch.float32
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        # The full-row path pays off for dPrototypes only when backward's g turns out uniform; when the
        # last such backward saw a non-uniform g, the M-chunked path (2 + 4 products) runs instead.
        ctx.track_hint = grad_enabled and need_t and full_rows > 0
        if grad_enabled and (need_s or need_t) and full_rows > 0 and (not need_t or _uniform_hint[0]):
            loss, lse_a, lse_b, d_dir, d_tu = _full_row_forward(st, te, T, alpha_s, alpha_t, full_rows,
                                                                _FULLROW_CHUNK if dev.type == "cpu" else M,
                                                                need_s, need_t)
            ctx.save_for_backward(student, teacher, prototypes, lse_a, lse_b)
            # Not saved tensors: backward scales them in place and returns them as the gradients.
            ctx.d_dir, ctx.d_tu = d_dir, d_tu
            ctx.nz = st.ne(0).any(dim=1) if need_t else None
            ctx.cfg = (student_temp, teacher_temp, block_p, block_m, "full")
            return loss.to(out_dtype)
        loss = torch.empty(P, dtype=cdt, device=dev)
        lse_a = torch.empty(P, dtype=cdt, device=dev)
        lse_b = torch.empty(P, dtype=cdt, device=dev)
        bp, bm = block_p, block_m
        # Only the student needs a gradient (the paper's default: no gradient to the text tower
        # through this loss): accumulate both "attention outputs" sum_j q_j T_j and sum_j p_j T_j
        # with the same online rescaling (FlashAttention forward) -- 4 GEMMs in all instead of 2 + 3.
        fused_ds = grad_enabled and need_s and not need_t
        d_dir = torch.empty(P, T.shape[1], dtype=cdt, device=dev) if fused_ds else None
        # Teacher and student rows are stacked so each tile's two logit blocks come from ONE GEMM
        # ([2n, D] x [D, bm]: fewer calls and a taller, more efficient GEMM).
        AB = torch.empty(2 * bp, bm, dtype=cdt, device=dev)
        Dt = torch.empty(bp, bm, dtype=cdt, device=dev)
        X = torch.empty(2 * bp, T.shape[1], dtype=cdt, device=dev)
        for p0 in range(0, P, bp):
            p1 = min(P, p0 + bp)
            n = p1 - p0
            x = _stage_rows(X, te, st, p0, p1, alpha_t, alpha_s)
            m_a = torch.full((n,), -math.inf, dtype=cdt, device=dev)
            m_b = torch.full((n,), -math.inf, dtype=cdt, device=dev)
            s_a = torch.zeros(n, dtype=cdt, device=dev)
            s_b = torch.zeros(n, dtype=cdt, device=dev)
            u = torch.zeros(n, dtype=cdt, device=dev)
            if fused_ds:
                o_q = torch.zeros(n, T.shape[1], dtype=cdt, device=dev)
                o_p = torch.zeros_like(o_q)
            for m0 in range(0, M, bm):
                m1 = min(M, m0 + bm)
                Tc = T[m0:m1]
                full = n == bp and m1 - m0 == bm
                ab = torch.mm(x, Tc.T, out=AB) if full else x @ Tc.T
                a, b = ab[:n], ab[n:]
                d = torch.sub(a, b, out=Dt) if full else a - b
                # teacher: online max, exp2 in place, rescale running sums
                new_m = torch.maximum(m_a, a.amax(dim=1))
                corr = torch.exp2(m_a - new_m)
                a.sub_(new_m[:, None]).exp2_()
                s_a.mul_(corr).add_(a.sum(dim=1))
                u.mul_(corr).add_(d.mul_(a).sum(dim=1))   # sum_j e^(a-m) (a - b), in place
                m_a = new_m
                if fused_ds:
                    o_q.mul_(corr[:, None]).addmm_(a, Tc)
                # student
                new_m = torch.maximum(m_b, b.amax(dim=1))
                corr = torch.exp2(m_b - new_m)
                b.sub_(new_m[:, None]).exp2_()
                s_b.mul_(corr).add_(b.sum(dim=1))
                m_b = new_m
                if fused_ds:
                    o_p.mul_(corr[:, None]).addmm_(b, Tc)
            if fused_ds:  # sum_j (p_j - q_j) T_j for these rows
                torch.sub(o_p / s_b[:, None], o_q.div_(s_a[:, None]), out=d_dir[p0:p1])
            la = m_a + torch.log2(s_a)
            lb = m_b + torch.log2(s_b)
            lse_a[p0:p1] = la
            lse_b[p0:p1] = lb
            loss[p0:p1] = (u / s_a - la + lb) * _LN2
        if fused_ds:
            ctx.save_for_backward(d_dir)
        else:
            ctx.save_for_backward(student, teacher, prototypes, lse_a, lse_b)
        ctx.cfg = (student_temp, teacher_temp, block_p, block_m, "fused_ds" if fused_ds else "chunked")
        return loss.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        student_temp, teacher_temp, bp, bm, mode = ctx.cfg
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        nones = (None,) * 6
        if not (need_s or need_t):
            return (None, None, None) + nones
        if mode == "fused_ds":  # dS = (g / tau_s) * sum_j (p_j - q_j) T_j, computed in forward
            (d_dir,) = ctx.saved_tensors
            d_s = d_dir * (grad.to(d_dir.dtype).reshape(-1, 1) / student_temp)
            return (d_s.to(ctx.student_dtype), None, None) + nones
        student, teacher, prototypes, lse_a, lse_b = ctx.saved_tensors
        P = student.shape[0]
        cdt = _compute_dtype(student)
        g = grad.to(cdt).reshape(P)
        d_s = d_t = None
        if mode == "full" and not getattr(ctx, "consumed", False):
            d_dir, d_tu, nz = ctx.d_dir, ctx.d_tu, ctx.nz
            ctx.d_dir = ctx.d_tu = ctx.nz = None       # consumed: a second backward (retain_graph) recomputes
            ctx.consumed = True
            if need_s:
                d_s = d_dir.mul_(g[:, None] / student_temp)
            if need_t:
                # g_i == c on every row with a non-zero student row (rows with s_i = 0 add nothing to dT)
                gz = g[nz]
                uniform = gz.numel() == 0 or bool((gz == gz[0]).all())
                if uniform:  # dT = (c / tau_s) sum_i G_i student_i, d_tu holds student * alpha_s
                    c = gz[0] if gz.numel() else g.new_zeros(())
                    d_t = d_tu.mul_(c / (student_temp * (_LOG2E / student_temp)))
                _uniform_hint[0] = uniform
        elif need_t and getattr(ctx, "track_hint", False):
            gz = g[student.detach().ne(0).any(dim=1)]
            _uniform_hint[0] = gz.numel() == 0 or bool((gz == gz[0]).all())
        need_s_rest, need_t_rest = need_s and d_s is None, need_t and d_t is None
        if need_s_rest or need_t_rest:
            T = prototypes.detach().to(cdt).contiguous()
            dp, dm = _default_blocks(student.device, P, T.shape[0])
            cbp, cbm = (bp, bm) if mode != "full" else (dp, dm)
            ds2, dt2 = _chunked_grads(student, teacher, T, lse_a, lse_b, g, need_s_rest, need_t_rest,
                                      student_temp, teacher_temp, cbp, cbm)
            d_s = ds2 if need_s_rest else d_s
            d_t = dt2 if need_t_rest else d_t
        if need_s:
            d_s = d_s.to(student.dtype)
        if need_t:
            d_t = d_t.to(prototypes.dtype)
        return (d_s, None, d_t) + nones


def _check_inputs(student, teacher, prototypes):
    if student.dim() != 2 or teacher.dim() != 2 or prototypes.dim() != 2:
        raise ValueError("patch_sentence_kl expects 2-D student [P,D], teacher [P,D], prototypes [M,D]; got "
                         f"{tuple(student.shape)}, {tuple(teacher.shape)}, {tuple(prototypes.shape)}")
    if student.shape != teacher.shape or student.shape[1] != prototypes.shape[1]:
        raise ValueError(f"shape mismatch: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}, "
                         f"prototypes {tuple(prototypes.shape)}")
    if prototypes.shape[0] == 0:
        raise ValueError("patch_sentence_kl needs at least one prototype (M >= 1)")
    dts = {student.dtype, teacher.dtype, prototypes.dtype}
    if not dts <= {torch.float32, torch.bfloat16, torch.float16, torch.float64}:
        raise TypeError(f"unsupported dtypes {dts}")
    if len({student.device, teacher.device, prototypes.device}) != 1:
        raise ValueError("student, teacher and prototypes must be on the same device")


def patch_sentence_kl_streaming(student, teacher, prototypes, *, student_temp: float, teacher_temp: float,
                                block_p: int | None = None, block_m: int | None = None) -> torch.Tensor:
    """Streaming backend (see :class:`_StreamingKL`). ``block_m`` forces the M-chunked path with tiles of
    ``block_p x block_m``; without it, ``block_p`` is the row block of the full-row path."""
    P, M = student.shape[0], prototypes.shape[0]
    dp, dm = _default_blocks(student.device, P, M)
    # Full-row path unless the caller asked for M tiles (block_m) or one row exceeds the budget;
    # there ``block_p`` (if given) is the number of rows per block.
    elt = 8 if student.dtype == torch.float64 else 4
    full_rows = _full_row_rows(student.device, P, M, elt, block_p) if block_m is None else 0
    return _StreamingKL.apply(student, teacher, prototypes, float(student_temp), float(teacher_temp),
                              max(1, block_p or dp), max(1, block_m or dm), torch.is_grad_enabled(), full_rows)


# --------------------------------------------------------------------------------------------
# cuda (fused extension)
# --------------------------------------------------------------------------------------------
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


_selfcheck_lock = threading.Lock()
_selfcheck: dict[int, tuple[bool, str]] = {}   # device index -> (ok, reason)
_warned: set[str] = set()


def _run_selfcheck(device: torch.device) -> tuple[bool, str]:
    """Small random problem (odd shapes), forward + both gradients, fp32, bf16 and fp16, against the
    float64 reference on the same (rounded) inputs."""
    gen = torch.Generator(device="cpu").manual_seed(1234)
    try:
        # The first call may come from a caller under no_grad / inference_mode / autocast (eval loops,
        # bench_step.py's bf16 autocast): the check needs autograd and must not be autocast, else
        # .backward() raises (or the comparison runs in bf16) and the extension is wrongly disabled for
        # good. The oracle is float64 so a global TF32 setting cannot make the fp32 comparison fail.
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            # 16-bit gradients come back rounded to bf16/fp16 (half an ulp is up to 2^-8 = 3.9e-3 of the
            # max for bf16), so their tolerance is the test suite's 5e-3; the loss is always fp32.
            for dtype, tol in ((torch.float32, 2e-4), (torch.bfloat16, 5e-3), (torch.float16, 5e-3)):
                P, M, D = 77, 133, 72   # D = 72: not a multiple of the 32-wide k chunk nor of 16 (wmma k)
                s = torch.nn.functional.normalize(torch.randn(P, D, generator=gen), dim=-1).to(device, dtype)
                t = torch.nn.functional.normalize(torch.randn(P, D, generator=gen), dim=-1).to(device, dtype)
                T = torch.nn.functional.normalize(torch.randn(M, D, generator=gen), dim=-1).to(device, dtype)
                w = torch.rand(P, generator=gen, dtype=torch.float64).to(device)
                outs = []
                for fn, cast in ((patch_sentence_kl_cuda, dtype), (patch_sentence_kl_reference, torch.float64)):
                    s_, T_ = (x.detach().to(cast, copy=True).requires_grad_() for x in (s, T))
                    loss = fn(s_, t.to(cast), T_, student_temp=0.1, teacher_temp=0.04)
                    (loss.double() * w).sum().backward()
                    outs.append((loss.double(), s_.grad.double(), T_.grad.double()))
                for name, x, y in zip(("loss", "d_student", "d_prototypes"), outs[0], outs[1]):
                    err = ((x - y).abs().max() / y.abs().max().clamp_min(1e-6)).item()
                    if not math.isfinite(err) or err > tol:
                        return False, f"self-check failed on {device}: {name} ({dtype}) rel. error {err:.2e} > {tol:.0e}"
        torch.cuda.synchronize(device)
        return True, "ok"
    except Exception as e:  # noqa: BLE001 - any failure means: do not use the extension
        return False, f"self-check raised on {device}: {type(e).__name__}: {e}"


def cuda_backend_status(device: torch.device | int | str | None = None) -> tuple[bool, str]:
    """``(usable, reason)`` for the fused CUDA backend on ``device`` (runs the self-check once)."""
    from ._extension import load_extension, load_error
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "no CUDA device"
    idx = device.index if device.index is not None else torch.cuda.current_device()
    with _selfcheck_lock:
        if idx not in _selfcheck:
            if load_extension() is None:
                _selfcheck[idx] = (False, f"fused extension unavailable ({load_error()})")
            else:
                with torch.cuda.device(idx):
                    _selfcheck[idx] = _run_selfcheck(torch.device("cuda", idx))
        return _selfcheck[idx]


def patch_sentence_kl(student: torch.Tensor, teacher: torch.Tensor, prototypes: torch.Tensor, *,
                      student_temp: float, teacher_temp: float, backend: str = "auto",
                      deterministic: bool = False) -> torch.Tensor:
    """Per-row ``KL(softmax(teacher T^T/teacher_temp) || softmax(student T^T/student_temp))``.

    Args:
        student, teacher: ``[P, D]`` (L2-normalised) patch features; ``teacher`` gets no gradient.
        prototypes: ``[M, D]`` sentence embeddings; gradient only through the student logits.
        backend: ``"auto"`` | ``"streaming"`` | ``"cuda"`` | ``"reference"``.
        deterministic: cuda backend only: fixed-order (atomic-free) prototype-gradient reduction.
    Returns:
        ``[P]`` float32 (float64 for float64 inputs).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    _check_inputs(student, teacher, prototypes)
    kw = dict(student_temp=student_temp, teacher_temp=teacher_temp)
    if backend == "reference":
        return patch_sentence_kl_reference(student, teacher, prototypes, **kw)
    if backend == "cuda":
        return patch_sentence_kl_cuda(student, teacher, prototypes, deterministic=deterministic, **kw)
    if backend == "auto" and student.device.type == "cuda" and student.dtype != torch.float64:
        ok, reason = cuda_backend_status(student.device)
        if ok:
            return patch_sentence_kl_cuda(student, teacher, prototypes, deterministic=deterministic, **kw)
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"patch_sentence_kl: using the streaming PyTorch backend on CUDA tensors: {reason}. "
                          "Build the fused kernel with `RILS_BUILD_CUDA_EXT=1 CUDA_HOME=/usr/local/cuda pip install "
                          "-e .` (see docs/kernels.md).", RuntimeWarning, stacklevel=2)
    return patch_sentence_kl_streaming(student, teacher, prototypes, **kw)
