"""The GEMM backends of patch_sentence_kl in their CPU-testable forms, against the float64 reference.

* ``triton`` / ``hybrid``: the Triton kernels under ``TRITON_INTERPRET=1``, in a child process (the
  variable must be set before triton is imported: its own library functions are decorated then). Tiny
  shapes: the interpreter runs every program in numpy (with 16-wide tiles, so tiny shapes still cover
  several row blocks, prototype tiles, M splits, G chunks, split-K and the padded edges). Two sets:
  the backends' own quick self-check, and :func:`_interpreter_cases` (D = 128 / 768 / 1024, peaked
  teacher logits, fp32 / bf16 / fp16, student-only, a uniform upstream gradient, bitwise repeatability
  of two runs).
* the low-precision streaming path (bf16 GEMMs with fp32 outputs on GPUs), forced on CPU.

Tolerances as in test_patch_sentence_kl.py, except bf16 gradients: G = p - q is rounded to bf16 before
the gradient products (tensor-core operands), 1e-2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

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
    odd sizes, several row blocks and G chunks, a peaked teacher, fp32 and bf16, loss and both gradients
    vs float64 (forced M splits and split-K: the interpreter cases below)."""
    pytest.importorskip("triton")
    from rils_scale.ops.kl_selfcheck import selfcheck_in_subprocess
    ok, reason = selfcheck_in_subprocess(backend, "cpu", timeout_s=600, quick=True,
                                         extra_env={"TRITON_INTERPRET": "1"})
    assert ok, reason


# (backend, P, M, D, dtype, scale, normalise, need_t, upstream, options): P and M odd (ragged tiles), the
# forced M splits / G chunk widths run several of each. "peaked": unnormalised inputs x 4 (KLs of
# hundreds); "uniform": the same upstream gradient 1e-3 on every row, as training sends it (the backward
# then uses the student rows unscaled as the dPrototypes operand).
INTERPRETER_CASES = [
    ("triton", 19, 37, 128, "bfloat16", 1.0, True, True, "random", dict(splits=3, block_m=16)),
    ("triton", 19, 37, 128, "float16", 4.0, False, True, "random", {}),
    ("triton", 19, 37, 128, "float32", 1.0, True, True, "random", dict(block_m=32)),
    ("triton", 9, 20, 768, "bfloat16", 1.0, True, True, "random", {}),
    ("triton", 5, 17, 1024, "float16", 1.0, True, False, "random", {}),
    ("triton", 19, 37, 128, "float16", 1.0, True, True, "uniform", {}),
    ("triton", 260, 20, 16, "bfloat16", 1.0, True, True, "random", {}),      # 17 row blocks; split-K of dT
    ("hybrid", 19, 37, 128, "bfloat16", 4.0, False, True, "random", dict(block_m=16)),
]
INTERPRETER_TOL = {"float32": (1e-5, 1e-5), "bfloat16": (1e-5, 1e-2), "float16": (1e-5, 2e-3)}  # (loss, grads)


def _interpreter_cases() -> list[dict]:
    """Run INTERPRETER_CASES (each twice, for bitwise repeatability) in THIS process, which must have
    TRITON_INTERPRET=1 set before triton was imported; returns the relative errors vs float64."""
    from rils_scale.ops.kl_hybrid import patch_sentence_kl_hybrid
    from rils_scale.ops.kl_triton import INTERPRETED, patch_sentence_kl_triton, record_launches
    assert INTERPRETED
    fns = {"triton": patch_sentence_kl_triton, "hybrid": patch_sentence_kl_hybrid}
    out = []
    for backend, P, M, D, dt, scale, normalise, need_t, upstream, opts in INTERPRETER_CASES:
        dtype = getattr(torch, dt)
        s, t, T = _inputs(P, M, D, dtype, scale, normalise, seed=P * M + D)
        if upstream == "uniform":
            w = torch.full((P,), 1e-3, dtype=torch.float64)
        else:
            w = torch.rand(P, dtype=torch.float64, generator=torch.Generator().manual_seed(D))
        fn = (lambda f, o: lambda *a, **k: f(*a, **o, **k))(fns[backend], opts)
        runs = [_run(fn, s, t, T, w, need_t) for _ in range(2)]
        ref = _run(patch_sentence_kl_reference, s.double(), t.double(), T.double(), w, need_t)
        errs = [None if y is None else ((x - y).abs().max() / y.abs().max()).item() for x, y in zip(runs[0], ref)]
        same = all((x is None and y is None) or torch.equal(x, y) for x, y in zip(*runs))
        with record_launches() as launches:        # what the run above launched (recorded, not run)
            _run(fn, s, t, T, w, need_t)
        grids = {}
        for kernel, grid, _, _ in launches:
            grids.setdefault(kernel.fn.__name__, []).append(grid)
        plan = dict(fwd_splits=max(g[1] for g in grids["_fwd_kernel"]), g_chunks=len(grids["_g_kernel"]),
                    mm_splits=max((g[1] for g in grids.get("_mm_kernel", [])), default=0))
        out.append(dict(case=[backend, P, M, D, dt, scale, upstream, opts], dtype=dt, errors=errs, bitwise=same,
                        plan=plan))
    return out


def test_triton_interpreter_cases_match_float64_and_repeat_bitwise():
    """INTERPRETER_CASES in one child process with TRITON_INTERPRET=1: loss and both gradients within the
    per-dtype tolerance of the float64 reference (16-bit: G is rounded to 16 bits before the gradient
    products), and two runs bitwise equal."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import json, sys; sys.path.insert(0, 'tests'); import test_kl_gpu_backends as t; "
            "print('RESULT ' + json.dumps(t._interpreter_cases()))")
    path = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(path))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULT "):])
    assert len(results) == len(INTERPRETER_CASES)
    for res in results:
        tol_l, tol_g = INTERPRETER_TOL[res["dtype"]]
        for name, err, tol in zip(("loss", "d_student", "d_prototypes"), res["errors"], (tol_l, tol_g, tol_g)):
            assert err is None or err <= tol, f"{res['case']}: {name} rel. error {err:.2e} > {tol:.0e}"
        assert res["bitwise"], f"{res['case']}: two runs differ"
    plans = [r["plan"] for r in results]              # the cases reach every combine / loop of the plan
    assert max(p["fwd_splits"] for p in plans) > 1 and max(p["g_chunks"] for p in plans) > 1, plans
    assert max(p["mm_splits"] for p in plans) > 1, plans


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
