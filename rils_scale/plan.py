"""Capacity planner: memory per GPU, communication, step time and the largest micro-batch.

    python -m rils_scale.plan --model vit_h14 --gpus 512 --tensor-parallel 2 --zero 3 \\
        --micro-batch 64 --activation-checkpointing auto --peak-tflops 989 --mfu 0.45

The model lives in rils_scale/train/capacity.py; docs/performance.md explains how to read it.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .models import get_config, list_presets
from .train.capacity import CHECKPOINTING_POLICIES, GiB, PlanConfig, choose_activation_checkpointing, plan

_PEAK_NOTE = "dense peak TFLOP/s per GPU (default: from --device, e.g. H100 bf16 = 989)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rils_scale.plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vit_b16", help=f"preset: {', '.join(list_presets())}")
    p.add_argument("--gpus", type=int, default=8, help="world size")
    p.add_argument("--tensor-parallel", type=int, default=1, help="TP degree (inside a node)")
    p.add_argument("--zero", type=int, default=3, choices=(0, 1, 2, 3), help="ZeRO stage")
    p.add_argument("--micro-batch", type=int, default=32, help="samples per GPU per micro-step")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--activation-checkpointing", nargs="?", const="every", default="auto",
                   choices=CHECKPOINTING_POLICIES,
                   help="recompute blocks in backward: none | selective (the fewest blocks that fit) | every | "
                        "auto (what fits the --gpu-memory-gb, as the trainer picks); no value: every")
    p.add_argument("--sequence-parallel", action="store_true", help="sequence parallelism inside TP")
    p.add_argument("--offload", action="store_true", help="ZeRO-Offload the optimizer state to CPU")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--attention", default="flash", choices=("flash", "math"),
                   help="flash: FlashAttention/SDPA kernels (no S^2 kept); math: explicit softmax")
    p.add_argument("--recon-backend", default="streaming", choices=("streaming", "cuda", "reference"))
    p.add_argument("--prototype-grad", action="store_true", help="KL gradient also trains the text tower")
    p.add_argument("--recipe", default="rils", choices=("rils", "semmim"),
                   help="semmim: + momentum encoder (bf16 weights + fp32 EMA), fusion block, code head, K-way losses")
    p.add_argument("--num-codes", type=int, default=0, help="--recipe semmim: K codes (0: the preset's)")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="device memory in GiB")
    p.add_argument("--reserved-gb", type=float, default=2.0, help="CUDA context, NCCL, workspaces")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--device", default="H100", help="GPU name for the peak table when --peak-tflops is not given")
    p.add_argument("--peak-tflops", type=float, default=None, help=_PEAK_NOTE)
    p.add_argument("--mfu", type=float, default=0.45, help="assumed fraction of peak on executed FLOPs")
    p.add_argument("--inter-node-gbps", type=float, default=400.0,
                   help="inter-node bandwidth per GPU in Gbit/s (NIC line rate: 400 = NDR InfiniBand)")
    p.add_argument("--intra-node-gbps", type=float, default=900.0,
                   help="intra-node bandwidth per GPU in GB/s, both directions as on datasheets "
                        "(NVLink 4 = 900)")
    p.add_argument("--comm-efficiency", type=float, default=0.7, help="achieved fraction of link bandwidth")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    return p


def _gib(x: float) -> str:
    return f"{x / GiB:9.3f} GiB"


def format_plan(r: dict) -> str:
    m, c, t = r["memory"], r["communication"], r["time"]
    lines = [
        f"{r.get('recipe', 'rils').upper() if r.get('recipe') == 'semmim' else 'RILS'} plan: {r['model']} ({r['params'] / 1e6:,.0f} M params) on {r['gpus']} GPUs = "
        f"TP {r['tensor_parallel']} x DP {r['data_parallel']}, ZeRO-{r['zero_stage']}, {r['precision']}, "
        f"micro-batch {r['micro_batch']}, global batch {r['global_batch']}, "
        f"checkpointing {r['checkpointing']['policy']}"
        + (", sequence parallel" if r["sequence_parallel"] else "") + (", offload" if r["offload"] else ""),
        "",
        r["checkpointing_line"],
        "",
        "Memory per GPU",
        f"  {'parameters' + (' (ZeRO-3 shard)' if r['zero_stage'] >= 3 else ''):<26} {_gib(m['params'])}"
        f"   ({m['params_per_rank'] / 1e6:,.0f} M params per TP rank)",
        f"  gradients                  {_gib(m['grads'])}",
    ] + ([f"  {'momentum + fp32 EMA':<26} {_gib(m['momentum'])}   (SemMIM's EMA branch)"] if m.get("momentum") else []) + [
        f"  optimizer (master, m, v)   {_gib(m['optimizer'])}"
        + (f"   (+{m['cpu_offload'] / GiB:.2f} GiB in CPU memory)" if r["offload"] else ""),
        f"  ZeRO buffers               {_gib(m['zero_buffers'])}",
        f"  activations                {_gib(m['activations'])}"
        f"   (full {m['activations_full'] / GiB:.2f}, checkpointed {m['activations_checkpointed'] / GiB:.2f} GiB)",
    ]
    for k, v in m["activations_by_tower"].items():
        lines.append(f"    {k:<24} {_gib(v)}")
    lb = m["loss_by_term"]
    lines += [
        f"  loss workspace             {_gib(m['loss_workspace'])}"
        f"   (contrastive {lb['contrastive'] / GiB:.2f}, reconstruction {lb['reconstruction'] / GiB:.2f} GiB)",
        f"  optimizer-step transient   {_gib(m['optimizer_step_transient'])}   (not concurrent with activations)",
        f"  PEAK                       {_gib(m['peak'])}   of {m['usable'] / GiB:.1f} GiB usable "
        f"({r['gpu_memory_gb']:g} GiB GPU): {'fits' if m['fits'] else 'DOES NOT FIT'}",
        f"  largest micro-batch that fits: {r['max_micro_batch_full']} without activation checkpointing, "
        f"{r['max_micro_batch_checkpointed']} with it",
        "",
        "Communication per GPU per step",
    ]
    for k, v in c.items():
        if k != "total":
            lines.append(f"  {k:<26} {v / GiB:8.2f} GiB")
    lines.append(f"  {'total':<26} {c['total'] / GiB:8.2f} GiB")
    lines += ["", "Time per step"]
    lines.append(f"  model FLOPs per GPU        {t['model_flops_per_gpu'] / 1e12:8.1f} TFLOP"
                 f"   (executed incl. recompute {t['executed_flops_per_gpu'] / 1e12:.1f})")
    if "step_s" in t:
        lines += [
            f"  compute                    {t['compute_s']:8.3f} s   (peak {r['peak_tflops']:g} TFLOP/s x "
            f"{r['assumed_mfu']:.0%})",
            f"  TP communication           {t['tp_comm_s']:8.3f} s   (exposed)",
            f"  DP/ZeRO communication      {t['dp_comm_s']:8.3f} s   (over {t['dp_link_GBps']:.0f} GB/s; "
            "overlapped with compute)",
        ]
        if t["offload_s"]:
            lines.append(f"  offload (PCIe)             {t['offload_s']:8.3f} s")
        lines += [
            f"  STEP                       {t['step_s']:8.3f} s   (no overlap: {t['step_s_no_overlap']:.3f} s)",
            f"  throughput                 {t['samples_per_s']:8.0f} samples/s "
            f"({t['samples_per_s_per_gpu']:.1f} per GPU), MFU {t['mfu_model']:.1%}",
        ]
    else:
        lines.append("  (give --peak-tflops or a known --device for a time estimate)")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = get_config(args.model)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.recipe == "semmim":  # as the trainer's recipe sets it (train/recipe.py)
        cfg.recipe, cfg.decoder_text_conditioning = "semmim", True
        cfg.semmim.num_codes = args.num_codes or cfg.semmim.num_codes
    peak = args.peak_tflops
    if peak is None and args.device:
        from .train.hardware import peak_tflops
        peak = peak_tflops(args.device, args.precision)
    try:
        pc = PlanConfig(
            model=cfg, gpus=args.gpus, tensor_parallel=args.tensor_parallel, zero_stage=args.zero,
            micro_batch=args.micro_batch, grad_accum=args.grad_accum, sequence_parallel=args.sequence_parallel,
            offload=args.offload, precision=args.precision, attention=args.attention,
            recon_backend=args.recon_backend, prototype_grad=args.prototype_grad,
            gpu_memory_gb=args.gpu_memory_gb, reserved_gb=args.reserved_gb, gpus_per_node=args.gpus_per_node,
            peak_tflops=peak, mfu=args.mfu, inter_node_gbps=args.inter_node_gbps,
            intra_node_gbps=args.intra_node_gbps, comm_efficiency=args.comm_efficiency)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    choice = choose_activation_checkpointing(pc, args.activation_checkpointing)
    result = plan(pc.replace(activation_checkpointing=choice.fraction))
    result.update(peak_tflops=peak, assumed_mfu=args.mfu, checkpointing=choice.to_dict(),
                  checkpointing_line=choice.line())
    if args.json:
        print(json.dumps(result, indent=2, default=float))
    else:
        print(format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
