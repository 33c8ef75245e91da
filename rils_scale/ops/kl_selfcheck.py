"""First-use self-check of a patch-sentence KL backend against the float64 reference.

A CUDA backend is checked in a **subprocess** (``python -m rils_scale.ops.kl_selfcheck --backend B
--device cuda:0``): an illegal memory access poisons the CUDA context for good, so a check in the
training process could neither report the failure nor fall back. The child prints one JSON line
``{"ok": bool, "reason": str, "seconds": float}``; a crash, a non-zero exit or a time-out is a failure.
Pure-PyTorch backends on CPU cannot corrupt a context and are checked in-process (the same cases).

Cases (CUDA): odd shapes, D = 72 / 128 / 768, a multi-wave grid (more row blocks than a GPU has
SMs), peaked teacher logits (unnormalised inputs scaled up), fp32 / bf16 / fp16, forward and both
gradients with a random upstream weight. CPU (``quick``): the same kinds of case at tiny sizes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

__all__ = ["check_backend", "selfcheck_in_subprocess", "selfcheck_cases", "TOLERANCES"]

# max |error| / max |reference| per dtype; 16-bit gradients come back rounded to 16 bits, and the
# GEMM backends (triton, hybrid, GPU streaming) round G = p - q to bf16 before the gradient products.
TOLERANCES = {torch.float32: 2e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def selfcheck_cases(device: torch.device, quick: bool = False) -> list[dict]:
    """(P, M, D, scale, normalise) cases. ``quick``: tiny sizes (CPU, interpreter)."""
    if quick or device.type != "cuda":
        return [dict(P=37, M=53, D=24, scale=1.0, normalise=True),
                dict(P=21, M=67, D=40, scale=1.0, normalise=True),
                dict(P=19, M=33, D=16, scale=4.0, normalise=False)]          # peaked teacher
    return [dict(P=77, M=133, D=72, scale=1.0, normalise=True),
            dict(P=301, M=777, D=128, scale=1.0, normalise=True),
            dict(P=129, M=1031, D=768, scale=1.0, normalise=True),
            dict(P=17_000, M=300, D=128, scale=1.0, normalise=True),        # 133 row blocks of 128: just over one wave of 132 SMs
            dict(P=200, M=513, D=128, scale=4.0, normalise=False)]          # peaked teacher


def _inputs(c, dtype, device, gen):
    xs = [torch.randn(n, c["D"], generator=gen, dtype=torch.float64) for n in (c["P"], c["P"], c["M"])]
    if c["normalise"]:
        xs = [torch.nn.functional.normalize(x, dim=-1) for x in xs]
    return [(x * c["scale"]).to(device, dtype) for x in xs]


def check_backend(backend: str, device: torch.device | str, dtypes=None, quick: bool = False) -> tuple[bool, str]:
    """Run ``backend`` on the self-check cases, compare with the float64 reference on the same rounded
    inputs. Returns ``(ok, reason)``; never raises."""
    from .kl_reference import patch_sentence_kl_reference
    from .kl_backends import backend_function
    device = torch.device(device)
    dtypes = dtypes or ((torch.float32, torch.bfloat16, torch.float16) if device.type == "cuda"
                        else (torch.float32, torch.bfloat16))
    gen = torch.Generator(device="cpu").manual_seed(1234)
    fn = backend_function(backend)
    try:
        # The first call may come from under no_grad / inference_mode / autocast: the check needs
        # autograd and must not be autocast. The oracle is float64 so TF32 settings cannot matter.
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            for c in selfcheck_cases(device, quick):
                for dtype in dtypes:
                    s, t, T = _inputs(c, dtype, device, gen)
                    w = torch.rand(c["P"], generator=gen, dtype=torch.float64).to(device)
                    outs = []
                    for f, cast in ((fn, dtype), (patch_sentence_kl_reference, torch.float64)):
                        s_, T_ = (x.detach().to(cast, copy=True).requires_grad_() for x in (s, T))
                        loss = f(s_, t.to(cast), T_, student_temp=0.1, teacher_temp=0.04)
                        (loss.double() * w).sum().backward()
                        outs.append((loss.double().cpu(), s_.grad.double().cpu(), T_.grad.double().cpu()))
                    tol = TOLERANCES[dtype]
                    for name, x, y in zip(("loss", "d_student", "d_prototypes"), outs[0], outs[1]):
                        err = ((x - y).abs().max() / y.abs().max().clamp_min(1e-6)).item()
                        if not math.isfinite(err) or err > tol:
                            return False, (f"{backend} self-check failed on {device}: {name} ({dtype}, {c}) "
                                           f"rel. error {err:.2e} > {tol:.0e}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return True, "ok"
    except Exception as e:  # noqa: BLE001 - any failure means: do not use this backend
        return False, f"{backend} self-check raised on {device}: {type(e).__name__}: {e}"


def selfcheck_command(backend: str, device: str, quick: bool = False) -> list[str]:
    return [sys.executable, "-m", "rils_scale.ops.kl_selfcheck", "--backend", backend, "--device", device] + (
        ["--quick"] if quick else [])


def selfcheck_in_subprocess(backend: str, device: str, timeout_s: float = 600.0, quick: bool = False,
                            extra_env: dict | None = None) -> tuple[bool, str]:
    """:func:`check_backend` in a child process (same interpreter, this package first on PYTHONPATH;
    ``extra_env`` e.g. ``{"TRITON_INTERPRET": "1"}`` to check the Triton kernels on a CPU)."""
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, **(extra_env or {}))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    try:
        r = subprocess.run(selfcheck_command(backend, device, quick), capture_output=True, text=True,
                           timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return False, f"{backend} self-check timed out after {timeout_s:.0f} s on {device}"
    for line in reversed(r.stdout.strip().splitlines()):
        try:
            res = json.loads(line)
            return bool(res["ok"]), str(res["reason"])
        except (ValueError, KeyError, TypeError):
            continue
    tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
    return False, f"{backend} self-check process exited {r.returncode} on {device}: {tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny cases (CPU / Triton interpreter)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    ok, reason = check_backend(args.backend, args.device, quick=args.quick)
    print(json.dumps({"ok": ok, "reason": reason, "seconds": round(time.perf_counter() - t0, 3)}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
