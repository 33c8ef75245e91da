"""Time and peak memory of patch_sentence_kl (forward + backward): naive reference vs streaming (vs cuda).

Every (case, backend) runs in a fresh subprocess so that peak memory is attributable:
  * CPU: peak resident set size during the first forward+backward minus the RSS just before it
    (the kernel's high-water mark is reset through /proc/self/clear_refs; where that is not
    allowed, the ru_maxrss delta is used, and the table says so);
  * CUDA: torch.cuda.max_memory_allocated() minus the allocation before the call.
Time is the best of ``--repeat`` runs after that first one. Student and prototypes both require
grad (the heavier case) unless ``--student-only``; the upstream gradient is uniform, as the training
objective sends it (``--upstream random`` uses random per-row weights, a stress case).

Rates count EXECUTED FLOPs (rils_scale/ops/kl_flops.py): per backend the GEMM-sized products it
really runs, recomputation included (FlashAttention's convention), each 2*P*M*D; e.g. forward 2
logit products, a recomputing backward 2 more + the two gradient products (1 without prototype
gradients). The "model" rate counts the minimum (2 + 1 + 1) for comparison. On CUDA the script also
times a [P, D] x [D, M] ``torch.mm`` in the run's dtype on the same device and reports the executed
rate as % of it. All backends run side by side (each in its own subprocess).

Examples:
  python benchmarks/bench_patch_sentence_kl.py --device cpu --threads 2 --grid 8192,16384,256
  python benchmarks/bench_patch_sentence_kl.py --quick
  python benchmarks/bench_patch_sentence_kl.py --device cuda --dtype bfloat16   # default GPU grid
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_GRID = [(8192, 16384, 256)]
CPU_QUICK = [(1024, 2048, 128), (2048, 4096, 256)]
CUDA_GRID = [(8192, 16384, 256), (37632, 32768, 512)]
CUDA_QUICK = [(4096, 8192, 256)]


def _read_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args) -> dict:
    import torch
    import torch.nn.functional as F
    from rils_scale.ops import patch_sentence_kl

    torch.set_num_threads(args.threads)
    P, M, D = args.case
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=dev).manual_seed(0)
    s = F.normalize(torch.randn(P, D, device=dev, generator=g), dim=-1).to(dtype).requires_grad_()
    t = F.normalize(torch.randn(P, D, device=dev, generator=g), dim=-1).to(dtype)
    T = F.normalize(torch.randn(M, D, device=dev, generator=g), dim=-1).to(dtype).requires_grad_(not args.student_only)
    # Upstream gradient: what training sends (the objective sums the rows: uniform) or a random
    # per-row weight (a stress case: dPrototypes then cannot be formed in forward).
    w = torch.rand(P, device=dev, generator=g) if args.upstream == "random" else torch.ones(P, device=dev)

    def step():
        s.grad = None
        T.grad = None
        loss = patch_sentence_kl(s, t, T, student_temp=0.1, teacher_temp=0.04, backend=args.backend)
        (loss * w).sum().backward()
        return loss

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    # Warm up on a tiny problem (thread pools, BLAS buffers, CUDA context, JIT/self-check) so the
    # measured peak is the op's, while the big problem's first run still starts from a clean heap.
    ws, wT = s[:64].detach().clone().requires_grad_(), T[:128].detach().clone().requires_grad_(not args.student_only)
    patch_sentence_kl(ws, t[:64], wT, student_temp=0.1, teacher_temp=0.04, backend=args.backend).sum().backward()
    del ws, wT
    out = {}
    if dev.type == "cuda":
        sync()
        s.grad = T.grad = None
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            step()
        except torch.OutOfMemoryError:
            return {"oom": True}
        sync()
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        out["mem_method"] = "cuda.max_memory_allocated"
    else:
        import resource
        if _reset_hwm():
            base = _read_status("VmRSS")
            step()
            out["peak_bytes"] = _read_status("VmHWM") - base
            out["mem_method"] = "VmHWM-VmRSS"
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            step()
            out["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
            out["mem_method"] = "ru_maxrss delta"
    times = []
    for _ in range(args.repeat):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    out["time_s"] = min(times)
    from rils_scale.ops.kl_flops import executed_products, gemm_flops, model_products
    need_t = not args.student_only
    out["executed_products"] = executed_products(args.backend, P, M, D, True, need_t, device=dev.type,
                                                 dtype=args.dtype, uniform_g=args.upstream == "uniform")
    out["executed_tflops"] = out["executed_products"] * gemm_flops(P, M, D) / out["time_s"] / 1e12
    out["model_tflops"] = model_products(True, need_t) * gemm_flops(P, M, D) / out["time_s"] / 1e12
    if dev.type == "cuda":
        a = torch.randn(P, D, device=dev, dtype=dtype)
        b = torch.randn(D, M, device=dev, dtype=dtype)
        for _ in range(3):
            torch.mm(a, b)
        sync()
        n, t0 = 10, time.perf_counter()
        for _ in range(n):
            torch.mm(a, b)
        sync()
        mm_s = (time.perf_counter() - t0) / n
        out["mm_tflops"] = 2 * P * M * D / mm_s / 1e12
    return out


def run_case(case, backend, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", "--device", args.device, "--threads",
           str(args.threads), "--dtype", args.dtype, "--repeat", str(args.repeat), "--backends", backend,
           "--grid", ",".join(map(str, case)), "--upstream", args.upstream] + (
        ["--student-only"] if args.student_only else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    # the worker must import THIS tree's rils_scale whatever the caller's sys.path
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.case_timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.case_timeout_s} s"}
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _parse_grid(s):
    return [tuple(int(x) for x in c.split(",")) for c in s.split(";") if c.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    ap.add_argument("--grid", default=None, help="cases 'P,M,D;P,M,D' (default: a preset per device)")
    ap.add_argument("--quick", action="store_true", help="small preset grid")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (CUDA default) | float16")
    ap.add_argument("--backends", default=None,
                    help="comma list (default CPU: reference,streaming,streaming_chunked; CUDA: also triton,hybrid,cuda)")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs after the first (default 2 CPU, 10 CUDA)")
    ap.add_argument("--student-only", action="store_true",
                    help="prototypes do not require grad (the paper's default: no KL gradient to the text tower)")
    ap.add_argument("--upstream", choices=("uniform", "random"), default="uniform",
                    help="upstream gradient of the per-row KL: uniform (the training objective sums rows) or "
                         "random per-row weights (stress case)")
    ap.add_argument("--json", default=None, help="also write the results (one list of dicts) to this file")
    ap.add_argument("--case-timeout-s", type=float, default=None, help="time limit per (case, backend) subprocess")
    ap.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.repeat = args.repeat or (10 if args.device == "cuda" else 2)
    if args._worker:
        args.case = _parse_grid(args.grid)[0]
        args.backend = args.backends
        print(json.dumps(worker(args)))
        return 0
    grid = _parse_grid(args.grid) if args.grid else (
        (CUDA_QUICK if args.quick else CUDA_GRID) if args.device == "cuda" else (CPU_QUICK if args.quick else CPU_GRID))
    backends = args.backends.split(",") if args.backends else (
        ["reference", "streaming", "streaming_chunked", "hybrid", "triton", "cuda"] if args.device == "cuda"
        else ["reference", "streaming", "streaming_chunked"])
    print(f"# patch_sentence_kl fwd+bwd, device={args.device}, dtype={args.dtype}, threads={args.threads}, "
          f"grads: student{'' if args.student_only else ' + prototypes'}, upstream {args.upstream}, "
          f"best of {args.repeat}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    hdr = (f"{'P':>6} {'M':>6} {'D':>4}  {'backend':<17} {'time s':>8} {'peak MiB':>9} {'time/naive':>10} "
           f"{'mem/naive':>9} {'products':>8} {'exec TFLOP/s':>12} {'model TFLOP/s':>13}")
    if args.device == "cuda":
        hdr += f" {'mm TFLOP/s':>10} {'exec % of mm':>12}"
    print(hdr)
    mem_methods = set()
    results = []
    for case in grid:
        base = None
        for be in backends:
            r = run_case(case, be, args)
            P, M, D = case
            results.append(dict(r, P=P, M=M, D=D, backend=be, dtype=args.dtype, device=args.device,
                                student_only=args.student_only, upstream=args.upstream))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
            line = f"{P:>6} {M:>6} {D:>4}  {be:<17} "
            if "error" in r or r.get("oom"):
                print(line + ("OOM" if r.get("oom") else f"error: {r['error']}"))
                continue
            mem_methods.add(r["mem_method"])
            if be == "reference":
                base = r
            rt = f"{r['time_s'] / base['time_s']:.3f}" if base else "-"
            rm = f"{r['peak_bytes'] / base['peak_bytes']:.4f}" if base and base["peak_bytes"] > 0 else "-"
            line += (f"{r['time_s']:>8.3f} {r['peak_bytes'] / 2**20:>9.1f} {rt:>10} {rm:>9} "
                     f"{r['executed_products']:>8} {r['executed_tflops']:>12.4g} {r['model_tflops']:>13.4g}")
            if "mm_tflops" in r:
                line += f" {r['mm_tflops']:>10.1f} {100 * r['executed_tflops'] / r['mm_tflops']:>11.1f}%"
            print(line, flush=True)
    print(f"# peak memory: {', '.join(sorted(mem_methods))}; load average at the end: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
