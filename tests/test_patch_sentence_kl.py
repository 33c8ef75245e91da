"""rils_scale.ops.patch_sentence_kl: every available backend against the float64 naive reference.

Tolerances are relative to the largest magnitude of the reference quantity (loss or gradient):
float64 1e-10 (pure rounding), float32 1e-4 (fp32 GEMMs over D terms + exp2), bf16/fp16 5e-3
(compared with float64 on the SAME rounded inputs, so only the kernel's own arithmetic counts).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from rils_scale.ops import patch_sentence_kl, patch_sentence_kl_reference
from rils_scale.ops.patch_sentence_kl import patch_sentence_kl_streaming

TAU_S, TAU_T = 0.1, 0.04
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-3, torch.float16: 5e-3}
HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.cuda


def _inputs(P, M, D, dtype, device="cpu", scale=1.0, seed=0, normalise=True):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, D, generator=g, dtype=torch.float64) for n in (P, P, M)]
    if normalise:
        xs = [F.normalize(x, dim=-1) for x in xs]
    return [(x * scale).to(device=device, dtype=dtype) for x in xs]


def _fwd_bwd(fn, s, t, T, w, need_s=True, need_T=True, **kw):
    """Loss and gradients of ``sum(w * loss)`` as float64 (gradients None where not requested)."""
    s = s.detach().clone().requires_grad_(need_s)
    T = T.detach().clone().requires_grad_(need_T)
    t = t.detach().clone()
    loss = fn(s, t, T, student_temp=kw.pop("student_temp", TAU_S), teacher_temp=kw.pop("teacher_temp", TAU_T), **kw)
    if need_s or need_T:
        (loss.to(w.dtype) * w).sum().backward()
    grad = lambda x: None if x.grad is None else x.grad.double().cpu()  # noqa: E731
    return loss.double().cpu(), grad(s), grad(T), loss, s, T


def _oracle(s, t, T, w, **kw):
    """float64 reference on exactly the same (possibly rounded) input values."""
    return _fwd_bwd(patch_sentence_kl_reference, s.double().cpu(), t.double().cpu(), T.double().cpu(),
                    w.double().cpu(), **kw)


def _rel(x, y):
    return ((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item()


def _assert_close(got, ref, tol, what):
    assert got.shape == ref.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = _rel(got, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def _backends(device):
    out = [("streaming", lambda *a, **k: patch_sentence_kl(*a, backend="streaming", **k)),
           ("streaming-small-tiles", lambda *a, **k: patch_sentence_kl_streaming(*a, block_p=7, block_m=13, **k)),
           ("auto", lambda *a, **k: patch_sentence_kl(*a, backend="auto", **k))]
    if device == "cuda":
        out += [(b, (lambda b: lambda *a, **k: patch_sentence_kl(*a, backend=b, **k))(b))
                for b in ("cuda", "triton", "hybrid", "streaming_chunked")]
    return out


SHAPES = [(37, 53, 16), (1, 1, 8), (64, 1, 8), (130, 300, 24), (5, 1031, 40)]


@pytest.mark.parametrize("P,M,D", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_cpu_backends_match_reference(P, M, D, dtype):
    s, t, T = _inputs(P, M, D, dtype, seed=P * 1000 + M)
    w = torch.rand(P, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = _oracle(s, t, T, w)
    for name, fn in _backends("cpu"):
        loss, ds, dT, raw, s_, T_ = _fwd_bwd(fn, s, t, T, w.to(torch.float64 if dtype == torch.float64 else torch.float32))
        assert raw.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
        assert s_.grad.dtype == dtype and T_.grad.dtype == dtype, name
        tol = TOL[dtype]
        if M == 1:  # both softmaxes are 1: loss and gradients vanish (relative error is meaningless)
            assert loss.abs().max() < 1e-5 and ds.abs().max() < 1e-5 and dT.abs().max() < 1e-5, name
            continue
        _assert_close(loss, ref[0], tol, f"{name} {dtype} loss")
        _assert_close(ds, ref[1], tol, f"{name} {dtype} d_student")
        _assert_close(dT, ref[2], tol, f"{name} {dtype} d_prototypes")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_magnitude_logits(dtype):
    """Unnormalised inputs scaled up: logits of several hundred, far outside exp's range."""
    s, t, T = _inputs(29, 211, 12, dtype, scale=8.0, normalise=False, seed=3)
    w = torch.rand(29, dtype=torch.float64)
    ref = _oracle(s, t, T, w)
    assert ref[0].abs().max() > 100  # really large KLs, i.e. really peaked distributions
    tol = {torch.float64: 1e-9, torch.float32: 1e-3}[dtype]  # fp32 logits ~1e3 carry ~1e-4 absolute error
    for name, fn in _backends("cpu"):
        loss, ds, dT, *_ = _fwd_bwd(fn, s, t, T, w.to(torch.float64 if dtype == torch.float64 else torch.float32))
        _assert_close(loss, ref[0], tol, f"{name} loss")
        _assert_close(ds, ref[1], tol, f"{name} d_student")
        _assert_close(dT, ref[2], tol, f"{name} d_prototypes")


