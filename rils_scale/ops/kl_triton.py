"""Triton backend of the patch-sentence KL: tensor-core products, G formed once, never P x M in memory.

Teacher logits ``a = te T^T / tau_t`` (stop-gradient), student logits ``b = st T^T / tau_s``, per row
``KL(softmax a || softmax b)``; ``G = p - q`` and, with the upstream weight ``w = g / tau_s``,
``dS = diag(w) G T`` and ``dT = G^T diag(w) S`` (docs/kernels.md section 2 has the tile design and the
desk estimate; nothing here has run on a GPU).

* ``_fwd_kernel`` -- grid (row blocks of 128) x (M splits chosen to fill whole waves of the SMs). A
  program sweeps the 128-wide prototype tiles of its M range; per tile one pass over D (32-wide chunks,
  4-stage software-pipelined loads) feeds two ``tl.dot`` (bf16/fp16 in, fp32 accumulate: ``wgmma`` on sm_90a)
  into the teacher and student logit tiles, and the online statistics (base 2: maxima, sums of exp2,
  ``sum 2^(a - m_a) (a - b)``) stay in registers. 128 rows on 8 warps = one 64-row slab per warpgroup,
  so every row reduction stays inside a warp (no shared-memory exchange between warpgroups). The
  partial statistics ``[splits, P, 5]`` are combined by a few PyTorch ops.
* ``_g_kernel`` -- recomputes both logit tiles from the saved base-2 LSEs ONCE per (row, prototype)
  tile and writes ``G = p - q`` (input dtype; |G| <= 1 whatever the upstream gradient's scale, which is
  applied in fp32 outside the 16-bit operands) into a bounded column chunk ``[P, width]`` (``_G_BUDGET``;
  never ``P x M``).
* ``_mm_kernel`` -- a plain tensor-core GEMM with fp32 accumulation used for both gradient products of
  each chunk: ``dS += G T_chunk`` (accumulated in the kernel over the chunks, in chunk order) and
  ``dT_chunk = G^T S'`` (``S' = S * w / max|w|``; split-K over P into fp32 partials added in a fixed
  order when the output tiles alone would not fill whole waves).

P and M are padded to whole tiles inside the backward (zero rows of G, S' and T) and D to whole chunks
(zero columns, :func:`_prep`), so no load masks K or D; logit-tile rows and prototypes past the end are
clamped to the last valid one and masked out afterwards.

Executed products (GEMM-sized, 2 P M D FLOPs each): forward 2; backward 2 recomputed + 1 per gradient
(``kl_flops``). Every output element is written by one program and every sum runs in a fixed order: no
atomics, bitwise repeatable on one device. Offsets are 64-bit (``P * D`` and ``P * width`` may exceed
2^31). The hybrid backend (:mod:`.kl_hybrid`) shares the forward and the G kernel and runs the two
gradient products with cuBLAS instead of ``_mm_kernel``.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on CPU tensors
(numpy): that is how CI checks their numerics, with tiny tiles. The interpreter's ``tl.dot`` on bf16
was found wrong once, so there every dot operand is upcast to fp32 (``DOT_F32``) after the same
16-bit rounding of G. ``tests/test_kl_triton_compile.py`` compiles every launch of the real shapes for
sm_90a with the launcher's own specialisation (alignment and divisibility hints), through
:func:`record_launches`.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch

__all__ = ["patch_sentence_kl_triton", "triton_status", "INTERPRETED", "forward_stats", "chunked_grads",
           "record_launches", "mm_triton"]

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

# Bytes of the G column chunk: 256 MiB on a GPU (P = 37,632 bf16 -> 3,328-column chunks, 10 chunks at
# M = 32,768); 4 KiB in the interpreter so the tests' tiny cases run several chunks.
_G_BUDGET = {"gpu": 256 * 2**20, "cpu": 4096}
# SMs of the device the launch is planned for when it is not a CUDA device ("meta": the compile test
# plans the launches of an H100/H200; "cpu": the interpreter, small so that the tests split).
_PLANNED_SMS = {"meta": 132, "cpu": 4}


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
    def _logit_tiles(te_ptr, st_ptr, t_ptr, rp, rm, P, M, D, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
        """Raw teacher and student logit tiles ``[BLOCK_P, BLOCK_M]`` (fp32): one pass over D (a multiple
        of BLOCK_D: the launcher pads), both dots share the prototype chunk. Rows >= P and prototypes >= M
        are clamped to the last valid one (finite values the callers mask out): no load needs a mask."""
        acc_a = tl.zeros((BLOCK_P, BLOCK_M), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_P, BLOCK_M), dtype=tl.float32)
        rd = tl.arange(0, BLOCK_D)[None, :]
        row = tl.minimum(rp, P - 1).to(tl.int64)[:, None] * D     # int64: P * D may exceed 2^31
        col = tl.minimum(rm, M - 1).to(tl.int64)[:, None] * D
        for d0 in range(0, D, BLOCK_D):
            te = tl.load(te_ptr + row + d0 + rd)
            st = tl.load(st_ptr + row + d0 + rd)
            tt = tl.load(t_ptr + col + d0 + rd)
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
                    BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr,
                    DOT_F32: tl.constexpr, IEEE: tl.constexpr):
        """Online statistics of rows ``program_id(0)`` over the prototypes of split ``program_id(1)``:
        ``[m_a, s_a, u, m_b, s_b]`` per row into ``stats[split, row]`` (base 2)."""
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
            a, b = _logit_tiles(te_ptr, st_ptr, t_ptr, rp, rm, P, M, D, BLOCK_P, BLOCK_M, BLOCK_D, DOT_F32, IEEE)
            a = a * alpha_t
            b = b * alpha_s
            if not EVEN_M:    # (M % BLOCK_M == 0 and whole-tile splits: no masks at all)
                # Columns past the split get -1e30: exp2 of it is exactly 0, and a - b there is exactly
                # 0 (no inf - inf); every tile has a valid column, so the maxima stay finite.
                cut = tl.where(rm < m_end, 0.0, -1.0e30)[None, :]
                a = a + cut
                b = b + cut
            # Student first, then a - b in b's registers: two logit tiles live at a time, not three.
            nb = tl.maximum(m_b, tl.max(b, 1))
            s_b = s_b * tl.exp2(m_b - nb) + tl.sum(tl.exp2(b - nb[:, None]), 1)
            m_b = nb
            diff = a - b
            na = tl.maximum(m_a, tl.max(a, 1))
            ea = tl.exp2(a - na[:, None])
            ca = tl.exp2(m_a - na)
            s_a = s_a * ca + tl.sum(ea, 1)
            u = u * ca + tl.sum(ea * diff, 1)
            m_a = na
        base = stats_ptr + (pid_s.to(tl.int64) * P + rp) * 5
        ok = rp < P
        tl.store(base + 0, m_a, mask=ok)
        tl.store(base + 1, s_a, mask=ok)
        tl.store(base + 2, u, mask=ok)
        tl.store(base + 3, m_b, mask=ok)
        tl.store(base + 4, s_b, mask=ok)

    @triton.jit
    def _g_kernel(te_ptr, st_ptr, t_ptr, lse_a_ptr, lse_b_ptr, out_ptr, P, M, D, m_off, width, alpha_t, alpha_s,
                  BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
                  IEEE: tl.constexpr):
        """``G = p - q`` of rows ``program_id(0)`` and chunk columns ``program_id(1)`` (prototypes
        ``m_off + c``) into ``out [rows, width]`` (both multiples of the tile: the grid covers it exactly,
        rows >= P and prototypes >= M are written as zeros, so the gradient GEMMs need no K masks)."""
        rp = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        rc = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rm = m_off + rc
        a, b = _logit_tiles(te_ptr, st_ptr, t_ptr, rp, rm, P, M, D, BLOCK_P, BLOCK_M, BLOCK_D, DOT_F32, IEEE)
        rc_p = tl.minimum(rp, P - 1)                 # the clamped row's own LSEs: finite, masked below
        la = tl.load(lse_a_ptr + rc_p)
        lb = tl.load(lse_b_ptr + rc_p)
        g = tl.exp2(b * alpha_s - lb[:, None]) - tl.exp2(a * alpha_t - la[:, None])
        g = tl.where((rp < P)[:, None] & (rm < M)[None, :], g, 0.0)
        tl.store(out_ptr + rp.to(tl.int64)[:, None] * width + rc[None, :], g.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _mm_operands(a_ptr, b_ptr, a_row, b_col, ncol, k, s_ak, s_bk, EVEN_N: tl.constexpr, DOT_F32: tl.constexpr):
        k = k.to(tl.int64)
        a = tl.load(a_ptr + a_row + k[None, :] * s_ak)
        if EVEN_N:
            b = tl.load(b_ptr + k[:, None] * s_bk + b_col)
        else:
            b = tl.load(b_ptr + k[:, None] * s_bk + b_col, mask=ncol, other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return a, b

    @triton.jit
    def _mm_kernel(a_ptr, b_ptr, c_ptr, MO, N, K, s_am, s_ak, s_bk, s_bn, k_per_split,
                   ACC: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_MO: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
        """``c[split] (+)= a[:, Ks] @ b[Ks, :]`` in fp32 for the K range ``Ks`` of split ``program_id(1)``
        (``c`` row-major ``[splits, MO, N]``; ``ACC``: add the values already in ``c``). MO and every K
        range are whole tiles (the launcher pads with zeros); only N may end inside a tile. Strides are
        arguments so that ``a`` may be a transposed view; the launcher's specialisation turns a unit
        stride into a constant and the others into multiples of 16 where they are. The first K tile is
        peeled so the accumulator never starts as a zero-filled register tile (with that, Triton 3.6's
        PTX makes ptxas serialise the wgmma chain: warning C7515)."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        n_n = tl.cdiv(N, BLOCK_N)
        rm = (pid // n_n) * BLOCK_MO + tl.arange(0, BLOCK_MO)    # consecutive programs share an A slab
        rn = (pid % n_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        k_start = split * k_per_split
        k_end = tl.minimum(K, k_start + k_per_split)
        a_row = rm.to(tl.int64)[:, None] * s_am
        b_col = rn.to(tl.int64)[None, :] * s_bn
        ncol = (rn < N)[None, :]
        a, b = _mm_operands(a_ptr, b_ptr, a_row, b_col, ncol, k_start + rk, s_ak, s_bk, EVEN_N, DOT_F32)
        if IEEE:
            acc = tl.dot(a, b, input_precision="ieee")
        else:
            acc = tl.dot(a, b)
        for k0 in range(k_start + BLOCK_K, k_end, BLOCK_K):
            a, b = _mm_operands(a_ptr, b_ptr, a_row, b_col, ncol, k0 + rk, s_ak, s_bk, EVEN_N, DOT_F32)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        c = c_ptr + split.to(tl.int64) * MO * N + rm.to(tl.int64)[:, None] * N + rn[None, :]
        if EVEN_N:
            if ACC:
                acc += tl.load(c)
            tl.store(c, acc)
        else:
            if ACC:
                acc += tl.load(c, mask=ncol, other=0.0)
            tl.store(c, acc, mask=ncol)


# --------------------------------------------------------------------------------------- launch plan
_RECORDING: list | None = None


@contextlib.contextmanager
def record_launches():
    """Record ``(kernel, grid, args, kwargs)`` of every launch instead of running it (the compile test
    runs the real launchers on ``meta`` tensors of the real shapes and compiles what they would launch,
    with Triton's own argument specialisation). PyTorch ops on ``meta`` tensors run as usual."""
    global _RECORDING
    prev, _RECORDING = _RECORDING, []
    try:
        yield _RECORDING
    finally:
        _RECORDING = prev


def _launch(kernel, grid, *args, **kwargs):
    if _RECORDING is not None:
        _RECORDING.append((kernel, tuple(grid), args, kwargs))
        return
    kernel[tuple(grid)](*args, **kwargs)


def _on_gpu(device: torch.device) -> bool:
    """Plan GPU tiles: CUDA tensors, or ``meta`` tensors (the compile test plans a GPU launch)."""
    return device.type in ("cuda", "meta")


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _PLANNED_SMS.get(device.type, 4)


def _config(device: torch.device, dtype: torch.dtype, D: int) -> dict:
    """Tile sizes. GPU, 16-bit inputs: forward and G kernel 128 rows x 128 prototypes x 32-wide D chunks
    at 8 warps (one 64-row slab per warpgroup), 4 pipeline stages of (128 + 128 + 128) x 32 x 2 B = 24 KiB;
    gradient GEMMs 128 x 128 x 64, 8 warps, 4 stages of 32 KiB. fp32 inputs (exact ``ieee`` products on
    the CUDA cores, not the training path): 64 x 64 x 16 tiles, 8 warps (GEMMs 64 x 64 x 32, 4 warps).
    ``pad``: P and M are padded to multiples of it inside the backward, D to multiples of ``BLOCK_D``
    everywhere (zeros).
    Chosen so that ptxas (sm_90a) reports no spills and no serialised wgmma at the real specialisation --
    tests/test_kl_triton_compile.py checks it without a GPU -- NOT tuned for speed (no GPU has run them).
    The interpreter uses the smallest tiles ``tl.dot`` accepts (16), 64-wide in D from D = 256 on (its
    cost is per program and op, so the tests' D = 768 / 1024 cases stay cheap)."""
    if not _on_gpu(device):
        wide = 64 if D >= 256 else 16
        t = dict(BLOCK_P=16, BLOCK_M=16, BLOCK_D=wide, num_warps=1, num_stages=1)
        return dict(fwd=t, g=t, mm=dict(BLOCK_MO=16, BLOCK_N=wide, BLOCK_K=16, num_warps=1, num_stages=1), pad=16)
    if dtype == torch.float32:
        t = dict(BLOCK_P=64, BLOCK_M=64, BLOCK_D=16, num_warps=8, num_stages=2)
        return dict(fwd=t, g=t, mm=dict(BLOCK_MO=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2), pad=64)
    t = dict(BLOCK_P=128, BLOCK_M=128, BLOCK_D=32, num_warps=8, num_stages=4)
    return dict(fwd=t, g=t, mm=dict(BLOCK_MO=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4), pad=128)


def _flags(dtype: torch.dtype) -> dict:
    return dict(DOT_F32=INTERPRETED, IEEE=dtype == torch.float32)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


def wave_splits(units: int, tiles: int, slots: int, min_tiles: int = 1) -> int:
    """Splits of a reduction axis of ``tiles`` tiles so that ``units x splits`` programs fill whole waves
    of ``slots`` (SMs x programs per SM): the smallest split count whose last wave is >= 95 % full,
    else the fullest; every split keeps at least ``min_tiles`` tiles."""
    best, best_eff = 1, 0.0
    for s in range(1, max(1, tiles // max(1, min_tiles)) + 1):
        n = units * s
        eff = n / (_cdiv(n, slots) * slots)
        if eff >= 0.95:
            return s
        if eff > best_eff + 1e-9:
            best, best_eff = s, eff
    return best


def _split_range(tiles: int, tile: int, splits: int) -> tuple[int, int]:
    """(splits actually used, elements per split) with every split a non-empty whole number of tiles."""
    per = _cdiv(tiles, max(1, min(splits, tiles))) * tile
    return _cdiv(tiles * tile, per), per


def _pad(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``x`` zero-padded to ``[rows, cols]`` (``x`` itself when it already has that shape)."""
    if tuple(x.shape) == (rows, cols):
        return x
    out = x.new_zeros(rows, cols)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def _prep(student, teacher, prototypes):
    """Contiguous detached inputs in the student's dtype, D zero-padded to a multiple of ``BLOCK_D``
    (so that no kernel masks D; zero columns change no product)."""
    if student.dtype == torch.float64:
        raise TypeError("the triton backend takes fp32 / bf16 / fp16 inputs (use streaming for float64)")
    dt = student.dtype
    d = _round_up(student.shape[1], _config(student.device, dt, student.shape[1])["fwd"]["BLOCK_D"])
    st = _pad(student.detach().contiguous(), student.shape[0], d)
    te = _pad(teacher.detach().to(dt).contiguous(), teacher.shape[0], d)
    T = _pad(prototypes.detach().to(dt).contiguous(), prototypes.shape[0], d)
    return st, te, T


def forward_stats(st, te, T, student_temp, teacher_temp, splits: int | None = None):
    """Triton forward on :func:`_prep`'s tensors: ``(loss, lse2_a, lse2_b)`` fp32 ``[P]``. ``splits``:
    number of M splits (default: whole waves, :func:`wave_splits`)."""
    P, D = st.shape
    M = T.shape[0]
    cfg = _config(st.device, st.dtype, D)["fwd"]
    bp, bm = cfg["BLOCK_P"], cfg["BLOCK_M"]
    n_p, m_tiles = _cdiv(P, bp), _cdiv(M, bm)
    want = splits or wave_splits(n_p, m_tiles, _sm_count(st.device), min_tiles=4)
    splits, m_per_split = _split_range(m_tiles, bm, want)
    stats = torch.empty(splits, P, 5, dtype=torch.float32, device=st.device)
    _launch(_fwd_kernel, (n_p, splits), te, st, T, stats, P, M, D, _LOG2E / teacher_temp, _LOG2E / student_temp,
            m_per_split, BLOCK_P=bp, BLOCK_M=bm, BLOCK_D=cfg["BLOCK_D"], EVEN_M=M % bm == 0,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_flags(st.dtype))
    m_a, s_a, u, m_b, s_b = stats.unbind(-1)        # [splits, P] each
    ma = m_a.amax(0)
    wa = torch.exp2(m_a - ma)
    mb = m_b.amax(0)
    sa = (s_a * wa).sum(0)
    lse_a = ma + torch.log2(sa)
    lse_b = mb + torch.log2((s_b * torch.exp2(m_b - mb)).sum(0))
    loss = ((u * wa).sum(0) / sa - lse_a + lse_b) * _LN2
    return loss, lse_a, lse_b


def g_chunk(st, te, T, lse_a, lse_b, m0, out, student_temp, teacher_temp):
    """``out[:, c] = p - q`` of prototypes ``m0 + c`` (``out`` contiguous ``[rows, width]``, both multiples
    of the G tile; rows >= P and prototypes >= M become zeros)."""
    P, D = st.shape
    M = T.shape[0]
    rows, width = out.shape
    cfg = _config(st.device, st.dtype, D)["g"]
    bp, bm = cfg["BLOCK_P"], cfg["BLOCK_M"]
    assert rows % bp == 0 and width % bm == 0, (rows, width)
    _launch(_g_kernel, (rows // bp, width // bm), te, st, T, lse_a, lse_b, out, P, M, D, m0, width,
            _LOG2E / teacher_temp, _LOG2E / student_temp, BLOCK_P=bp, BLOCK_M=bm, BLOCK_D=cfg["BLOCK_D"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_flags(st.dtype))
    return out


def mm_triton(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b`` with fp32 accumulation (``_mm_kernel``); ``out`` contiguous fp32, the rows of
    ``a`` and K multiples of the GEMM tile. Split-K (fp32 partials added in a fixed order) when the
    output tiles alone would not fill whole waves."""
    MO, K = a.shape
    N = b.shape[1]
    cfg = _config(a.device, a.dtype, N)["mm"]
    bmo, bn, bk = cfg["BLOCK_MO"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    assert MO % bmo == 0 and K % bk == 0, (MO, K)
    tiles = MO // bmo * _cdiv(N, bn)
    splits, per = _split_range(K // bk, bk, wave_splits(tiles, K // bk, _sm_count(a.device), min_tiles=8))
    kw = dict(EVEN_N=N % bn == 0, BLOCK_MO=bmo, BLOCK_N=bn, BLOCK_K=bk, num_warps=cfg["num_warps"],
              num_stages=cfg["num_stages"], **_flags(a.dtype))
    args = (MO, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), per)
    if splits == 1:
        _launch(_mm_kernel, (tiles, 1), a, b, out, *args, ACC=accumulate, **kw)
        return
    part = torch.empty(splits, MO, N, dtype=torch.float32, device=a.device)
    _launch(_mm_kernel, (tiles, splits), a, b, part, *args, ACC=False, **kw)
    if accumulate:
        out.add_(part[0])
    else:
        out.copy_(part[0])
    for i in range(1, splits):                       # fixed order: bitwise repeatable
        out.add_(part[i])


def _chunk_width(device: torch.device, rows: int, M: int, elt: int, tile: int, block_m: int | None) -> int:
    """Columns per G chunk: a multiple of ``tile`` within ``_G_BUDGET``, balanced over the chunks."""
    m_pad = _round_up(M, tile)
    if block_m:
        return min(m_pad, _round_up(block_m, tile))
    cap = max(tile, _G_BUDGET["gpu" if _on_gpu(device) else "cpu"] // max(1, rows * elt) // tile * tile)
    return min(m_pad, _round_up(_cdiv(m_pad, _cdiv(m_pad, cap)), tile))


def chunked_grads(st, te, T, lse_a, lse_b, grad, need_s, need_t, student_temp, teacher_temp, mm=mm_triton,
                  block_m: int | None = None):
    """Backward from the saved base-2 LSEs (inputs as :func:`_prep` returns them). Per column chunk,
    ``G = p - q`` once (``_g_kernel``, 2 recomputed products over all chunks), then ``dS += G T_c`` and
    ``dT_c = G^T S'`` through ``mm(a, b, out, accumulate)`` (:func:`mm_triton`, or cuBLAS in the hybrid
    backend): 1 product per gradient. The upstream weight w = g / tau_s stays out of the 16-bit operands:
    dS rows are scaled in fp32 after the product, and dT uses ``S' = S * (w / max|w|)`` (exactly S for a
    uniform g) and ``max|w|`` in fp32. Inside, P and M are padded to whole tiles with zero rows of G, S'
    and T, so no GEMM masks K. Returns fp32 ``(dS [P, D] or None, dT [M, D] or None)``."""
    P, D = st.shape
    M = T.shape[0]
    cfg = _config(st.device, st.dtype, D)
    tile = cfg["pad"]
    p_pad, m_pad = _round_up(P, tile), _round_up(M, tile)
    w = grad.float() / student_temp
    g_dtype = st.dtype                       # bf16/fp16 tensor-core operands (fp32 stays fp32)
    width = _chunk_width(st.device, p_pad, M, st.element_size(), tile, block_m)
    buf = torch.empty(p_pad * width, dtype=g_dtype, device=st.device)
    d_s = torch.zeros(p_pad, D, dtype=torch.float32, device=st.device) if need_s else None
    d_t = torch.empty(m_pad, D, dtype=torch.float32, device=st.device) if need_t else None
    T_pad = _pad(T, m_pad, D) if need_s else None
    if need_t:
        w_max = w.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
        s_w = _pad((st.float() * (w / w_max)[:, None]).to(g_dtype), p_pad, D)
    for m0 in range(0, m_pad, width):
        m1 = min(m_pad, m0 + width)
        G = g_chunk(st, te, T, lse_a, lse_b, m0, buf[: p_pad * (m1 - m0)].view(p_pad, m1 - m0), student_temp,
                    teacher_temp)
        if need_s:
            mm(G, T_pad[m0:m1], d_s, True)
        if need_t:
            mm(G.T, s_w, d_t[m0:m1], False)
    if need_s:
        d_s = d_s[:P].mul_(w[:, None])
    if need_t:
        d_t = d_t[:M].mul_(w_max)
    return d_s, d_t


def _unpad(x: torch.Tensor | None, D: int, dtype: torch.dtype) -> torch.Tensor | None:
    if x is None:
        return None
    return (x if x.shape[1] == D else x[:, :D]).to(dtype).contiguous()


class _TritonKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, prototypes, student_temp, teacher_temp, splits, block_m):
        st, te, T = _prep(student, teacher, prototypes)
        loss, lse_a, lse_b = forward_stats(st, te, T, student_temp, teacher_temp, splits)
        ctx.save_for_backward(st, te, T, lse_a, lse_b)
        ctx.cfg = (student_temp, teacher_temp, block_m, student.dtype, prototypes.dtype, student.shape[1])
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        st, te, T, lse_a, lse_b = ctx.saved_tensors
        student_temp, teacher_temp, block_m, s_dtype, t_dtype, D = ctx.cfg
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        d_s, d_t = chunked_grads(st, te, T, lse_a, lse_b, grad, need_s, need_t, student_temp, teacher_temp,
                                 mm=mm_triton, block_m=block_m)
        return _unpad(d_s, D, s_dtype), None, _unpad(d_t, D, t_dtype), None, None, None, None


def patch_sentence_kl_triton(student, teacher, prototypes, *, student_temp: float, teacher_temp: float,
                             splits: int | None = None, block_m: int | None = None) -> torch.Tensor:
    """Triton backend (fp32 loss ``[P]``); ``splits`` forces the forward's number of M splits and
    ``block_m`` the backward's G chunk width (tests)."""
    ok, why = triton_status(student.device)
    if not ok:
        raise RuntimeError(f"backend='triton' unavailable: {why}")
    if student.shape[0] == 0:
        from .kl_streaming import patch_sentence_kl_streaming
        return patch_sentence_kl_streaming(student, teacher, prototypes, student_temp=student_temp,
                                           teacher_temp=teacher_temp)
    return _TritonKL.apply(student, teacher, prototypes, float(student_temp), float(teacher_temp), splits,
                           block_m)
