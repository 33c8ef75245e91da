"""KL op on a GPU in one command: correctness of every backend vs float64, then speed and memory.

    python benchmarks/gpu_kl_check.py --out DIR --time-budget-s 300 [--device cuda] [--dry-run]

Parts, in order, each in its own subprocess (a kernel fault cannot take the script down) with a time
limit taken from what is left of ``--time-budget-s`` (a part that no longer fits is recorded as
skipped, never silently dropped):

Order (most informative first, so a short budget still yields the headline): self-checks of triton,
hybrid, cuda, streaming; the speed table; the large shapes of those four; streaming_chunked last.

1. ``selfcheck/<backend>``: ``python -m rils_scale.ops.kl_selfcheck``: odd shapes, D = 72 / 128 / 768, a multi-wave grid, a peaked teacher,
   fp32 / bf16 / fp16, loss and both gradients vs the float64 reference.
2. ``large/<backend>``: M = 70,000 (P = 1,000, D = 256) and P * D > 2^31 (P = 2,796,203, D = 768,
   M = 64: 64-bit indexing), bf16, loss + dStudent on the last rows and dPrototypes vs float64
   (closed form, chunked over rows); then bitwise repeatability with ``deterministic=True`` (3 runs).
3. ``speed``: ``bench_patch_sentence_kl.py`` at P = 37,632, M = 32,768, D = 512, bf16, student +
   prototype gradients: reference (naive), hybrid, triton, streaming, cuda (the fused extension),
   streaming_chunked (``DIR/gpu_kl_speed.json`` grows after each backend) -- time, peak memory, executed-FLOP rate and % of the bf16 matmul rate.

Results go to ``DIR/gpu_kl_check.json`` (rewritten after every part: a killed run keeps what it had)
and a table to ``DIR/gpu_kl_check.md``. Exit status: 0 every part ran and passed; 1 a part failed
(or timed out); 2 none failed but some were skipped for the time budget (never reported as success).
``--kinds selfcheck,large`` runs a subset of the part kinds (gpu_suite.py times the speed table in a
part of its own); ``--backends`` a subset of the backends. ``--dry-run`` prints the plan and the time limits, writes the JSON with every part "planned", runs
nothing (a CPU check of the script). ``--device cpu`` runs the CPU-runnable parts at small sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_BACKENDS = ("triton", "hybrid", "cuda", "streaming", "streaming_chunked")
CPU_BACKENDS = ("streaming", "streaming_chunked")
SPEED_SHAPE = (37_632, 32_768, 512)
# Upper bounds per part (seconds); the remaining budget caps them further.
PART_CAP = {"selfcheck": 180, "large": 240, "speed": 420}


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _json_tail(text: str):
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


# ------------------------------------------------------------------------------------------------
# part 2 worker: large shapes and repeatability (runs in a subprocess)
# ------------------------------------------------------------------------------------------------
def _large_worker(backend: str, device: str, small: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from rils_scale.ops import patch_sentence_kl, patch_sentence_kl_reference

    dev = torch.device(device)
    dt = torch.bfloat16
    cases = ([("M=70000", 1000, 70_000, 256), ("P*D>2^31", 2_796_203, 64, 768)] if not small
             else [("M=700", 50, 700, 32), ("P*D small", 3000, 16, 24)])
    out = {}
    gen = torch.Generator(device=dev).manual_seed(0)
    for name, P, M, D in cases:
        s = F.normalize(torch.randn(P, D, device=dev, generator=gen), dim=-1).to(dt).requires_grad_()
        t = F.normalize(torch.randn(P, D, device=dev, generator=gen), dim=-1).to(dt)
        T = F.normalize(torch.randn(M, D, device=dev, generator=gen), dim=-1).to(dt).requires_grad_()
        t0 = time.perf_counter()
        loss = patch_sentence_kl(s, t, T, student_temp=0.1, teacher_temp=0.04, backend=backend)
        loss.sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        tail = slice(max(0, P - 512), P)         # rows past 2^31 / D elements: 64-bit offsets
        with torch.enable_grad():
            s64 = s[tail].detach().double().requires_grad_()
            ref = patch_sentence_kl_reference(s64, t[tail].double(), T.detach().double(), student_temp=0.1,
                                              teacher_temp=0.04)
            ref.sum().backward()
        # dPrototypes closed form, chunked over rows: sum_i (p_i - q_i) s_i / tau_s
        dT = torch.zeros(M, D, dtype=torch.float64, device=dev)
        for p0 in range(0, P, 131_072):
            sb, tb = s[p0:p0 + 131_072].detach().double(), t[p0:p0 + 131_072].double()
            Td = T.detach().double()
            G = torch.softmax(sb @ Td.T / 0.1, -1) - torch.softmax(tb @ Td.T / 0.04, -1)
            dT += G.T @ sb / 0.1
        rel = lambda x, y: ((x.double() - y).abs().max() / y.abs().max().clamp_min(1e-12)).item()  # noqa: E731
        errs = {"loss": rel(loss[tail].detach(), ref.detach()), "d_student": rel(s.grad[tail], s64.grad),
                "d_prototypes": rel(T.grad, dT)}
        ok = all(e <= (5e-3 if k == "loss" else 1e-2) for k, e in errs.items())
        out[name] = {"P": P, "M": M, "D": D, "errors": errs, "ok": ok, "seconds_first_call": secs}
        del s, t, T, loss, dT
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    # bitwise repeatability, deterministic=True
    P, M, D = (517, 2049, 768) if not small else (37, 53, 24)
    s = F.normalize(torch.randn(P, D, device=dev, generator=gen), dim=-1).to(dt)
    t = F.normalize(torch.randn(P, D, device=dev, generator=gen), dim=-1).to(dt)
    T = F.normalize(torch.randn(M, D, device=dev, generator=gen), dim=-1).to(dt)
    w = torch.rand(P, device=dev, generator=gen)
    runs = []
    for _ in range(3):
        s_, T_ = s.clone().requires_grad_(), T.clone().requires_grad_()
        loss = patch_sentence_kl(s_, t, T_, student_temp=0.1, teacher_temp=0.04, backend=backend, deterministic=True)
        (loss * w).sum().backward()
        runs.append((loss.detach(), s_.grad, T_.grad))
    same = all(torch.equal(a, b) for r in runs[1:] for a, b in zip(r, runs[0]))
    out["bitwise_repeatable"] = {"ok": same, "P": P, "M": M, "D": D}
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


# ------------------------------------------------------------------------------------------------
# orchestration
# ------------------------------------------------------------------------------------------------
def plan(device: str) -> list[tuple[str, str]]:
    """Most informative first, so a short budget still yields the headline: the self-checks of the
    production candidates, then the speed table, then the large shapes, then the fp32 fallback."""
    main = GPU_BACKENDS[:-1] if device == "cuda" else CPU_BACKENDS[:1]
    last = GPU_BACKENDS[-1] if device == "cuda" else CPU_BACKENDS[-1]
    return ([("selfcheck", b) for b in main] + [("speed", "all")] + [("large", b) for b in main]
            + [("selfcheck", last), ("large", last)])


def _command(kind: str, backend: str, device: str, small: bool, out_dir: str) -> list[str]:
    py = sys.executable
    if kind == "selfcheck":
        return [py, "-m", "rils_scale.ops.kl_selfcheck", "--backend", backend, "--device", device] + (
            ["--quick"] if small else [])
    if kind == "large":
        return [py, os.path.abspath(__file__), "--_large", backend, "--device", device] + (["--small"] if small else [])
    P, M, D = SPEED_SHAPE if not small else (512, 1024, 64)
    backends = ",".join(["reference"] + (["hybrid", "triton", "streaming", "cuda"] if device == "cuda" else
                                         ["streaming"]) + ["streaming_chunked"])
    return [py, os.path.join(REPO, "benchmarks", "bench_patch_sentence_kl.py"), "--device", device,
            "--dtype", "bfloat16" if device == "cuda" else "float32", "--grid", f"{P},{M},{D}",
            "--backends", backends, "--repeat", "5" if device == "cuda" else "1",
            "--json", os.path.join(out_dir, "gpu_kl_speed.json"), "--case-timeout-s", "120"]


def _write(out_dir: str, results: dict) -> None:
    path = os.path.join(out_dir, "gpu_kl_check.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    lines = ["| part | backend | status | seconds | detail |", "|---|---|---|---|---|"]
    for p in results["parts"]:
        lines.append(f"| {p['kind']} | {p['backend']} | {p['status']} | {p.get('seconds', '')} | "
                     f"{str(p.get('detail', ''))[:300].replace('|', '/')} |")
    with open(os.path.join(out_dir, "gpu_kl_check.md"), "w") as f:
        f.write(f"# gpu_kl_check {results['started']} on {results['device_name']}\n\n" + "\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output directory (required unless --_large)")
    ap.add_argument("--time-budget-s", type=float, default=480.0, help="wall-clock budget for all parts")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--small", action="store_true", help="small sizes (default on --device cpu)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and write it, run nothing")
    ap.add_argument("--backends", default="",
                    help="comma-separated subset of the self-checked / large-shape backends (default: all of the "
                         "device's; gpu_suite.py leaves out cuda when its build part did not build it)")
    ap.add_argument("--kinds", default=",".join(PART_CAP),
                    help="comma-separated subset of the part kinds selfcheck, large, speed (gpu_suite.py runs "
                         "the speed table as its own part, first)")
    ap.add_argument("--_large", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    small = args.small or args.device == "cpu"
    if args._large:
        print(json.dumps(_large_worker(args._large, args.device, small)))
        return 0
    if not args.out:
        ap.error("--out is required")
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - set(PART_CAP):
        ap.error(f"--kinds: choose from {sorted(PART_CAP)}")
    os.makedirs(args.out, exist_ok=True)
    t_start = time.monotonic()
    device_name = "cpu"
    if args.device == "cuda" and not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            print("gpu_kl_check: no CUDA device", file=sys.stderr)
            return 1
        device_name = torch.cuda.get_device_name(0)
    results = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "device_name": device_name,
               "time_budget_s": args.time_budget_s, "parts": []}
    only = [b for b in args.backends.split(",") if b]
    if set(only) - set(GPU_BACKENDS):
        ap.error(f"--backends: choose from {GPU_BACKENDS}")
    for kind, backend in [(k, b) for k, b in plan(args.device) if k in kinds and (not only or b in only + ["all"])]:
        results["parts"].append({"kind": kind, "backend": backend, "status": "planned",
                                 "command": _command(kind, backend, args.device, small, args.out)})
    _write(args.out, results)
    if args.dry_run:
        for p in results["parts"]:
            print(f"{p['kind']:<10} {p['backend']:<18} cap {PART_CAP[p['kind']]:>4} s  {' '.join(p['command'][1:])}")
        return 0
    all_ok, skipped = True, False
    for p in results["parts"]:
        left = args.time_budget_s - (time.monotonic() - t_start)
        limit = min(PART_CAP[p["kind"]], left - 5)
        if limit < 20:
            p["status"] = "skipped: time budget"
            skipped = True
            _write(args.out, results)
            continue
        t0 = time.monotonic()
        try:
            r = subprocess.run(p["command"], capture_output=True, text=True, timeout=limit, env=_env(), cwd=REPO)
            res = _json_tail(r.stdout) if p["kind"] != "speed" else None
            if p["kind"] == "speed":
                p["detail"] = r.stdout[-6000:]
                ok = r.returncode == 0 and "error" not in r.stdout
            else:
                p["detail"] = res if res is not None else (r.stderr.strip().splitlines() or ["no output"])[-1]
                ok = r.returncode == 0 and bool(res and res.get("ok"))
            p["status"] = "ok" if ok else f"FAILED (exit {r.returncode})"
        except subprocess.TimeoutExpired:
            p["status"], ok = f"FAILED: timed out after {limit:.0f} s", False
        p["seconds"] = round(time.monotonic() - t0, 1)
        all_ok &= ok
        _write(args.out, results)
        print(f"{p['kind']:<10} {p['backend']:<18} {p['status']} ({p['seconds']} s)", flush=True)
    results["exit_status"] = 1 if not all_ok else (2 if skipped else 0)
    _write(args.out, results)
    return results["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
