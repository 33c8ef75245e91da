#!/usr/bin/env python
"""Attention backends side by side at the RILS shapes: SDPA's kernels vs flash-attn vs math.

    # on a GPU (B/16: unmasked pass N = 197, masked pass N = 50, 12 heads of 64, bf16):
    python benchmarks/bench_attention.py --out runs/attention.json
    # CPU smoke test:
    python benchmarks/bench_attention.py --device cpu --batch 2 --seq 17 --heads 2 --repeat 2

Each backend runs forward + backward on the same q, k, v (bf16 on GPU), is checked against a
float64 softmax(QKᵀ/√d)V (output and the three gradients, relative Frobenius error) and timed
with CUDA events (median of ``--repeat``). FLOPs, FlashAttention's convention: forward
``4·B·H·N²·d`` (QKᵀ and PV), backward 2.5× forward (five N² products, recompute included).
Backends: ``math`` (the explicit path of rils_scale.models.attention), ``sdpa`` (PyTorch's own
choice), ``sdpa_flash``, ``sdpa_efficient``, ``sdpa_cudnn`` (one SDPA kernel forced) and
``flash_attn`` (the FlashAttention-2 package, when importable). A backend that cannot run
these inputs becomes an "unavailable" row with the reason. Exit status 1 if any available
backend is outside its tolerance (bf16: 2e-2), else 0.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rils_scale.models import attention as attn_mod  # noqa: E402

TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def _sdpa_with(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kind = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]

    def run(q, k, v, causal):
        with sdpa_kernel(kind):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def backend_fn(name: str):
    if name == "math":
        return lambda q, k, v, causal: attn_mod.attention(q, k, v, causal=causal, backend="math")
    if name == "sdpa":
        return lambda q, k, v, causal: attn_mod.attention(q, k, v, causal=causal, backend="sdpa")
    if name == "flash_attn":
        if not attn_mod.HAS_FLASH_ATTN:
            raise RuntimeError("flash_attn package not importable")
        return lambda q, k, v, causal: attn_mod.attention(q, k, v, causal=causal, backend="flash_attn")
    if name.startswith("sdpa_"):
        return _sdpa_with(name)
    raise ValueError(f"unknown backend {name!r}")


def attention_flops(b: int, h: int, n: int, d: int, causal: bool = False) -> dict:
    """FlashAttention's count: forward 2 N² products, backward 5 (recompute included)."""
    fwd = 4.0 * b * h * n * n * d * (0.5 if causal else 1.0)
    return {"forward": fwd, "backward": 2.5 * fwd, "total": 3.5 * fwd}


def reference(q, k, v, causal):
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    s = q64 @ k64.transpose(-2, -1) / q64.shape[-1] ** 0.5
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return s.softmax(-1) @ v64, (q64, k64, v64)


def _rel(a, b):
    a, b = a.detach().double(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_backend(name, q, k, v, grad_out, causal, ref_out, ref_grads, repeat, device):
    row = {"backend": name}
    try:
        fn = backend_fn(name)
        qs, ks, vs = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out = fn(qs, ks, vs, causal)
        out.backward(grad_out)
        errs = [_rel(out, ref_out)] + [_rel(t.grad, g) for t, g in zip((qs, ks, vs), ref_grads)]
        row.update(out_err=errs[0], grad_err=max(errs[1:]))

        def step():
            for t in (qs, ks, vs):
                t.grad = None
            fn(qs, ks, vs, causal).backward(grad_out)

        def fwd():
            with torch.no_grad():
                fn(qs, ks, vs, causal)

        row["fwd_ms"], row["fwd_bwd_ms"] = _time(fwd, repeat, device), _time(step, repeat, device)
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - an unusable backend is a row, not a crash
        row.update(status="unavailable", reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
    return row


def _time(fn, repeat, device):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def parse_args(argv=None):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--batch", type=int, default=256, help="B (B/16 micro-batch)")
    p.add_argument("--seq", default="197,50", help="comma-separated N (B/16: 197 unmasked, 50 masked)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--causal", action="store_true", help="the text tower's causal form")
    p.add_argument("--backends", default="math,sdpa,sdpa_flash,sdpa_efficient,sdpa_cudnn,flash_attn")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", default="", help="write JSON here (and a .md beside it)")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def markdown(rows) -> str:
    lines = ["| N | backend | status | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | out err | grad err |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] == "unavailable":
            lines.append(f"| {r['seq']} | {r['backend']} | unavailable: {r['reason']} | | | | | |")
            continue
        lines.append(f"| {r['seq']} | {r['backend']} | {r['status']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} "
                     f"| {r['tflops']:.1f} | {r['out_err']:.1e} | {r['grad_err']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    tol = TOLERANCE[dtype]
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"flash_attn package: {attn_mod.HAS_FLASH_ATTN}; {args.dtype}; tolerance {tol}", flush=True)
    rows = []
    for n in [int(s) for s in args.seq.split(",") if s]:
        g = torch.Generator(device="cpu").manual_seed(n)
        shape = (args.batch, args.heads, n, args.head_dim)
        q, k, v, grad_out = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(4))
        ref_out, ref_in = reference(q, k, v, args.causal)
        ref_out.backward(grad_out.double())
        ref_grads = [t.grad for t in ref_in]
        flops = attention_flops(args.batch, args.heads, n, args.head_dim, args.causal)
        for name in [b for b in args.backends.split(",") if b]:
            row = run_backend(name, q, k, v, grad_out, args.causal, ref_out.detach(), ref_grads, args.repeat, device)
            row.update(seq=n, batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype)
            if row["status"] == "ok":
                row["tflops"] = flops["total"] / (row["fwd_bwd_ms"] / 1e3) / 1e12
                if not (row["out_err"] <= tol and row["grad_err"] <= tol):
                    row["status"] = "WRONG"
            rows.append(row)
            print(markdown([row]).splitlines()[-1], flush=True)
        del q, k, v, grad_out, ref_out, ref_in, ref_grads
    table = markdown(rows)
    print("\n" + table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"device": args.device, "dtype": args.dtype, "tolerance": tol, "rows": rows}, f, indent=2)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(table + "\n")
    wrong = [r for r in rows if r["status"] == "WRONG"]
    ran = [r for r in rows if r["status"] == "ok"]
    if wrong:
        print(f"FAIL: {len(wrong)} backend(s) outside tolerance {tol}", file=sys.stderr)
    return 1 if wrong or not ran else 0


if __name__ == "__main__":
    sys.exit(main())
