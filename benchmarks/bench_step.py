"""One RILS training step, timed: attention backend x reconstruction-loss backend x model.

    # on a GPU, the trainer's configuration (bf16 weights + fp32 master AdamW, G = 32,768
    # prototypes, TF32 off, TP = 1, activation checkpointing auto, B/16 + L/16 + H/14):
    python benchmarks/bench_step.py --out runs/bench_step.json
    # CPU smoke test:
    python benchmarks/bench_step.py --model tiny --device cpu --steps 3

Plain PyTorch (model + loss + AdamW; no DeepSpeed): the step a single GPU runs, in the
precision layout of DeepSpeed's ``bf16: {enabled: true}`` (ds_configs/*.json): the module's
parameters, activations and gradients are bf16 and the optimizer keeps an fp32 master copy
with fp32 AdamW states (``--weights bf16``, the GPU default; no autocast). ``--weights fp32
--dtype bf16`` is autocast over fp32 weights instead, for comparison. TF32 stays off as in the
trainer (``--tf32`` turns it on for a comparison row). The loss is
the trainer's (rils_scale.objectives) without the distributed parts: CLIP contrastive with
the model's logit scale + 0.5 x mean patch-sentence KL over every masked row (retrieval filter
off, so the KL cost is the worst case). ``--prototypes G`` pads the sentence prototypes (and
the contrastive columns) with detached random unit vectors to G columns, standing in for the
features other data-parallel ranks contribute, so the KL runs at the real prototype count
(the global batch: 32,768 by default on a GPU, as DESIGN's B/16 run; the micro-batch on CPU).
The padding is made once per configuration on the device: the timed step holds no host work.

Reported per configuration: median step time, samples/s, model TFLOP/s from
rils_scale.train.flops (``total``: forward + backward, recompute not counted) and executed
TFLOP/s (``total_with_recompute``: plus activation-checkpointing and KL recompute, the HFU
numerator), MFU against the device's dense bf16 peak (rils_scale.train.hardware), and peak memory (CUDA
max_memory_allocated; CPU: peak RSS). Each configuration runs in try/except: an out-of-memory
becomes an "OOM" row, any other failure an "error" row, and the table is always printed.
Every row reaches disk when it is measured: ``--rows`` appends it to a JSONL file and ``--out``
rewrites the JSON and markdown after each configuration (a killed run keeps what it measured).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rils_scale.models import ParallelSpec, build_model, get_config  # noqa: E402
from rils_scale.models.attention import HAS_FLASH_ATTN  # noqa: E402
from rils_scale.ops import patch_sentence_kl  # noqa: E402
from rils_scale.train import hardware  # noqa: E402
from rils_scale.train.capacity import CHECKPOINTING_POLICIES, GiB, PlanConfig, choose_activation_checkpointing  # noqa: E402
from rils_scale.train.flops import masked_patches, rils_step_flops  # noqa: E402

GPU_PROTOTYPES = 32768  # the trainer's G at a 32k global batch (DESIGN §8)
DEFAULT_MICRO_BATCH = {"tiny": 8, "small": 64, "vit_b16": 256, "vit_l16": 128, "vit_h14": 64, "vit_g14": 32}
STUDENT_TEMP, TEACHER_TEMP, RECON_WEIGHT = 0.1, 0.04, 0.5


def prototype_padding(extra: int, width: int, device: torch.device, dtype: torch.dtype):
    """The other ranks' captions: ``extra`` fixed random unit vectors of ``width``, made once per
    configuration on the device, outside the timed step (None when there are none)."""
    if extra <= 0:
        return None
    g = torch.Generator(device="cpu").manual_seed(0)
    return F.normalize(torch.randn(extra, width, generator=g), dim=-1).to(device, dtype)


def rils_loss(out, n_masked: int, kl_backend: str, pad=None, labels=None):
    """Contrastive (both directions) + 0.5 x mean KL over masked rows (all rows kept). ``pad``
    (:func:`prototype_padding`) extends the prototypes and contrastive columns to G; only device
    work happens here: no random draw, no host-to-device copy, no host sync."""
    img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
    b, _, e = out["student_patches"].shape
    cols, img_cols = txt, img
    if pad is not None:  # other ranks' captions: no gradient
        cols = torch.cat([txt, pad.to(txt.dtype)])
        img_cols = torch.cat([img, pad.to(img.dtype)])
    if labels is None:
        labels = torch.arange(b, device=img.device)
    clip = 0.5 * (F.cross_entropy((scale * img @ cols.T).float(), labels)
                  + F.cross_entropy((scale * txt @ img_cols.T).float(), labels))
    # every sample has exactly n_masked masked positions: gather them without a host sync
    idx = out["mask"].argsort(dim=1, descending=True, stable=True)[:, :n_masked]
    idx = idx.unsqueeze(-1).expand(-1, -1, e)
    student = torch.gather(out["student_patches"], 1, idx).reshape(-1, e)
    teacher = torch.gather(out["teacher_patches"], 1, idx).reshape(-1, e)
    kl = patch_sentence_kl(student, teacher, cols.detach(), student_temp=STUDENT_TEMP,
                           teacher_temp=TEACHER_TEMP, backend=kl_backend)
    return clip + RECON_WEIGHT * kl.float().mean()


class MasterWeightAdamW:
    """DeepSpeed bf16's optimizer layout without DeepSpeed: the model holds bf16 parameters and
    receives bf16 gradients; AdamW steps an fp32 master copy, which is cast back into the model.
    (Memory per parameter: 2 + 2 bf16, 4 master, 4 master grad, 8 Adam states, as DeepSpeed.)"""

    def __init__(self, params, **adamw):
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.opt = torch.optim.AdamW(self.master, **adamw)

    def step(self):
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
        self.opt.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                p.copy_(m)  # rounds to bf16

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            p.grad = None


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def checkpointed_fraction(cfg, micro_batch: int, attn: str, kl: str, args, device: torch.device):
    """``--activation-checkpointing`` as the trainer resolves it (train/recompute.py): the planner's
    choice for one device of this memory, no ZeRO, TP 1; ``auto`` on a CPU is ``none``."""
    if args.activation_checkpointing == "auto" and device.type != "cuda":
        return "none", 0.0
    pc = PlanConfig(model=cfg, gpus=1, tensor_parallel=1, gpus_per_node=1, zero_stage=0, micro_batch=micro_batch,
                    precision="bf16" if args.weights == "bf16" else "fp32",
                    attention="math" if attn == "math" else "flash",
                    recon_backend="reference" if kl == "reference" else "streaming",
                    gpu_memory_gb=hardware.device_memory_bytes(device) / GiB)
    choice = choose_activation_checkpointing(pc, args.activation_checkpointing)
    return choice.policy, choice.fraction


def run_config(model_name: str, attn: str, kl: str, args, device: torch.device) -> dict:
    b = args.micro_batch or DEFAULT_MICRO_BATCH.get(model_name, 32)
    g = max(args.prototypes or b, b)
    row = {"model": model_name, "attention": attn, "kl": kl, "micro_batch": b, "prototypes": g,
           "dtype": args.dtype, "weights": args.weights}
    model = opt = None
    try:
        cfg = get_config(model_name)
        policy, fraction = checkpointed_fraction(cfg, b, attn, kl, args, device)
        row.update(checkpointing=policy, checkpointed_fraction=fraction)
        flops = rils_step_flops(cfg, b, g, activation_checkpointing=fraction, recon_backend=kl)
        row["model_tflop_per_step"] = flops["total"] / 1e12
        row["executed_tflop_per_step"] = flops["total_with_recompute"] / 1e12
        torch.manual_seed(0)
        spec = ParallelSpec(activation_checkpointing=fraction)
        model = build_model(cfg, spec, attn_backend=attn).to(device)
        model.train()
        adamw = dict(lr=1e-4, weight_decay=0.05, fused=device.type == "cuda")
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
        if args.weights == "bf16":  # DeepSpeed bf16: bf16 module, fp32 master in the optimizer
            model = model.to(low or torch.bfloat16)
            opt = MasterWeightAdamW(model.parameters(), **adamw)
            amp_dtype, in_dtype = None, low or torch.bfloat16
        else:  # fp32 weights, autocast to --dtype (fp32: no autocast)
            opt = torch.optim.AdamW(model.parameters(), **adamw)
            amp_dtype, in_dtype = low, torch.float32
        images = torch.randn(b, 3, cfg.vision.image_size, cfg.vision.image_size, device=device).to(in_dtype)
        tokens = torch.randint(1, cfg.text.vocab_size, (b, cfg.text.context_length), device=device)
        n_masked = masked_patches(cfg)
        pad = prototype_padding(g - b, cfg.embed_dim, device, in_dtype)
        labels = torch.arange(b, device=device)

        def step():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = rils_loss(model(images, tokens), n_masked, kl, pad, labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        for _ in range(args.warmup):
            loss = step()
        if not torch.isfinite(loss.detach()).item():
            raise FloatingPointError(f"non-finite loss {loss.item()}")
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            hardware.reset_peak_memory("cpu")
        times = []
        for _ in range(args.steps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        peak_mem = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                    else hardware.rss_high_water_bytes())
        meter = hardware.ThroughputMeter(flops["total"], b, args.peak_tflops)
        m = meter.metrics(step_s)
        row.update(status="ok", step_s=step_s, samples_per_s=m["samples_per_s"],
                   tflops=m["tflops_per_device"], mfu=m["mfu"], peak_mem_gb=peak_mem / 2 ** 30,
                   executed_tflops=flops["total_with_recompute"] / step_s / 1e12,
                   loss=float(loss.detach()))
        if args.profile and not getattr(args, "_profiled", False):
            args._profiled = True
            row["profile"] = profile_step(step, device, args.profile_rows)
    except Exception as exc:  # noqa: BLE001 - a failed row must not stop the table
        if _is_oom(exc):
            row.update(status="OOM")
        else:
            row.update(status="error", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
            if args.verbose:
                traceback.print_exc()
    finally:
        del model, opt
        _free(device)
    return row


def profile_step(step, device: torch.device, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows)
    print(table)
    return table


def _fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_table(rows) -> str:
    head = ("| model | attention | KL | B | G | ckpt | step s | samples/s | TFLOP/s | MFU | executed TFLOP/s "
            "| peak mem GiB |\n|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        if r.get("status") != "ok":
            status = r.get("status", "?") + (f" ({r['error']})" if r.get("error") else "")
            lines.append(f"| {r['model']} | {r['attention']} | {r['kl']} | {r['micro_batch']} | {r['prototypes']} "
                         f"| {r.get('checkpointing', '')} | {status} | | | | | |")
            continue
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        ckpt = r.get("checkpointing", "?")
        if ckpt == "selective":
            ckpt += f" {r['checkpointed_fraction']:.2f}"
        lines.append(f"| {r['model']} | {r['attention']} | {r['kl']} | {r['micro_batch']} | {r['prototypes']} "
                     f"| {ckpt} | {r['step_s']:.4f} | {r['samples_per_s']:.1f} | {r['tflops']:.3f} | "
                     f"{_fmt(mfu, '.1f')}{'%' if mfu is not None else ''} | {r['executed_tflops']:.3f} "
                     f"| {r['peak_mem_gb']:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vit_b16,vit_l16,vit_h14" if on_gpu else "tiny",
                   help="comma-separated presets")
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"),
                   help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--weights", default=None, choices=("bf16", "fp32"),
                   help="bf16: the module in --dtype with an fp32 master copy in the optimizer (DeepSpeed "
                        "bf16, the trainer); fp32: fp32 weights under autocast to --dtype "
                        "(default: bf16 when --dtype is bf16/fp16, else fp32)")
    p.add_argument("--tf32", action="store_true",
                   help="allow TF32 matmuls/convolutions (the trainer never does; off by default)")
    p.add_argument("--micro-batch", type=int, default=0,
                   help=f"samples per step (0: per-model default {DEFAULT_MICRO_BATCH})")
    p.add_argument("--prototypes", type=int, default=0,
                   help=f"sentence prototypes G of the KL and contrastive columns (0: {GPU_PROTOTYPES} "
                        "on a GPU, the trainer's global batch; the micro-batch on CPU)")
    p.add_argument("--attn", default="flash,math",
                   help="attention backends: flash (flash_attn package if installed, else SDPA, "
                        "which dispatches to FlashAttention-2 kernels), sdpa, flash_attn, math")
    p.add_argument("--kl", default="fused,reference",
                   help="KL backends: fused (the CUDA extension if it loads, else streaming), streaming, "
                        "cuda, auto, reference")
    p.add_argument("--activation-checkpointing", default="auto", choices=CHECKPOINTING_POLICIES,
                   help="blocks recomputed in backward, as the trainer's option: auto (the planner's choice for "
                        "this device's memory and micro-batch; none on CPU), none, selective, every")
    p.add_argument("--no-checkpointing", dest="activation_checkpointing", action="store_const", const="none",
                   help="same as --activation-checkpointing none")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 on GPU, 1 on CPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: torch's default)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense peak for MFU (default: device table)")
    p.add_argument("--profile", action="store_true", help="profile one step of the first configuration")
    p.add_argument("--profile-rows", type=int, default=20)
    p.add_argument("--out", default="", help="write JSON here and a markdown table beside it (.md), "
                                                 "rewritten after every configuration")
    p.add_argument("--rows", default="", help="append each configuration's row to this JSONL file as it is measured")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failed rows")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.weights is None:
        args.weights = "bf16" if args.dtype in ("bf16", "fp16") else "fp32"
    if args.weights == "bf16" and args.dtype == "fp32":
        p.error("--weights bf16 needs --dtype bf16 or fp16")
    if not args.prototypes and args.device.startswith("cuda"):
        args.prototypes = GPU_PROTOTYPES
    if args.warmup is None:
        args.warmup = 3 if args.device.startswith("cuda") else 1
    return args


def resolve_attn(name: str, device: torch.device) -> str:
    if name == "flash":
        return "flash_attn" if (HAS_FLASH_ATTN and device.type == "cuda") else "sdpa"
    return name


def resolve_kl(name: str, device: torch.device) -> str:
    """"fused": the CUDA extension where it loads and passes its self-check, else streaming."""
    if name != "fused":
        return name
    if device.type != "cuda":
        return "streaming"
    try:
        from rils_scale.ops.patch_sentence_kl import cuda_backend_status
        ok, reason = cuda_backend_status(device)
    except Exception as exc:  # noqa: BLE001 - report, fall back
        ok, reason = False, str(exc)
    if not ok:
        print(f"fused KL: CUDA extension unusable ({reason}); using streaming", flush=True)
    return "cuda" if ok else "streaming"


def append_row(path: str, row: dict) -> None:
    """One JSON line per measurement, appended, flushed and synced."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_outputs(args, name: str, rows, tf32) -> str:
    """The summary JSON and the markdown table of the rows so far (each replaced atomically)."""
    base = args.out[:-3] if args.out.endswith(".md") else (args.out[:-5] if args.out.endswith(".json") else args.out)
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    summary = {"device": name, "peak_tflops": args.peak_tflops, "torch": torch.__version__,
               "dtype": args.dtype, "weights": args.weights, "tf32": tf32,
               "steps": args.steps, "warmup": args.warmup,
               "checkpointing": args.activation_checkpointing, "rows": rows}
    text = (f"device: {name}, {args.dtype}, weights {args.weights}, tf32 {tf32}, checkpointing "
            f"{args.activation_checkpointing} (per row: column ckpt), median of {args.steps} steps after {args.warmup} "
            f"warm-up\n\n{markdown_table(rows)}\n")
    for path, content in ((base + ".json", json.dumps(summary, indent=2, default=str)), (base + ".md", text)):
        with open(path + ".tmp", "w") as f:
            f.write(content)
        os.replace(path + ".tmp", path)
    return base


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda but no GPU is visible", file=sys.stderr)
            return 2
        # TF32 as the trainer has it (it never sets these): only --tf32 changes them
        if args.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    name = hardware.device_name(device)
    if args.peak_tflops is None:
        args.peak_tflops = hardware.peak_tflops(name, "bf16" if args.dtype in ("bf16", "fp16") else "fp32")
    tf32 = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    print(f"device: {name}; peak {args.peak_tflops or '-'} TFLOP/s ({args.dtype}); weights {args.weights}; "
          f"tf32 {tf32}; torch {torch.__version__}; flash_attn package: {HAS_FLASH_ATTN}", flush=True)
    rows = []
    for model_name in [m for m in args.model.split(",") if m]:
        for attn in [a for a in args.attn.split(",") if a]:
            for kl in [k for k in args.kl.split(",") if k]:
                row = run_config(model_name, resolve_attn(attn, device), resolve_kl(kl, device), args, device)
                row["device"] = name
                rows.append(row)
                print(markdown_table([row]).splitlines()[-1], flush=True)
                # every measurement reaches disk the moment it exists: a killed run keeps it
                if args.rows:
                    append_row(args.rows, row)
                if args.out:
                    write_outputs(args, name, rows, tf32)
    print("\n" + markdown_table(rows))
    if args.out:
        base = write_outputs(args, name, rows, tf32)
        print(f"wrote {base}.json and {base}.md")
    return 0 if any(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