def test_gradcheck_streaming_float64():
    """Finite differences of the op itself. The stop-gradient on the teacher logits is not a property
    of the function (perturbing T also moves the teacher logits), so the prototype gradient is
    checked with a zero teacher (uniform q, independent of T); with a real teacher it is checked
    against the closed form in test_prototype_gradient_only_through_student_logits."""
    s, t, T = _inputs(6, 11, 5, torch.float64, seed=7)
    s.requires_grad_()
    T.requires_grad_()
    kw = dict(student_temp=TAU_S, teacher_temp=TAU_T, block_p=4, block_m=3)
    assert torch.autograd.gradcheck(lambda s_: patch_sentence_kl_streaming(s_, t, T.detach(), **kw), (s,),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)
    t0 = torch.zeros_like(t)
    assert torch.autograd.gradcheck(lambda s_, T_: patch_sentence_kl_streaming(s_, t0, T_, **kw), (s, T),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", ["streaming", "reference"])
def test_teacher_gets_no_gradient(backend):
    s, t, T = _inputs(9, 17, 8, torch.float32, seed=2)
    s.requires_grad_()
    t.requires_grad_()
    T.requires_grad_()
    patch_sentence_kl(s, t, T, student_temp=TAU_S, teacher_temp=TAU_T, backend=backend).sum().backward()
    assert t.grad is None
    assert s.grad is not None and T.grad is not None


def test_prototype_gradient_only_through_student_logits():
    """dT = (1/tau_s) sum_i g_i (p_ij - q_ij) s_i: the teacher logits are a stop-gradient target."""
    s, t, T = _inputs(13, 19, 6, torch.float64, seed=5)
    w = torch.rand(13, dtype=torch.float64)
    _, _, dT, *_ = _fwd_bwd(lambda *a, **k: patch_sentence_kl(*a, backend="streaming", **k), s, t, T, w)
    q = torch.softmax(t @ T.T / TAU_T, -1)
    p = torch.softmax(s @ T.T / TAU_S, -1)
    expected = ((p - q) * w[:, None]).T @ s / TAU_S
    _assert_close(dT, expected, 1e-10, "d_prototypes closed form")


@pytest.mark.parametrize("need_s,need_T", [(True, False), (False, True), (False, False)])
def test_partial_requires_grad(need_s, need_T):
    s, t, T = _inputs(21, 33, 8, torch.float32, seed=9)
    w = torch.rand(21, dtype=torch.float32)
    ref = _oracle(s, t, T, w.double(), need_s=need_s, need_T=need_T)
    got = _fwd_bwd(lambda *a, **k: patch_sentence_kl(*a, backend="streaming", **k), s, t, T, w,
                   need_s=need_s, need_T=need_T)
    _assert_close(got[0], ref[0], 1e-4, "loss")
    for i, need in ((1, need_s), (2, need_T)):
        assert (got[i] is None) == (not need)
        if need:
            _assert_close(got[i], ref[i], 1e-4, "grad")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scale,normalise", [(1.0, True), (8.0, False)])
def test_student_only_gradient_path(dtype, scale, normalise):
    """Prototypes not requiring grad (the paper's default) takes the forward-accumulated dStudent path."""
    s, t, T = _inputs(45, 77, 12, dtype, scale=scale, normalise=normalise, seed=13)
    w = torch.rand(45, dtype=torch.float64)
    ref = _oracle(s, t, T, w, need_T=False)
    tol = 1e-9 if dtype == torch.float64 else TOL[dtype]
    for blocks in (dict(block_p=8, block_m=10), {}):
        fn = lambda *a, **k: patch_sentence_kl_streaming(*a, **blocks, **k)  # noqa: E731
        got = _fwd_bwd(fn, s, t, T, w.to(torch.float64 if dtype == torch.float64 else torch.float32), need_T=False)
        _assert_close(got[0], ref[0], tol, "loss")
        _assert_close(got[1], ref[1], tol, "d_student")
        assert got[2] is None


def test_no_warning_on_cpu_auto_and_errors():
    s, t, T = _inputs(4, 5, 3, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_sentence_kl(s, t, T, student_temp=TAU_S, teacher_temp=TAU_T)
    with pytest.raises(ValueError):
        patch_sentence_kl(s, t, T, student_temp=TAU_S, teacher_temp=TAU_T, backend="nope")
    with pytest.raises(ValueError):
        patch_sentence_kl(s, t[:3], T, student_temp=TAU_S, teacher_temp=TAU_T)
    with pytest.raises(ValueError, match="CUDA"):
        patch_sentence_kl(s, t, T, student_temp=TAU_S, teacher_temp=TAU_T, backend="cuda")


def test_empty_rows():
    s, t, T = _inputs(0, 5, 3, torch.float32)
    s.requires_grad_()
    out = patch_sentence_kl(s, t, T, student_temp=TAU_S, teacher_temp=TAU_T, backend="streaming")
    assert out.shape == (0,)
    out.sum().backward()
    assert s.grad.shape == (0, 3)


# ------------------------------------------------------------------------------------------------
# CUDA (run on a GPU machine; skipped here)
# ------------------------------------------------------------------------------------------------
@cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("P,M,D", [(37, 53, 16), (64, 1, 8), (130, 300, 24), (5, 1031, 40), (301, 777, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_backends_match_reference(P, M, D, dtype):
    s, t, T = _inputs(P, M, D, dtype, device="cuda", seed=P + M)
    w = torch.rand(P, dtype=torch.float32, device="cuda")
    ref = _oracle(s, t, T, w)
    for name, fn in _backends("cuda"):
        loss, ds, dT, *_ = _fwd_bwd(fn, s, t, T, w)
        tol = TOL[dtype]
        if M == 1:
            assert loss.abs().max() < 1e-5 and ds.abs().max() < 1e-5 and dT.abs().max() < 1e-5, name
            continue
        _assert_close(loss, ref[0], tol, f"{name} {dtype} loss")
        # GEMM backends round G = p - q to the 16-bit input dtype before the gradient products
        gtol = 1e-2 if dtype in (torch.bfloat16, torch.float16) else tol
        _assert_close(ds, ref[1], gtol, f"{name} {dtype} d_student")
        _assert_close(dT, ref[2], gtol, f"{name} {dtype} d_prototypes")


@cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_selfcheck_passes_and_auto_uses_it():
    from rils_scale.ops.patch_sentence_kl import cuda_backend_status
    ok, reason = cuda_backend_status(torch.device("cuda"))
    assert ok, reason


@cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_auto_measures_every_candidate(tmp_path, monkeypatch):
    """On a GPU every CUDA candidate passes its subprocess self-check and is timed; auto keeps the fastest."""
    import json
    from rils_scale.ops import kl_select
    monkeypatch.setenv("RILS_KL_SELECTION_CACHE", str(tmp_path / "sel.json"))
    kl_select.clear()
    s, t, T = _inputs(1000, 4000, 256, torch.bfloat16, device="cuda")
    s.requires_grad_()
    patch_sentence_kl(s, t, T, student_temp=TAU_S, teacher_temp=TAU_T).sum().backward()
    (entry,) = json.loads((tmp_path / "sel.json").read_text()).values()
    assert entry["failed"] == {}, entry["failed"]
    assert set(entry["seconds"]) == set(kl_select.CUDA_CANDIDATES)
    assert entry["backend"] == min(entry["seconds"], key=entry["seconds"].get)
    kl_select.clear()


@cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton", "hybrid", "streaming"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_deterministic_bitwise(dtype, backend):
    s, t, T = _inputs(517, 2049, 64, dtype, device="cuda", seed=11)
    w = torch.rand(517, device="cuda")
    fn = lambda *a, **k: patch_sentence_kl(*a, backend=backend, deterministic=True, **k)  # noqa: E731
    runs = [_fwd_bwd(fn, s, t, T, w)[:3] for _ in range(3)]
    for r in runs[1:]:
        for x, y in zip(r, runs[0]):
            assert torch.equal(x, y)


@cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_teacher_gets_no_gradient():
    s, t, T = _inputs(33, 65, 32, torch.bfloat16, device="cuda")
    s.requires_grad_()
    t.requires_grad_()
    T.requires_grad_()
    patch_sentence_kl(s, t, T, student_temp=TAU_S, teacher_temp=TAU_T, backend="cuda").sum().backward()
    assert t.grad is None and s.grad is not None and T.grad is not None


# ------------------------------------------------------------------------------------------------
# streaming full-row path: forward-computed gradients, uniform-g fast path and its fallback
# ------------------------------------------------------------------------------------------------
import importlib  # noqa: E402

_psk = importlib.import_module("rils_scale.ops.kl_streaming")


def _full_row(block_p=None):
    return lambda *a, **k: patch_sentence_kl_streaming(*a, block_p=block_p, **k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_p", [None, 7])
def test_full_row_uniform_grad_fast_path(dtype, block_p, monkeypatch):
    """sum / mean / zero-weighted zero rows (TP padding): g is uniform on the non-zero student rows, so
    both gradients come from forward (no recomputation: _chunked_grads must not run)."""
    P, M, D = 40, 301, 24
    s, t, T = _inputs(P, M, D, dtype, seed=21)
    s[-3:] = 0  # padding rows, weight 0
    t[-3:] = 0
    wdt = torch.float64 if dtype == torch.float64 else torch.float32

    def boom(*a, **k):
        raise AssertionError("fast path not taken")

    monkeypatch.setattr(_psk, "_uniform_hint", [True])
    monkeypatch.setattr(_psk, "_chunked_grads", boom)
    for w in (torch.ones(P, dtype=torch.float64), torch.full((P,), 1.0 / P, dtype=torch.float64),
              torch.cat([torch.full((P - 3,), 0.37, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)])):
        ref = _oracle(s, t, T, w)
        got = _fwd_bwd(_full_row(block_p), s, t, T, w.to(wdt))
        tol = 1e-9 if dtype == torch.float64 else TOL[dtype]
        _assert_close(got[0], ref[0], tol, "loss")
        _assert_close(got[1], ref[1], tol, "d_student")
        _assert_close(got[2], ref[2], tol, "d_prototypes")
        assert got[4].grad.dtype == dtype and got[5].grad.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hint", [True, False])
def test_full_row_nonuniform_grad_falls_back(dtype, hint, monkeypatch):
    """Non-uniform g: dPrototypes is recomputed (whether or not forward speculated on a uniform g)."""
    s, t, T = _inputs(33, 130, 16, dtype, seed=23)
    w = torch.rand(33, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    w[5] = 0.0
    monkeypatch.setattr(_psk, "_uniform_hint", [hint])
    ref = _oracle(s, t, T, w)
    got = _fwd_bwd(_full_row(8), s, t, T, w.to(dtype))
    tol = 1e-9 if dtype == torch.float64 else TOL[dtype]
    for i, what in enumerate(("loss", "d_student", "d_prototypes")):
        _assert_close(got[i], ref[i], tol, what)
    assert _psk._uniform_hint[0] is False
    got = _fwd_bwd(_full_row(8), s, t, T, torch.ones(33, dtype=dtype))  # hint False, uniform g: recompute
    ref = _oracle(s, t, T, torch.ones(33, dtype=torch.float64))
    for i, what in enumerate(("loss", "d_student", "d_prototypes")):
        _assert_close(got[i], ref[i], tol, what)
    assert _psk._uniform_hint[0] is True


def test_full_row_gradcheck_and_retain_graph():
    s, t, T = _inputs(6, 11, 5, torch.float64, seed=7)
    s.requires_grad_()
    T.requires_grad_()
    kw = dict(student_temp=TAU_S, teacher_temp=TAU_T, block_p=4)
    # The first backward scales the forward's gradient buffers in place, a repeated backward (gradcheck's
    # reentrancy check) recomputes them: equal up to summation order, hence nondet_tol.
    assert torch.autograd.gradcheck(lambda s_: patch_sentence_kl_streaming(s_, t, T.detach(), **kw), (s,),
                                    eps=1e-6, atol=1e-7, rtol=1e-5, nondet_tol=1e-12)
    t0 = torch.zeros_like(t)
    assert torch.autograd.gradcheck(lambda s_, T_: patch_sentence_kl_streaming(s_, t0, T_, **kw), (s, T),
                                    eps=1e-6, atol=1e-7, rtol=1e-5, nondet_tol=1e-12)
    # a second backward through the same graph (the first one consumed the forward's buffers)
    loss = patch_sentence_kl_streaming(s, t, T, **kw).sum()
    g1 = torch.autograd.grad(loss, (s, T), retain_graph=True)
    g2 = torch.autograd.grad(loss, (s, T))
    for x, y in zip(g1, g2):
        _assert_close(x, y, 1e-12, "second backward")


def test_full_row_over_budget_uses_m_chunks(monkeypatch):
    """When one row of logits exceeds the budget the M-chunked online path runs (same results)."""
    monkeypatch.setattr(_psk, "_FULLROW_BUDGET", {"cpu": 64, "cuda": 64})
    assert _psk._full_row_rows(torch.device("cpu"), 10, 100, 4, None) == 0
    s, t, T = _inputs(19, 100, 8, torch.float32, seed=3)
    w = torch.rand(19, dtype=torch.float64)
    ref = _oracle(s, t, T, w)
    got = _fwd_bwd(_full_row(), s, t, T, w.float())
    for i, what in enumerate(("loss", "d_student", "d_prototypes")):
        _assert_close(got[i], ref[i], 1e-4, what)
