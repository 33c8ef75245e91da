"""Every Triton KL kernel, at the specialisation its real launch gets, lowers for sm_90a (H100/H200) to
``wgmma`` without spills -- checked without a GPU.

How: the real launchers (``forward_stats``, ``chunked_grads``) run on ``meta`` tensors of the real shapes
under :func:`kl_triton.record_launches`, which records each launch instead of running it. Each recorded
launch goes through Triton's OWN argument specialisation (``create_function_from_signature`` +
``JITFunction._pack_args``, what ``kernel[grid](...)`` does before compiling): 16-byte-aligned pointers
and integers divisible by 16 get ``tt.divisibility = 16``, integers equal to 1 become constants (unit
strides), and the launch options (``num_warps``, ``num_stages``) are the launcher's. (``meta`` tensors
report data pointers that are offsets from 0; CUDA allocations are 512-byte aligned, so the alignment
of every argument, views included, is the real one.) The kernel is then compiled with ``triton.compile``
for ``GPUTarget("cuda", 90, 32)`` and its PTX assembled by Triton's bundled ptxas for sm_90a.

Checked per kernel: every GEMM-sized ``tl.dot`` of a 16-bit kernel became ``ttng.warp_group_dot`` and
``wgmma.mma_async`` (no ``mma.sync`` fallback; fp32 inputs use exact ``ieee`` products on the CUDA cores
by design), no spill stores or loads, no wgmma serialisation warning from ptxas (C7510-C7520: a
serialised wgmma chain runs at a fraction of the rate), no atomics (determinism), loads pipelined with
``cp.async``, and for the logit kernels a 2-D MMA layout whose warps split only the rows
(``warpsPerCTA = [8, 1]``), so each row's reductions stay inside one warp. It says nothing about speed.

Triton here (3.8, ptxas 12.9) is not the GPU machine's (3.6.0, ptxas 12.8): the same checks were run by
hand with triton 3.6.0 from the package index on PYTHONPATH (docs/kernels.md section 2 gives both).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from rils_scale.ops import kl_triton  # noqa: E402
from rils_scale.ops.kl_flops import executed_products, gemm_flops  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
pytestmark = [pytest.mark.skipif(kl_triton.INTERPRETED, reason="TRITON_INTERPRET is set"),
              pytest.mark.skipif(not os.path.exists(PTXAS), reason="triton's ptxas not bundled")]

TARGET = GPUTarget("cuda", 90, 32)          # (backend, compute capability, warp size)
B16 = (37_632, 32_768, 512)                 # ViT-B/16: 256 images x 147 masked patches, 32k captions
# The real shapes (B/16 bf16; L/16 D = 768 and H/14 D = 1024 specialise like it, checked for fp16 too),
# a small odd one (ragged M tiles and D columns, M splits, split-K), and fp32 inputs.
PLANS = [(*B16, torch.bfloat16), (37_632, 32_768, 768, torch.bfloat16), (37_632, 32_768, 1024, torch.float16),
         (1_000, 300, 72, torch.bfloat16), (4_096, 4_096, 512, torch.float32)]


def _plan(P, M, D, dtype, need_s=True, need_t=True):
    """The launches of one forward + backward at ``P x M x D`` (meta tensors: nothing is allocated)."""
    dev = torch.device("meta")
    st, te, T = kl_triton._prep(*(torch.empty(n, D, dtype=dtype, device=dev) for n in (P, P, M)))
    with kl_triton.record_launches() as launches:
        _, lse_a, lse_b = kl_triton.forward_stats(st, te, T, 0.1, 0.04)
        if need_s or need_t:
            kl_triton.chunked_grads(st, te, T, lse_a, lse_b, torch.empty(P, device=dev), need_s, need_t, 0.1, 0.04)
    return launches


def _specialise(kernel, args, kwargs):
    """Triton's own specialisation of a launch: (signature, constexprs, attrs, options)."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    return signature, constexprs, attrs, options


_COMPILED: dict = {}


def _compile(kernel, args, kwargs) -> dict:
    signature, constexprs, attrs, options = _specialise(kernel, args, kwargs)
    key = (kernel.fn.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
           repr(sorted(attrs.items())), options.num_warps, options.num_stages)
    if key in _COMPILED:
        return _COMPILED[key]
    c = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(c.asm["ptx"])
    try:
        r = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    assert r.returncode == 0, r.stderr[-2000:]
    log = r.stdout + r.stderr
    ttgir, ptx = c.asm["ttgir"], c.asm["ptx"]
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    rep = dict(name=kernel.fn.__name__, dtype=signature["te_ptr" if "te_ptr" in signature else "a_ptr"],
               registers=int(re.search(r"Used (\d+) registers", log).group(1)), spill_bytes=sum(spills),
               spill_lines=len(spills), serialised=re.findall(r"\(C75\d\d\)[^\n]*", log),
               tt_dot=len(re.findall(r"= tt\.dot ", ttgir)), wgmma_ir=len(re.findall(r"ttng\.warp_group_dot ", ttgir)),
               wgmma_ptx=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
               atomics=len(re.findall(r"\b(?:atom|red)\.", ptx)), cp_async=ptx.count("cp.async"),
               mma_warps=re.findall(r"nvidia_mma<\{[^}]*warpsPerCTA = \[(\d+), (\d+)\]", ttgir),
               shared=c.metadata.shared)
    _COMPILED[key] = rep
    return rep


