#!/usr/bin/env python
"""Bytes each tensor-parallel rank sends per training step, measured against an analytical count.

    python benchmarks/bench_tp_comm.py --model tiny --micro-batch 4 --tensor-parallel 2 [--sequence-parallel]
        [--activation-checkpointing] [--steps 3]

Spawns ``--tensor-parallel`` CPU ranks (gloo), runs forward + backward of the RILS model and
``RILSLoss`` and reads ``rils_scale.parallel.mappings.COMM_BYTES`` (what a ring implementation
sends: all-reduce 2(n-1)/n of the buffer, all-gather and reduce-scatter (n-1)/n of the full
tensor). gloo has no reduce-scatter, so ours is an all-reduce + split on CPU: it moves about
twice the bytes counted here, which are NCCL's. The analytical count, per TP rank and step
(B micro-batch, n = TP, e bytes per element, r = 2(n-1)/n, g = (n-1)/n):

without sequence parallel, all-reduces only:
    per block of width D over N tokens: forward 2 x B.N.D (attention proj and MLP fc2 outputs,
    row-parallel), backward 2 x B.N.D (inputs of qkv and fc1, column-parallel), plus 2 more
    forward ones per block in the recompute with activation checkpointing, of which torch's
    non-reentrant checkpoint skips fc2's (its recompute stops at the last op that saved a
    tensor, fc2's GEMM, unless dropout > 0 saves a mask after the reduction);
    vocab-parallel embedding: 1 x B.L.D_text (forward);
    passes: text tower (L tokens), vision encoder unmasked (1+P) and masked (1+K), decoder (1+P);
    loss: a scalar all-reduce (TP-split reconstruction sum).
with sequence parallel (N padded to a multiple of n):
    each all-reduce of a block becomes an all-gather + a reduce-scatter (same bytes in total);
    per tower pass one more all-gather at the exit (forward) and one at the entry (backward);
    norm weights/biases and row-parallel biases (6 D-vectors per block) are all-reduced in
    backward, per pass; the embedding all-reduce stays.
loss: the kept reconstruction rows (R = B.(P-K) here) are split over TP; backward all-gathers
    the student rows' gradient, g x R_pad x E.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import torch  # noqa: E402

KINDS = ("all_reduce", "all_gather", "reduce_scatter")


def analytical_bytes(cfg, batch: int, tp: int, sp: bool, ac: bool, elem: int):
    """``{component: {kind: bytes}}`` sent by one TP rank in one forward + backward."""
    n = tp
    r, g = 2 * (n - 1) / n, (n - 1) / n
    v, t = cfg.vision, cfg.text
    keep = int(v.num_patches * (1 - cfg.mask_ratio))
    passes = [("text tower", t.depth, t.context_length, t.width),
              ("vision encoder, unmasked", v.depth, 1 + v.num_patches, v.width),
              ("vision encoder, masked", v.depth, 1 + keep, v.width),
              ("decoder", v.decoder_depth, 1 + v.num_patches, v.width)]
    # Per block: 2 column-parallel entries (qkv, fc1) and 2 row-parallel exits (proj, fc2).
    # The recompute of activation checkpointing (torch's non-reentrant checkpoint) stops after
    # the last op that saved a tensor: with dropout 0 that is fc2's GEMM, so fc2's reduction is
    # not recomputed (with dropout > 0 its mask is saved after the reduction, so it is).
    entries_recomputed = 2 if ac else 0
    exits_recomputed = (2 if cfg.dropout > 0 else 1) if ac else 0
    out = {}
    for name, depth, tokens, width in passes:
        row = defaultdict(float)
        if sp:
            npad = tokens + (-tokens) % n
            act = batch * npad * width * elem
            # forward: all-gather at entries, reduce-scatter at exits; backward: the reverse
            row["all_gather"] += g * act * depth * (2 + 2 + entries_recomputed)
            row["reduce_scatter"] += g * act * depth * (2 + 2 + exits_recomputed)
            row["all_gather"] += 2 * g * act  # gather at the exit (fwd), scatter's backward at the entry
            row["all_reduce"] += r * 6 * width * elem * depth  # SP norm / row-bias gradients
        else:
            act = batch * tokens * width * elem
            # forward: all-reduce at exits; backward: all-reduce at entries
            row["all_reduce"] += r * act * depth * (2 + 2 + exits_recomputed)
        out[name] = row
    out["text tower"]["all_reduce"] += r * batch * t.context_length * t.width * elem  # vocab-parallel embedding
    rows = batch * (v.num_patches - keep)
    rows_pad = rows + (-rows) % n
    out["loss (TP-split reconstruction)"] = {"all_gather": g * rows_pad * cfg.embed_dim * elem,
                                             "all_reduce": r * 4}  # float32 scalar sum
    return out


def _worker(rank, world, args, queue):
    from rils_scale.models import build_model, get_config
    from rils_scale.models.transformer import ParallelSpec
    from rils_scale.objectives import LossConfig, RILSLoss
    from rils_scale.parallel import init_parallel_state, model_parallel_seed
    from rils_scale.parallel.mappings import COMM_BYTES

    state = init_parallel_state(args.tensor_parallel, args.sequence_parallel)
    cfg = get_config(args.model)
    model_parallel_seed(0, state.tp_rank, state.tp_size)
    spec = ParallelSpec(state.tp_group if state.tp_size > 1 else None, args.sequence_parallel,
                        args.activation_checkpointing)
    model = build_model(cfg, spec).train()
    loss_fn = RILSLoss(LossConfig(retrieval_filter=False, kl_backend="reference"), tp_group=spec.tp_group)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.micro_batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ids = torch.randint(1, cfg.text.vocab_size, (args.micro_batch, cfg.text.context_length), generator=g)

    def step():
        out = model(images, ids, mask_generator=torch.Generator().manual_seed(1))
        loss, _ = loss_fn(out)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    COMM_BYTES.clear()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed = (time.perf_counter() - t0) / args.steps
    if rank == 0:
        queue.put(({k: v / args.steps for k, v in COMM_BYTES.items()}, elapsed, cfg))


def _fmt(b: float) -> str:
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if b >= div:
            return f"{b / div:8.2f} {unit}"
    return f"{b:8.0f} B  "


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="preset (tiny, small, ...)")
    p.add_argument("--micro-batch", type=int, default=4, help="images per TP group")
    p.add_argument("--tensor-parallel", type=int, default=2, help="TP ranks to spawn")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up)")
    args = p.parse_args(argv)
    if args.tensor_parallel < 2:
        p.error("--tensor-parallel must be >= 2 (TP = 1 sends nothing)")

    import torch.multiprocessing as mp
    from distributed_utils import spawn
    from rils_scale.models import get_config
    from rils_scale.parallel import ParallelDims
    from rils_scale.parallel.validate import validate_parallel_config

    validate_parallel_config(get_config(args.model),
                             ParallelDims(args.tensor_parallel, args.tensor_parallel, args.sequence_parallel))
    queue = mp.get_context("spawn").SimpleQueue()
    spawn(_worker, args.tensor_parallel, args, queue)
    measured, step_time, cfg = queue.get()

    expected = analytical_bytes(cfg, args.micro_batch, args.tensor_parallel, args.sequence_parallel,
                                args.activation_checkpointing, elem=4)
    totals = defaultdict(float)
    print(f"model={args.model} micro_batch={args.micro_batch} TP={args.tensor_parallel} "
          f"SP={args.sequence_parallel} AC={args.activation_checkpointing} float32; "
          f"bytes sent per TP rank per step (ring counts); CPU step {step_time * 1e3:.0f} ms")
    print(f"{'component (analytical)':34s}" + "".join(f"{k:>16s}" for k in KINDS))
    for name, row in expected.items():
        print(f"{name:34s}" + "".join(f"{_fmt(row.get(k, 0)):>16s}" for k in KINDS))
        for k in KINDS:
            totals[k] += row.get(k, 0)
    print(f"{'total, analytical':34s}" + "".join(f"{_fmt(totals[k]):>16s}" for k in KINDS))
    print(f"{'total, measured (COMM_BYTES)':34s}" + "".join(f"{_fmt(measured.get(k, 0)):>16s}" for k in KINDS))
    worst = max(abs(measured.get(k, 0) - totals[k]) / max(totals[k], 1) for k in KINDS)
    print(f"largest relative difference: {worst:.2e}")
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
