"""The Triton KL kernels compile for sm_90 (H100/H200) without a GPU, and ptxas reports no spills.

Triton lowers the kernels through its MLIR pipeline to PTX for ``GPUTarget("cuda", 90, 32)`` and its
bundled ptxas assembles them: this catches what the CPU interpreter cannot (``tl.dot`` layout and
dtype rules, shared-memory and register limits). bf16 at D = 512 with the tile sizes of
``kl_triton._config`` on CUDA. It says nothing about speed.
"""
from __future__ import annotations

import os
import subprocess
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.compiler import ASTSource  # noqa: E402

from rils_scale.ops import kl_triton  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
pytestmark = [pytest.mark.skipif(kl_triton.INTERPRETED, reason="TRITON_INTERPRET is set"),
              pytest.mark.skipif(not os.path.exists(PTXAS), reason="triton's ptxas not bundled")]


def _compile_and_spills(fn, sig, const, warps):
    from triton.backends.compiler import GPUTarget
    sig = dict(sig, **{k: "constexpr" for k in const})
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(c.asm["ptx"])
    try:
        r = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    assert r.returncode == 0, r.stderr[-2000:]
    return [ln.strip() for ln in (r.stdout + r.stderr).splitlines() if "spill" in ln]


def test_triton_kernels_compile_for_sm90_without_spills():
    cfg = kl_triton._config(torch.device("cuda"), 512)
    flags = dict(BLOCK_D=cfg["BLOCK_D"], DOT_F32=False, IEEE=False)
    b, f32 = "*bf16", "*fp32"
    ins = {"te_ptr": b, "st_ptr": b, "t_ptr": b}
    scal = {"P": "i32", "M": "i32", "D": "i32"}
    temps = {"alpha_t": "fp32", "alpha_s": "fp32"}
    lse = {"lse_a_ptr": f32, "lse_b_ptr": f32, "gs_ptr": f32}
    fwd = dict(flags, BLOCK_P=cfg["BLOCK_P"], BLOCK_M=cfg["BLOCK_M"])
    reports = {
        "fwd": _compile_and_spills(kl_triton._fwd_kernel, {**ins, "stats_ptr": f32, **scal, **temps, "m_per_split": "i32"},
                                   fwd, cfg["num_warps"]),
        "g": _compile_and_spills(kl_triton._g_kernel, {**ins, **lse, "out_ptr": b, **scal, "m_off": "i32", "width": "i32",
                                                       **temps}, fwd, cfg["num_warps"]),
    }
    for name, kern, out, (bp, bm) in (("ds", kl_triton._bwd_ds_kernel, "ds_ptr", cfg["ds"]),
                                      ("dt", kl_triton._bwd_dt_kernel, "dt_ptr", cfg["dt"])):
        split = "m_per_split" if name == "ds" else "p_per_split"
        reports[name] = _compile_and_spills(kern, {**ins, **lse, out: f32, **scal, **temps, split: "i32"},
                                            dict(flags, BLOCK_P=bp, BLOCK_M=bm, BLOCK_DO=cfg["BLOCK_DO"]),
                                            cfg["bwd_num_warps"])
    for name, lines in reports.items():
        assert lines and all(" 0 bytes spill stores" in ln for ln in lines), (name, lines)
