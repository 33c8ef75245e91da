"""Triton backend of the patch-sentence KL: fused tiles, tensor-core products, never P x M in memory.

Forward (``_fwd_kernel``): grid (row blocks, M splits). Each program walks over the prototype tiles of
its M range; per tile ONE pass over D gives both logit tiles (``tl.dot``, bf16/fp16 in, fp32 out) and
the online statistics are updated in registers (base 2: max and sum of exp2 for teacher and student,
and ``sum 2^(a - m_a) (a - b)``). The M split makes the grid fill the SMs when P is small (early in
training, under TP); the partial statistics ``[splits, P, 5]`` are combined by a few PyTorch ops.

Backward: ``_bwd_ds_kernel`` (grid row blocks x D blocks x M splits) and ``_bwd_dt_kernel`` (grid
prototype blocks x D blocks x P splits; the splits fill the SMs when P or M is small, their partial
sums are added in a fixed order) recompute the logit tiles from the saved base-2 LSEs, form
``G = (p - q) * g / tau_s`` in registers, round it to the input dtype and accumulate ``G @ T`` resp.
``G^T @ S`` with ``tl.dot`` in fp32. Each output element belongs to one program and is reduced in a
fixed order: no atomics, bitwise repeatable. When D exceeds the output block (``BLOCK_DO``), the
logits are recomputed once per D block (counted in the benchmark's executed FLOPs).

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on CPU tensors
(numpy): that is how CI checks their numerics. The interpreter's ``tl.dot`` on bf16 was found wrong
once, so there every dot operand is upcast to fp32 (``DOT_F32``) after the same bf16 rounding of G.
"""
from __future__ import annotations

import math
import os

import torch

__all__ = ["patch_sentence_kl_triton", "triton_status", "INTERPRETED", "forward_stats", "g_tiles"]

_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR = None
except Exception as e:  # noqa: BLE001 - CPU-only torch builds have no triton
    triton = tl = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def triton_status(device: torch.device) -> tuple[bool, str]:
    if triton is None:
        return False, f"triton not importable ({_IMPORT_ERROR})"
    if device.type == "cuda":
        if INTERPRETED:
            return False, "TRITON_INTERPRET=1: Triton kernels run on the CPU interpreter only"
        return True, "ok"
    if INTERPRETED:
        return True, "ok (Triton interpreter)"
    return False, "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)"


