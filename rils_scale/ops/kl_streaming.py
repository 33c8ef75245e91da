"""Streaming backend of the patch-sentence KL: plain PyTorch on any device, never P x M in memory.

With gradients: full-row blocks (the exponentials of ``rows x M`` logits within a fixed budget), exact
per-row softmax and the gradient products in forward; backward only rescales (recomputing dPrototypes
only when the upstream gradient is not uniform). Otherwise online softmax over tiles of
``block_p x block_m`` logits; forward keeps five scalars per row (two running maxima, two running sums
of exponentials and ``sum exp(a) (a - b)``), backward recomputes the tiles from the two saved
log-sum-exps. See docs/kernels.md section 1.
"""
from __future__ import annotations

import math

import torch

__all__ = ["patch_sentence_kl_streaming", "patch_sentence_kl_streaming_chunked", "mm_f32", "use_lp_gemm"]

_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)


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
_CUDA_CHUNK = 4096   # column chunk of the full-row path on CUDA (was M: one fp32 chunk of width M)
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
                                                                _FULLROW_CHUNK if dev.type == "cpu" else _CUDA_CHUNK,
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



def patch_sentence_kl_streaming(student, teacher, prototypes, *, student_temp: float, teacher_temp: float,
                                block_p: int | None = None, block_m: int | None = None) -> torch.Tensor:
    """Streaming backend (see :class:`_StreamingKL`). ``block_m`` forces the M-chunked path with tiles of
    ``block_p x block_m``; without it, ``block_p`` is the row block of the full-row path."""
    P, M = student.shape[0], prototypes.shape[0]
    if block_p is None and block_m is None and use_lp_gemm(student):
        return _LowPrecisionKL.apply(student, teacher, prototypes, float(student_temp), float(teacher_temp),
                                     *_lp_blocks(student.device, P, M))
    dp, dm = _default_blocks(student.device, P, M)
    # Full-row path unless the caller asked for M tiles (block_m) or one row exceeds the budget;
    # there ``block_p`` (if given) is the number of rows per block.
    elt = 8 if student.dtype == torch.float64 else 4
    full_rows = _full_row_rows(student.device, P, M, elt, block_p) if block_m is None else 0
    return _StreamingKL.apply(student, teacher, prototypes, float(student_temp), float(teacher_temp),
                              max(1, block_p or dp), max(1, block_m or dm), torch.is_grad_enabled(), full_rows)


def patch_sentence_kl_streaming_chunked(student, teacher, prototypes, *, student_temp: float, teacher_temp: float
                                        ) -> torch.Tensor:
    """The M-chunked online form with the device's default tiles (a candidate of ``auto``: on CPU it can
    beat the full-row path for student-only gradients at large M, see docs/kernels.md)."""
    P, M = student.shape[0], prototypes.shape[0]
    _, dm = _default_blocks(student.device, P, M)
    return patch_sentence_kl_streaming(student, teacher, prototypes, student_temp=student_temp,
                                       teacher_temp=teacher_temp, block_m=dm)


# --------------------------------------------------------------------------------------------
# bf16 / fp16 on CUDA: tensor-core GEMMs with fp32 outputs over blocked M
# --------------------------------------------------------------------------------------------
# Tests set this to run the low-precision path on CPU (its GEMMs are then fp32 on the same rounded
# operands, which is what a bf16 x bf16 -> fp32 tensor-core GEMM computes up to summation order).
FORCE_LP_GEMM = [False]
_mm_dtype_ok = [True]


