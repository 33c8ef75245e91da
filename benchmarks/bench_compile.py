"""Step time with and without ``--compile`` (regional: each block compiled; models/compile.py).

    python benchmarks/bench_compile.py --model tiny --micro-batch 32 --steps 10 --rounds 3
    python benchmarks/bench_compile.py --model small --micro-batch 4 --image-size 112 --device cuda

One process, plain PyTorch (model + the trainer's RILSLoss without DP/TP + AdamW), fp32 on a
CPU (``--dtype bf16`` for autocast on a GPU). The two models (same seed, same weights) run in
alternated rounds of ``--steps`` steps on the same inputs, so both see the same machine load;
the compile happens in an untimed warm-up (its time is printed apart). Prints the median step
time of each and the host load average, as a markdown row set for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rils_scale.models import ParallelSpec, build_model, get_config  # noqa: E402
from rils_scale.models.compile import compile_blocks  # noqa: E402
from rils_scale.objectives import LossConfig, RILSLoss  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--image-size", type=int, default=None, help="override the preset's image size")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds (eager, compiled, eager, ...)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--checkpointing", type=float, default=0.0, help="fraction of blocks recomputed")
    args = p.parse_args(argv)

    cfg = get_config(args.model)
    if args.image_size:
        cfg.vision.image_size = args.image_size
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    s = cfg.vision.image_size
    images = torch.randn(args.micro_batch, 3, s, s, generator=g).to(dev)
    ids = torch.randint(4, cfg.text.vocab_size, (args.micro_batch, cfg.text.context_length), generator=g).to(dev)
    ids[:, 16:] = 0
    objective = RILSLoss(LossConfig(kl_backend="streaming"))

    def make(compiled: bool):
        torch.manual_seed(0)
        model = build_model(cfg, ParallelSpec(activation_checkpointing=args.checkpointing), attn_backend="sdpa")
        model = model.to(dev).train()
        if compiled:
            compile_blocks(model)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(model, opt, i):
        with torch.autocast(dev.type, torch.bfloat16, enabled=args.dtype == "bf16"):
            out = model(images, ids, mask_generator=torch.Generator().manual_seed(i))
            loss, _ = objective(out)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    runs = {"eager": make(False), "compiled": make(True)}
    warm = {}
    for name, (model, opt) in runs.items():  # warm-up: the compile, allocator, oneDNN/cuBLAS plans
        t = time.perf_counter()
        for i in range(2):
            step(model, opt, i)
        warm[name] = time.perf_counter() - t
    times = {name: [] for name in runs}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for name, (model, opt) in runs.items():
            for i in range(args.steps):
                t = time.perf_counter()
                step(model, opt, 100 + i)
                times[name].append(time.perf_counter() - t)
        load.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"| {args.model} | {args.micro_batch} | {args.device} {args.dtype} | {med['eager'] * 1e3:.1f} ms | "
          f"{med['compiled'] * 1e3:.1f} ms | {med['eager'] / med['compiled']:.2f}x | "
          f"{warm['compiled'] - warm['eager']:.0f} s | {min(load):.1f}-{max(load):.1f} |")
    print(f"(median of {args.rounds} x {args.steps} steps each, alternated; warm-up incl. compile: "
          f"eager {warm['eager']:.1f} s, compiled {warm['compiled']:.1f} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
