"""The GEMM backends of patch_sentence_kl in their CPU-testable forms, against the float64 reference.

* ``triton`` / ``hybrid``: the Triton kernels under ``TRITON_INTERPRET=1`` (the module is re-imported
  with the variable set, and restored after). Tiny shapes: the interpreter runs every program in numpy.
  Forced M splits (forward) and a forced column block (hybrid backward) cover the combine and the
  block loop; odd sizes cover the masks.
* the low-precision streaming path (bf16 GEMMs with fp32 outputs on GPUs), forced on CPU.

Tolerances as in test_patch_sentence_kl.py, except bf16 gradients: G = p - q is rounded to bf16 before
the gradient products (tensor-core operands), 1e-2.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rils_scale.ops import kl_streaming, patch_sentence_kl_reference

TAU_S, TAU_T = 0.1, 0.04
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-3, 1e-2)}    # (loss, gradients)


def _inputs(P, M, D, dtype, scale=1.0, normalise=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, D, generator=g, dtype=torch.float64) for n in (P, P, M)]
    if normalise:
        xs = [F.normalize(x, dim=-1) for x in xs]
    return [(x * scale).to(dtype) for x in xs]


def _run(fn, s, t, T, w, need_t=True, **kw):
    s = s.detach().clone().requires_grad_()
    T = T.detach().clone().requires_grad_(need_t)
    loss = fn(s, t, T, student_temp=TAU_S, teacher_temp=TAU_T, **kw)
    (loss.double() * w).sum().backward()
    return loss.double(), s.grad.double(), (T.grad.double() if need_t else None)


def _check(fn, P, M, D, dtype, need_t=True, scale=1.0, normalise=True, **kw):
    s, t, T = _inputs(P, M, D, dtype, scale, normalise, seed=P + M)
    w = torch.rand(P, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = _run(fn, s, t, T, w, need_t, **kw)
    ref = _run(patch_sentence_kl_reference, s.double(), t.double(), T.double(), w, need_t)
    tol_l, tol_g = TOL[dtype]
    for name, x, y, tol in zip(("loss", "d_student", "d_prototypes"), got, ref, (tol_l, tol_g, tol_g)):
        if y is None:
            assert x is None
            continue
        err = ((x - y).abs().max() / y.abs().max()).item()
        assert err <= tol, f"{name} {dtype}: rel. error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("backend", ["triton", "hybrid"])
def test_triton_kernels_interpreted_pass_selfcheck(backend):
    """The self-check command run as auto runs it (a subprocess), with TRITON_INTERPRET=1 set before
    triton is imported (its own library functions are decorated at import): the quick cases cover
    odd sizes, several M splits of the forward (4 on a CPU) and row blocks, several column blocks of
    the hybrid backward, a peaked teacher, fp32 and bf16, loss and both gradients vs float64."""
    pytest.importorskip("triton")
    from rils_scale.ops.kl_selfcheck import selfcheck_in_subprocess
    ok, reason = selfcheck_in_subprocess(backend, "cpu", timeout_s=600, quick=True,
                                         extra_env={"TRITON_INTERPRET": "1"})
    assert ok, reason


@pytest.mark.parametrize("need_t", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_streaming_path(monkeypatch, dtype, need_t):
    """The GPU streaming path (bf16 GEMMs, fp32 outputs, blocked M), forced on CPU with small blocks."""
    monkeypatch.setattr(kl_streaming, "FORCE_LP_GEMM", [True])
    monkeypatch.setattr(kl_streaming, "_lp_blocks", lambda device, P, M: (16, 32))
    calls = []
    real = kl_streaming._LowPrecisionKL.apply
    monkeypatch.setattr(kl_streaming._LowPrecisionKL, "apply", lambda *a: calls.append(1) or real(*a))
    fn = kl_streaming.patch_sentence_kl_streaming
    TOL[torch.float16] = TOL[torch.bfloat16]
    _check(fn, 37, 101, 24, dtype, need_t=need_t)
    _check(fn, 29, 70, 12, dtype, need_t=need_t, scale=3.0, normalise=False)
    assert calls, "low-precision path not taken"
