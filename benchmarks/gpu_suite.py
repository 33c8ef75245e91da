#!/usr/bin/env python
"""Everything only a GPU can show, in one call (for a lent GPU machine; see docs/benchmarks.md).

    python benchmarks/gpu_suite.py --out "$OUT"

1. build the fused KL extension for this device (JIT; the build log is kept) and run its
   correctness tests (`pytest -m cuda` when pytest is importable, else the self-check against
   the streaming backend on odd shapes, fp32/bf16, forward and both gradients);
2. KL speed and memory: naive vs streaming vs cuda at P = 37,632, M = 32,768, D = 512 (bf16),
   with the bf16 matmul rate measured in the same run;
3. the RILS step: B/16, L/16, H/14 in bf16, FlashAttention vs math attention, fused vs plain
   reconstruction loss: samples/s, TFLOP/s, MFU, peak memory, and a profile of one step.

Each part runs in its own subprocess with a time limit, so one failure (an OOM, a missing
package) is recorded and the rest still runs. Results: OUT/gpu_suite.md (paste into
docs/benchmarks.md) and the raw logs next to it.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_part(name, cmd, out_dir, timeout):
    log_path = os.path.join(out_dir, f"{name}.log")
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        output, status = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        status = "timeout"
    with open(log_path, "w") as f:
        f.write(output)
    print(output[-6000:], flush=True)
    return {"name": name, "status": status, "seconds": round(time.time() - t0, 1), "log": log_path,
            "tail": output[-4000:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_suite_out"))
    p.add_argument("--models", default="vit_b16,vit_l16,vit_h14")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: kernel,kl,step")
    p.add_argument("--part-timeout", type=int, default=170, help="seconds per part")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    py = sys.executable

    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    header = [f"# GPU suite {datetime.date.today().isoformat()}", "",
              f"device: {device}; torch {torch.__version__}, CUDA {torch.version.cuda}", ""]
    parts = []
    if "kernel" not in skip:
        try:
            import pytest  # noqa: F401
            cmd = [py, "-m", "pytest", "-q", "-m", "cuda", "tests/test_patch_sentence_kl.py"]
        except ImportError:
            cmd = [py, "-c", "import torch; from rils_scale.ops.patch_sentence_kl import cuda_backend_status; "
                             "ok, why = cuda_backend_status(torch.device('cuda')); print('self-check', ok, why); "
                             "raise SystemExit(0 if ok else 1)"]
        parts.append(run_part("kernel_correctness", cmd, args.out, args.part_timeout * 2))
    if "kl" not in skip:
        parts.append(run_part("kl_speed", [py, "benchmarks/bench_patch_sentence_kl.py", "--device", "cuda",
                                           "--dtype", "bfloat16", "--grid", "37632,32768,512", "--repeat", "5"],
                              args.out, args.part_timeout))
    if "step" not in skip:
        parts.append(run_part("step", [py, "benchmarks/bench_step.py", "--model", args.models, "--device", "cuda",
                                       "--attn", "flash,math", "--kl", "fused,reference", "--steps", "10",
                                       "--profile", "--out", os.path.join(args.out, "bench_step.json")],
                              args.out, args.part_timeout * 2))

    lines = header + ["| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']} |" for r in parts]
    for r in parts:
        lines += ["", f"## {r['name']}", "", "```", r["tail"].strip()[-3500:], "```"]
    with open(os.path.join(args.out, "gpu_suite.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"\nwrote {os.path.join(args.out, 'gpu_suite.md')}")
    return 0 if all(r["status"] == 0 for r in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