if triton is not None:
    @triton.jit
    def _logits(te_ptr, st_ptr, t_ptr, rp, rm, P, M, D, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
        """Raw teacher and student logit tiles ``[BLOCK_P, BLOCK_M]`` (fp32), one pass over D."""
        acc_a = tl.zeros((BLOCK_P, BLOCK_M), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_P, BLOCK_M), dtype=tl.float32)
        rd = tl.arange(0, BLOCK_D)
        row_off = rp.to(tl.int64)[:, None] * D     # int64: P * D may exceed 2^31
        col_off = rm.to(tl.int64)[:, None] * D
        for d0 in range(0, D, BLOCK_D):
            d = d0 + rd
            pm = (rp[:, None] < P) & (d[None, :] < D)
            tm = (rm[:, None] < M) & (d[None, :] < D)
            te = tl.load(te_ptr + row_off + d[None, :], mask=pm, other=0.0)
            st = tl.load(st_ptr + row_off + d[None, :], mask=pm, other=0.0)
            tt = tl.load(t_ptr + col_off + d[None, :], mask=tm, other=0.0)
            if DOT_F32:
                te = te.to(tl.float32)
                st = st.to(tl.float32)
                tt = tt.to(tl.float32)
            ttt = tl.trans(tt)
            if IEEE:
                acc_a = tl.dot(te, ttt, acc_a, input_precision="ieee")
                acc_b = tl.dot(st, ttt, acc_b, input_precision="ieee")
            else:
                acc_a = tl.dot(te, ttt, acc_a)
                acc_b = tl.dot(st, ttt, acc_b)
        return acc_a, acc_b

    @triton.jit
    def _fwd_kernel(te_ptr, st_ptr, t_ptr, stats_ptr, P, M, D, alpha_t, alpha_s, m_per_split,
                    BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_F32: tl.constexpr, IEEE: tl.constexpr):
        pid_p = tl.program_id(0)
        pid_s = tl.program_id(1)
        rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        m_a = tl.full((BLOCK_P,), float("-inf"), tl.float32)
        m_b = tl.full((BLOCK_P,), float("-inf"), tl.float32)
        s_a = tl.zeros((BLOCK_P,), tl.float32)
        s_b = tl.zeros((BLOCK_P,), tl.float32)
        u = tl.zeros((BLOCK_P,), tl.float32)
        m_start = pid_s * m_per_split
        m_end = tl.minimum(M, m_start + m_per_split)
        for m0 in range(m_start, m_end, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            a, b = _logits(te_ptr, st_ptr, t_ptr, rp, rm, P, M, D, BLOCK_P, BLOCK_M, BLOCK_D, DOT_F32, IEEE)
            valid = (rm < m_end)[None, :]
            a = a * alpha_t
            b = b * alpha_s
            diff = tl.where(valid, a - b, 0.0)        # before masking: no (-inf) - (-inf)
            a = tl.where(valid, a, float("-inf"))
            b = tl.where(valid, b, float("-inf"))
            na = tl.maximum(m_a, tl.max(a, 1))
            ea = tl.exp2(a - na[:, None])
            ca = tl.exp2(m_a - na)
            s_a = s_a * ca + tl.sum(ea, 1)
            u = u * ca + tl.sum(ea * diff, 1)
            m_a = na
            nb = tl.maximum(m_b, tl.max(b, 1))
            s_b = s_b * tl.exp2(m_b - nb) + tl.sum(tl.exp2(b - nb[:, None]), 1)
            m_b = nb
        base = stats_ptr + (pid_s.to(tl.int64) * P + rp) * 5
        ok = rp < P
        tl.store(base + 0, m_a, mask=ok)
        tl.store(base + 1, s_a, mask=ok)
        tl.store(base + 2, u, mask=ok)
        tl.store(base + 3, m_b, mask=ok)
        tl.store(base + 4, s_b, mask=ok)

    @triton.jit
    def _g_tile(te_ptr, st_ptr, t_ptr, lse_a_ptr, lse_b_ptr, gs_ptr, rp, rm, P, M, D, alpha_t, alpha_s,
                BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_F32: tl.constexpr, IEEE: tl.constexpr):
        """``G = (p - q) * g / tau_s`` for one tile (fp32), zero outside ``P x M``."""
        a, b = _logits(te_ptr, st_ptr, t_ptr, rp, rm, P, M, D, BLOCK_P, BLOCK_M, BLOCK_D, DOT_F32, IEEE)
        rows = rp < P
        la = tl.load(lse_a_ptr + rp, mask=rows, other=0.0)
        lb = tl.load(lse_b_ptr + rp, mask=rows, other=0.0)
        w = tl.load(gs_ptr + rp, mask=rows, other=0.0)
        q = tl.exp2(a * alpha_t - la[:, None])
        p = tl.exp2(b * alpha_s - lb[:, None])
        g = (p - q) * w[:, None]
        return tl.where(rows[:, None] & (rm < M)[None, :], g, 0.0)

    @triton.jit
    def _g_kernel(te_ptr, st_ptr, t_ptr, lse_a_ptr, lse_b_ptr, gs_ptr, out_ptr, P, M, D, m_off, width,
                  alpha_t, alpha_s, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_F32: tl.constexpr, IEEE: tl.constexpr):
        """G tiles of prototype columns ``m_off : m_off + width`` into ``out [P, width]`` (hybrid path)."""
        rp = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        rc = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        g = _g_tile(te_ptr, st_ptr, t_ptr, lse_a_ptr, lse_b_ptr, gs_ptr, rp, m_off + rc, P, M, D, alpha_t,
                    alpha_s, BLOCK_P, BLOCK_M, BLOCK_D, DOT_F32, IEEE)
        mask = (rp < P)[:, None] & (rc < width)[None, :]
        tl.store(out_ptr + rp.to(tl.int64)[:, None] * width + rc[None, :], g.to(out_ptr.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _bwd_ds_kernel(te_ptr, st_ptr, t_ptr, lse_a_ptr, lse_b_ptr, gs_ptr, ds_ptr, P, M, D, alpha_t, alpha_s,
                       m_per_split, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DO: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
        """Partial dS of split ``program_id(2)`` (its M range) into ``ds[split] [P, D]``."""
        rp = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        ro = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        pid_s = tl.program_id(2)
        m_start = pid_s * m_per_split
        m_end = tl.minimum(M, m_start + m_per_split)
        acc = tl.zeros((BLOCK_P, BLOCK_DO), dtype=tl.float32)
        for m0 in range(m_start, m_end, BLOCK_M):       # m_per_split is a multiple of BLOCK_M
            rm = m0 + tl.arange(0, BLOCK_M)
            g = _g_tile(te_ptr, st_ptr, t_ptr, lse_a_ptr, lse_b_ptr, gs_ptr, rp, rm, P, M, D, alpha_t, alpha_s,
                        BLOCK_P, BLOCK_M, BLOCK_D, DOT_F32, IEEE)
            tt = tl.load(t_ptr + rm.to(tl.int64)[:, None] * D + ro[None, :],
                         mask=(rm < M)[:, None] & (ro < D)[None, :], other=0.0)
            g = g.to(tt.dtype)                   # bf16/fp16 operands for the tensor cores
            if DOT_F32:
                g = g.to(tl.float32)
                tt = tt.to(tl.float32)
            if IEEE:
                acc = tl.dot(g, tt, acc, input_precision="ieee")
            else:
                acc = tl.dot(g, tt, acc)
        out = ds_ptr + pid_s.to(tl.int64) * P * D
        tl.store(out + rp.to(tl.int64)[:, None] * D + ro[None, :], acc, mask=(rp < P)[:, None] & (ro < D)[None, :])

    @triton.jit
    def _bwd_dt_kernel(te_ptr, st_ptr, t_ptr, lse_a_ptr, lse_b_ptr, gs_ptr, dt_ptr, P, M, D, alpha_t, alpha_s,
                       p_per_split, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DO: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
        """Partial dT of split ``program_id(2)`` (its P range) into ``dt[split] [M, D]``."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        ro = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        pid_s = tl.program_id(2)
        p_start = pid_s * p_per_split
        p_end = tl.minimum(P, p_start + p_per_split)
        acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
        for p0 in range(p_start, p_end, BLOCK_P):       # p_per_split is a multiple of BLOCK_P
            rp = p0 + tl.arange(0, BLOCK_P)
            g = _g_tile(te_ptr, st_ptr, t_ptr, lse_a_ptr, lse_b_ptr, gs_ptr, rp, rm, P, M, D, alpha_t, alpha_s,
                        BLOCK_P, BLOCK_M, BLOCK_D, DOT_F32, IEEE)
            ss = tl.load(st_ptr + rp.to(tl.int64)[:, None] * D + ro[None, :],
                         mask=(rp < P)[:, None] & (ro < D)[None, :], other=0.0)
            g = g.to(ss.dtype)
            if DOT_F32:
                g = g.to(tl.float32)
                ss = ss.to(tl.float32)
            gt = tl.trans(g)
            if IEEE:
                acc = tl.dot(gt, ss, acc, input_precision="ieee")
            else:
                acc = tl.dot(gt, ss, acc)
        out = dt_ptr + pid_s.to(tl.int64) * M * D
        tl.store(out + rm.to(tl.int64)[:, None] * D + ro[None, :], acc, mask=(rm < M)[:, None] & (ro < D)[None, :])


def _splits(programs: int, tiles: int, tile: int, device: torch.device, forced: int | None = None) -> tuple[int, int]:
    """(splits, elements per split) of a reduction axis of ``tiles`` tiles so that ``programs x splits``
    gives ~4 programs per SM (small P or small M would otherwise leave SMs idle)."""
    want = forced or max(1, min(tiles, triton.cdiv(4 * _sm_count(device), max(1, programs))))
    per = triton.cdiv(tiles, max(1, min(want, tiles))) * tile
    return triton.cdiv(tiles * tile, per), per


def _config(device: torch.device, D: int) -> dict:
    """Tile sizes. GPU: chosen so that ptxas (Triton's, sm_90a, bf16) reports no spills at 8 warps --
    tests/test_kl_triton_compile.py checks it without a GPU -- but NOT tuned for speed (no GPU has run
    them). ``ds`` / ``dt``: (BLOCK_P, BLOCK_M) of the two backward kernels, whose fp32 accumulators are
    ``[64, BLOCK_DO]``: their inner tile is 32 wide to leave registers for it. The interpreter uses the
    smallest tiles ``tl.dot`` accepts (16)."""
    if device.type != "cuda":
        return dict(BLOCK_P=16, BLOCK_M=16, BLOCK_D=16, BLOCK_DO=16, ds=(16, 16), dt=(16, 16), num_warps=1,
                    bwd_num_warps=1)
    return dict(BLOCK_P=64, BLOCK_M=64, BLOCK_D=64, BLOCK_DO=min(128, max(16, triton.next_power_of_2(D))),
                ds=(64, 32), dt=(32, 64), num_warps=8, bwd_num_warps=8)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _flags(x: torch.Tensor) -> dict:
    return dict(DOT_F32=INTERPRETED, IEEE=x.dtype == torch.float32)


def _prep(student, teacher, prototypes):
    if student.dtype == torch.float64:
        raise TypeError("the triton backend takes fp32 / bf16 / fp16 inputs (use streaming for float64)")
    st = student.detach().contiguous()
    te = teacher.detach().to(st.dtype).contiguous()
    T = prototypes.detach().to(st.dtype).contiguous()
    return st, te, T


def forward_stats(st, te, T, student_temp, teacher_temp, splits: int | None = None):
    """Triton forward: ``(loss, lse2_a, lse2_b)`` fp32 ``[P]``. ``splits``: number of M splits
    (default: enough programs for ~4 per SM)."""
    P, D = st.shape
    M = T.shape[0]
    cfg = _config(st.device, D)
    bp, bm = cfg["BLOCK_P"], cfg["BLOCK_M"]
    n_p = triton.cdiv(P, bp)
    splits, m_per_split = _splits(n_p, triton.cdiv(M, bm), bm, st.device, splits)
    stats = torch.empty(splits, P, 5, dtype=torch.float32, device=st.device)
    _fwd_kernel[(n_p, splits)](te, st, T, stats, P, M, D, _LOG2E / teacher_temp, _LOG2E / student_temp,
                               m_per_split, BLOCK_P=bp, BLOCK_M=bm, BLOCK_D=cfg["BLOCK_D"],
                               num_warps=cfg["num_warps"], **_flags(st))
    m_a, s_a, u, m_b, s_b = stats.unbind(-1)        # [splits, P] each
    ma = m_a.amax(0)
    wa = torch.exp2(m_a - ma)
    mb = m_b.amax(0)
    sa = (s_a * wa).sum(0)
    lse_a = ma + torch.log2(sa)
    lse_b = mb + torch.log2((s_b * torch.exp2(m_b - mb)).sum(0))
    loss = ((u * wa).sum(0) / sa - lse_a + lse_b) * _LN2
    return loss, lse_a, lse_b


def g_tiles(st, te, T, lse_a, lse_b, gs, m0, m1, student_temp, teacher_temp, out_dtype):
    """``G[:, m0:m1] = (p - q) * gs`` as a ``[P, m1 - m0]`` tensor of ``out_dtype`` (hybrid backend)."""
    P, D = st.shape
    M = T.shape[0]
    cfg = _config(st.device, D)
    bp, bm = cfg["BLOCK_P"], cfg["BLOCK_M"]
    width = m1 - m0
    out = torch.empty(P, width, dtype=out_dtype, device=st.device)
    _g_kernel[(triton.cdiv(P, bp), triton.cdiv(width, bm))](
        te, st, T, lse_a, lse_b, gs, out, P, M, D, m0, width, _LOG2E / teacher_temp, _LOG2E / student_temp,
        BLOCK_P=bp, BLOCK_M=bm, BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"], **_flags(st))
    return out


class _TritonKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, prototypes, student_temp, teacher_temp, splits):
        st, te, T = _prep(student, teacher, prototypes)
        loss, lse_a, lse_b = forward_stats(st, te, T, student_temp, teacher_temp, splits)
        ctx.save_for_backward(st, te, T, lse_a, lse_b)
        ctx.cfg = (student_temp, teacher_temp, student.dtype, prototypes.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        st, te, T, lse_a, lse_b = ctx.saved_tensors
        student_temp, teacher_temp, s_dtype, t_dtype = ctx.cfg
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        P, D = st.shape
        M = T.shape[0]
        gs = (grad.float() / student_temp).contiguous()
        cfg = _config(st.device, D)
        bd, bdo = cfg["BLOCK_D"], cfg["BLOCK_DO"]
        args = (_LOG2E / teacher_temp, _LOG2E / student_temp)
        kw = dict(BLOCK_D=bd, BLOCK_DO=bdo, num_warps=cfg["bwd_num_warps"], **_flags(st))
        d_s = d_t = None
        n_d = triton.cdiv(D, bdo)
        # Partial sums per split of the reduction axis, added in a fixed order (deterministic, no atomics).
        if need_s:
            bp, bm = cfg["ds"]
            n_p = triton.cdiv(P, bp)
            splits, per = _splits(n_p * n_d, triton.cdiv(M, bm), bm, st.device)
            part = torch.empty(splits, P, D, dtype=torch.float32, device=st.device)
            _bwd_ds_kernel[(n_p, n_d, splits)](te, st, T, lse_a, lse_b, gs, part, P, M, D, *args, per,
                                               BLOCK_P=bp, BLOCK_M=bm, **kw)
            d_s = (part[0] if splits == 1 else part.sum(0)).to(s_dtype)
        if need_t:
            bp, bm = cfg["dt"]
            n_m = triton.cdiv(M, bm)
            splits, per = _splits(n_m * n_d, triton.cdiv(P, bp), bp, st.device)
            part = torch.empty(splits, M, D, dtype=torch.float32, device=st.device)
            _bwd_dt_kernel[(n_m, n_d, splits)](te, st, T, lse_a, lse_b, gs, part, P, M, D, *args, per,
                                               BLOCK_P=bp, BLOCK_M=bm, **kw)
            d_t = (part[0] if splits == 1 else part.sum(0)).to(t_dtype)
        return d_s, None, d_t, None, None, None


def patch_sentence_kl_triton(student, teacher, prototypes, *, student_temp: float, teacher_temp: float,
                             splits: int | None = None) -> torch.Tensor:
    """Triton backend (fp32 loss ``[P]``); ``splits`` forces the forward's number of M splits (tests)."""
    ok, why = triton_status(student.device)
    if not ok:
        raise RuntimeError(f"backend='triton' unavailable: {why}")
    if student.shape[0] == 0:
        from .kl_streaming import patch_sentence_kl_streaming
        return patch_sentence_kl_streaming(student, teacher, prototypes, student_temp=student_temp,
                                           teacher_temp=teacher_temp)
    return _TritonKL.apply(student, teacher, prototypes, float(student_temp), float(teacher_temp), splits)
