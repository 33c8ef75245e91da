"""Build the fused CUDA extension into the node-local JIT cache ahead of training.

    python -m rils_scale.ops.build_kernels [--archs 90] [--check-only]

Run once per node before the training ranks start (``launchers/slurm/pretrain.sbatch`` does it with
``srun --ntasks-per-node=1``), so eight ranks do not each wait on (or race for) a minute-long nvcc
build inside their first step. Exit status: 0 built / already cached / nothing to build (no GPU
on this node and no ``--archs``: a CPU node); 2 the toolchain is missing (message says what;
training then runs without the ``cuda`` backend, ``auto`` picks among the others); 1 the build
failed. ``--check-only`` runs the toolchain check alone.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from . import _extension


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=None, help="';'-separated SM archs (default: $RILS_CUDA_ARCHS or the GPU's)")
    ap.add_argument("--check-only", action="store_true", help="only check for nvcc / headers / compiler / ninja")
    args = ap.parse_args(argv)
    problem = _extension.check_toolchain(jit=True)
    if problem:
        print(f"build_kernels: cannot build the fused kernel: {problem}", file=sys.stderr)
        return 2
    if args.check_only:
        print("build_kernels: toolchain ok")
        return 0
    archs = [a for a in args.archs.replace(",", ";").split(";") if a.strip()] if args.archs else None
    if archs is None and not os.environ.get("RILS_CUDA_ARCHS") and not _cuda_device_present():
        # A CPU node (or a job without GPUs): the ranks never load the extension, nothing to build.
        print("build_kernels: no CUDA device on this node and no --archs / RILS_CUDA_ARCHS: nothing to build")
        return 0
    t0 = time.perf_counter()
    try:
        mod = _extension.jit_build(archs)
    except Exception as e:  # noqa: BLE001
        print(f"build_kernels: build failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"build_kernels: {mod.__file__} (sources {mod.source_hash}, archs {mod.cuda_archs}) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def _cuda_device_present() -> bool:
    import torch
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


if __name__ == "__main__":
    sys.exit(main())