def test_launch_specialisation_carries_alignment_hints():
    """At the B/16 shape every pointer argument of every launch is 16-byte aligned and every size and
    non-unit stride divisible by 16, so the kernel compiled for the real launch is the vectorised one
    (today's kernels were compiled without these hints, i.e. a different kernel)."""
    for kernel, _grid, args, kwargs in _plan(*B16, torch.bfloat16):
        signature, constexprs, attrs, _ = _specialise(kernel, args, kwargs)
        names = list(signature)
        hinted = {names[k[0]] for k, v in attrs.items() if ["tt.divisibility", 16] in v}
        ptrs = {n for n, t in signature.items() if t.startswith("*")}
        ints = {n for n, t in signature.items() if t in ("i32", "i64")}
        assert ptrs <= hinted, (kernel.fn.__name__, ptrs - hinted)
        assert ints <= hinted, (kernel.fn.__name__, ints - hinted)
        if kernel.fn.__name__ == "_mm_kernel":      # the unit stride of each operand became a constant 1
            units = {names[k[0]] for k, v in constexprs.items() if v == 1 and names[k[0]].startswith("s_")}
            assert len(units) == 2, units


def test_every_kernel_lowers_to_wgmma_without_spills():
    reports = []
    for P, M, D, dtype in PLANS:
        for kernel, _grid, args, kwargs in _plan(P, M, D, dtype):
            rep = _compile(kernel, args, kwargs)
            if rep not in reports:
                reports.append(rep)
    print("\n".join(f"{r['name']:>12} {r['dtype']:>6}: {r['registers']} registers, {r['spill_bytes']} B spilled, "
                    f"{r['wgmma_ptx']} wgmma, {r['shared'] // 1024} KiB shared" for r in reports))
    assert {r["name"] for r in reports} == {"_fwd_kernel", "_g_kernel", "_mm_kernel"}
    for r in reports:
        assert r["spill_lines"] and r["spill_bytes"] == 0, r
        assert not r["serialised"], r
        assert r["atomics"] == 0, r
        assert r["cp_async"] > 0, r                    # software-pipelined loads
        assert r["registers"] <= 255 and r["shared"] <= 227 * 1024, r
        if r["dtype"] in ("*bf16", "*fp16"):
            assert r["tt_dot"] == 0 and r["wgmma_ir"] > 0 and r["wgmma_ptx"] > 0 and r["mma_sync"] == 0, r
            if r["name"] != "_mm_kernel":
                assert r["mma_warps"] and all(w == ("8", "1") for w in r["mma_warps"]), r
        else:                                          # fp32: exact products on the CUDA cores, by design
            assert r["wgmma_ptx"] == 0 and r["mma_sync"] == 0, r


def _launch_flops(kernel, grid, args, kwargs) -> int:
    """FLOPs of the GEMM-sized products one recorded launch executes (whole tiles, as the hardware does)."""
    name = kernel.fn.__name__
    if name == "_fwd_kernel":
        (M, D), per = args[5:7], args[9]
        return 2 * 2 * grid[0] * kwargs["BLOCK_P"] * min(M, grid[1] * per) * D
    if name == "_g_kernel":
        D = args[8]
        return 2 * 2 * grid[0] * kwargs["BLOCK_P"] * grid[1] * kwargs["BLOCK_M"] * D
    MO, N, K = args[3:6]
    return 2 * MO * N * K


@pytest.mark.parametrize("need_t", [True, False])
def test_plan_executes_two_recomputed_and_one_product_per_gradient(need_t):
    """The launches of forward + backward at B/16 execute exactly what kl_flops states for ``triton``:
    2 forward products, 2 recomputed (the G tiles, once) and 1 per gradient; and the forward's M split
    fills whole waves of 132 SMs."""
    launches = _plan(*B16, torch.bfloat16, need_t=need_t)
    flops = sum(_launch_flops(*x) for x in launches)
    assert flops == executed_products("triton", *B16, True, need_t) * gemm_flops(*B16)
    assert executed_products("triton", *B16, True, need_t) == 2 + 2 + 1 + int(need_t)
    (fwd_grid,) = [g for k, g, _, _ in launches if k.fn.__name__ == "_fwd_kernel"]
    programs = fwd_grid[0] * fwd_grid[1]
    assert programs / (-(-programs // 132) * 132) >= 0.95, fwd_grid