def use_lp_gemm(x: torch.Tensor) -> bool:
    return x.dtype in (torch.bfloat16, torch.float16) and (x.device.type == "cuda" or FORCE_LP_GEMM[0])


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result: on CUDA a bf16/fp16 tensor-core GEMM with fp32 output (cuBLAS,
    ``torch.mm(..., out_dtype=float32)``); elsewhere fp32 GEMM on the (already rounded) operands."""
    if a.device.type == "cuda" and a.dtype in (torch.bfloat16, torch.float16) and _mm_dtype_ok[0]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):   # older torch: no mm.dtype overload
            _mm_dtype_ok[0] = False
    if a.device.type == "cuda" and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b).float()       # bf16 output: only without mm.dtype (torch < 2.8)
    return torch.mm(a.float(), b.float())


def _lp_blocks(device: torch.device, P: int, M: int) -> tuple[int, int]:
    """(rows, columns) per tile: 4096 x 4096 on CUDA (fp32 logit tile of both halves: 128 MiB)."""
    if device.type == "cuda":
        return min(P, 4096) or 1, min(M, 4096)
    return min(P, 256) or 1, min(M, 1024)


class _LowPrecisionKL(torch.autograd.Function):
    """M-chunked online form whose products all run in the input dtype with fp32 accumulation/output:
    logits ``[2n, w] = mm_f32([teacher; student]_blk, T_blk^T)`` scaled per row by log2(e)/tau in fp32
    (scaling the bf16 inputs instead would round the logits to 8 bits); backward recomputes the tile,
    forms ``G = (p - q) g / tau_s`` in fp32, rounds it to the input dtype and accumulates
    ``dS_blk += G T_blk``, ``dT_blk += G^T S_blk`` in fp32. 2 + 2 + 2 products (2 + 2 + 1 student only)."""

    @staticmethod
    def forward(ctx, student, teacher, prototypes, student_temp, teacher_temp, bp, bm):
        P, M = student.shape[0], prototypes.shape[0]
        dt = student.dtype
        st = student.detach().contiguous()
        te = teacher.detach().to(dt).contiguous()
        T = prototypes.detach().to(dt).contiguous()
        dev = st.device
        alpha_s, alpha_t = _LOG2E / student_temp, _LOG2E / teacher_temp
        loss = torch.empty(P, dtype=torch.float32, device=dev)
        lse_a = torch.empty(P, dtype=torch.float32, device=dev)
        lse_b = torch.empty(P, dtype=torch.float32, device=dev)
        for p0 in range(0, P, bp):
            p1 = min(P, p0 + bp)
            n = p1 - p0
            x = torch.cat([te[p0:p1], st[p0:p1]])
            scale = torch.cat([torch.full((n, 1), alpha_t, device=dev), torch.full((n, 1), alpha_s, device=dev)])
            m = torch.full((2 * n,), -math.inf, device=dev)
            s = torch.zeros(2 * n, device=dev)
            u = torch.zeros(n, device=dev)
            for m0 in range(0, M, bm):
                ab = mm_f32(x, T[m0:min(M, m0 + bm)].T).mul_(scale)
                d = ab[:n] - ab[n:]
                new_m = torch.maximum(m, ab.amax(dim=1))
                corr = torch.exp2(m - new_m)
                ab.sub_(new_m[:, None]).exp2_()
                s.mul_(corr).add_(ab.sum(dim=1))
                u.mul_(corr[:n]).add_(d.mul_(ab[:n]).sum(dim=1))
                m = new_m
            lse = m + torch.log2(s)
            lse_a[p0:p1], lse_b[p0:p1] = lse[:n], lse[n:]
            loss[p0:p1] = (u / s[:n] - lse[:n] + lse[n:]) * _LN2
        ctx.save_for_backward(st, te, T, lse_a, lse_b)
        ctx.cfg = (student_temp, teacher_temp, bp, bm, student.dtype, prototypes.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        st, te, T, lse_a, lse_b = ctx.saved_tensors
        student_temp, teacher_temp, bp, bm, s_dtype, t_dtype = ctx.cfg
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if not (need_s or need_t):
            return (None,) * 7
        P, D = st.shape
        M = T.shape[0]
        dev = st.device
        gs = grad.float().reshape(P) / student_temp
        alpha_s, alpha_t = _LOG2E / student_temp, _LOG2E / teacher_temp
        d_s = torch.zeros(P, D, device=dev) if need_s else None
        d_t = torch.zeros(M, D, device=dev) if need_t else None
        for p0 in range(0, P, bp):
            p1 = min(P, p0 + bp)
            n = p1 - p0
            x = torch.cat([te[p0:p1], st[p0:p1]])
            scale = torch.cat([torch.full((n, 1), alpha_t, device=dev), torch.full((n, 1), alpha_s, device=dev)])
            shift = torch.cat([lse_a[p0:p1], lse_b[p0:p1]])[:, None]
            for m0 in range(0, M, bm):
                m1 = min(M, m0 + bm)
                qp = mm_f32(x, T[m0:m1].T).mul_(scale).sub_(shift).exp2_()   # rows [:n] q, [n:] p
                G = qp[n:].sub_(qp[:n]).mul_(gs[p0:p1, None]).to(st.dtype)
                if need_s:
                    d_s[p0:p1] += mm_f32(G, T[m0:m1])
                if need_t:
                    d_t[m0:m1] += mm_f32(G.T, st[p0:p1])
        return (d_s.to(s_dtype) if need_s else None, None, d_t.to(t_dtype) if need_t else None,
                None, None, None, None)
