#!/usr/bin/env python
"""Peak memory of the streamed checkpoint converter on a synthetic ViT-H/14-sized checkpoint.

Writes a DeepSpeed ZeRO-3 layout checkpoint directly (no training): for every TP x DP rank a
``zero_pp_rank_{d}_mp_rank_{t:02d}_model_states.pt`` (param shapes, client state) and a
``bf16_zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt`` holding random fp32 flat partitions and,
with ``--moments``, Adam moments of the same size (as real files do). Then runs
``launchers/convert_checkpoint.py --format rils`` in a subprocess, samples its ``/proc`` status
every 50 ms and prints peak RSS (anonymous and file-backed) against the model's fp32 size.

    python benchmarks/bench_convert.py --preset vit_h14 --tp 2 --dp 2 --scale 0.25   # quick
    python benchmarks/bench_convert.py --preset vit_h14 --tp 2 --dp 2                 # full, ~4 GB fp32

``--scale`` keeps every tensor's real shape and keeps that fraction of the blocks of both towers,
so per-tensor sizes (what bounds the streamed peak) stay those of the full model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _full_shapes(cfg):
    """TP=1 parameter shapes without building the full model: the structural model gives the names,
    shapes follow from the config (checked against a real build for the tiny preset in tests)."""
    from rils_scale.checkpoint.layout import model_parameter_names
    v, t, e = cfg.vision, cfg.text, cfg.embed_dim
    shapes = OrderedDict()
    for name in model_parameter_names(cfg):
        parts = name.split(".")
        leaf = parts[-1]
        tower = t if name.startswith("text.") else v
        d = tower.width
        hidden = tower.mlp_hidden
        if name == "visual.cls_token" or name == "decoder.mask_token":
            s = (1, 1, v.width)
        elif name == "visual.patch_embed.weight":
            s = (v.width, 3, v.patch_size, v.patch_size)
        elif name == "image_projection.weight":
            s = (v.width, e)
        elif name == "text_projection.weight":
            s = (t.width, e)
        elif name == "logit_scale.value":
            s = (1,)
        elif name == "text.token_embedding.weight":
            s = (t.vocab_size, t.width)
        elif name == "text.positional_embedding":
            s = (t.context_length, t.width)
        elif name.startswith("decoder.embed.") or name.startswith("decoder.pred."):
            s = (v.width, v.width) if leaf == "weight" else (v.width,)
        elif "attn.qkv" in name:
            s = (3 * d, d) if leaf == "weight" else (3 * d,)
        elif "mlp.fc1" in name:
            s = (hidden, d) if leaf == "weight" else (hidden,)
        elif "mlp.fc2" in name:
            s = (d, hidden) if leaf == "weight" else (d,)
        elif "attn.proj" in name:
            s = (d, d) if leaf == "weight" else (d,)
        else:  # norms, q/v biases, patch-embed bias
            s = (d,)
        shapes[name] = s
    return shapes


def write_synthetic(out: str, cfg, tp: int, dp: int, moments: bool) -> dict:
    import math
    import torch
    from rils_scale.checkpoint.layout import tensor_parallel_layout_for
    from rils_scale.parallel.sharding import padded_size
    full = _full_shapes(cfg)
    layout = tensor_parallel_layout_for(cfg, tp)

    def local(name):
        s = list(full[name])
        spec = layout.get(name)
        if spec is not None:
            size = padded_size(s[spec.partition_dim], tp) if spec.vocab_size else s[spec.partition_dim]
            s[spec.partition_dim] = size // tp
        return torch.Size(s)

    shapes = OrderedDict((n, local(n)) for n in full)
    names = list(shapes)
    groups = [OrderedDict((n, shapes[n]) for n in names if len(shapes[n]) >= 2),
              OrderedDict((n, shapes[n]) for n in names if len(shapes[n]) < 2)]
    tag = os.path.join(out, "checkpoints", "global_step1")
    os.makedirs(tag, exist_ok=True)
    with open(os.path.join(out, "checkpoints", "latest"), "w") as f:
        f.write("global_step1")
    for t in range(tp):
        per_group = [sum(math.ceil(s.numel() / dp) for s in g.values()) for g in groups]
        for d in range(dp):
            torch.save({"module": OrderedDict(), "buffer_names": [], "param_shapes": groups, "step": 1,
                        "batches_consumed": 1, "skipped": {}, "model_config": cfg.to_dict(), "tensor_parallel": tp,
                        "lr_scheduler": {"last_epoch": 1}},
                       os.path.join(tag, f"zero_pp_rank_{d}_mp_rank_{t:02d}_model_states.pt"))
            # Seeded by the DP rank only: TP peers get identical flats, so replicated parameters agree
            # across TP (the converter checks it); values are otherwise irrelevant here.
            gen = torch.Generator().manual_seed(d)
            flat = [torch.randn(n, generator=gen) for n in per_group]
            state = {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(n), "exp_avg_sq": torch.zeros(n)}
                     for i, n in enumerate(per_group)} if moments else {}
            torch.save({"optimizer_state_dict": {"zero_stage": 3, "partition_count": dp, "fp32_flat_groups": flat,
                                                 "optimizer_state_dict": {"state": state, "param_groups": []}}},
                       os.path.join(tag, f"bf16_zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt"))
            del flat, state
    total = sum(torch.Size(s).numel() for s in full.values())
    return {"params": total, "fp32_bytes": 4 * total, "largest_tensor_bytes": 4 * max(torch.Size(s).numel()
                                                                                       for s in full.values())}


def _status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def measure(cmd):
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    done = threading.Event()

    def poll():
        while not done.is_set():
            s = _status(proc.pid)
            for k in peaks:
                peaks[k] = max(peaks[k], s.get(k, 0))
            time.sleep(0.05)
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    start = time.time()
    output = proc.communicate()[0]
    done.set()
    thread.join()
    return proc.returncode, time.time() - start, peaks, output


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit_h14")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the blocks kept (tensor shapes unchanged)")
    p.add_argument("--moments", action="store_true", help="also store Adam moments (3x the disk, as real files)")
    p.add_argument("--vocab-size", type=int, default=49408)
    p.add_argument("--workdir", default=None, help="where to write (default: a temp dir, removed afterwards)")
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)

    from rils_scale.models import get_config
    cfg = get_config(args.preset)
    cfg.text.vocab_size = args.vocab_size
    cfg.vision.depth = max(1, round(cfg.vision.depth * args.scale))
    cfg.text.depth = max(1, round(cfg.text.depth * args.scale))
    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(work)) if args.workdir else work).free
        est = _estimate_bytes(cfg) * (3 if args.moments else 1) * 2  # checkpoint + export
        if est > 0.8 * free:
            raise SystemExit(f"needs ~{est / 2**30:.1f} GiB of disk, {free / 2**30:.1f} GiB free: lower --scale")
        with open("/proc/meminfo") as f:
            avail = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable"))
        t0 = time.time()
        info = write_synthetic(os.path.join(work, "run"), cfg, args.tp, args.dp, args.moments)
        write_s = time.time() - t0
        out = os.path.join(work, "export")
        code, secs, peaks, log = measure([sys.executable, os.path.join(REPO, "launchers", "convert_checkpoint.py"),
                                          "--checkpoint", os.path.join(work, "run"), "--format", "rils",
                                          "--output", out, "--tokenizer", os.devnull])
        if code != 0:
            print(log)
            raise SystemExit(f"converter failed with exit code {code}")
        gib = 2 ** 30
        result = {"preset": args.preset, "scale": args.scale, "vision_depth": cfg.vision.depth,
                  "text_depth": cfg.text.depth, "tp": args.tp, "dp": args.dp, "moments": args.moments,
                  "params": info["params"], "model_fp32_gib": info["fp32_bytes"] / gib,
                  "largest_tensor_gib": info["largest_tensor_bytes"] / gib,
                  "peak_rss_gib": peaks["VmHWM"] / gib, "peak_anon_gib": peaks["RssAnon"] / gib,
                  "peak_file_gib": peaks["RssFile"] / gib, "convert_s": secs, "write_s": write_s,
                  "mem_available_gib": avail / gib}
        rows = [("model", f"{args.preset} (depth {cfg.vision.depth}/{cfg.text.depth}), TP={args.tp} x DP={args.dp}"),
                ("parameters", f"{info['params'] / 1e6:.0f} M"),
                ("fp32 model size", f"{result['model_fp32_gib']:.2f} GiB"),
                ("largest tensor", f"{result['largest_tensor_gib'] * 1024:.0f} MiB"),
                ("converter peak RSS (VmHWM)", f"{result['peak_rss_gib']:.2f} GiB "
                                               f"({100 * peaks['VmHWM'] / info['fp32_bytes']:.0f}% of the model)"),
                ("  peak anonymous", f"{result['peak_anon_gib']:.2f} GiB"),
                ("  peak file-backed (mmap)", f"{result['peak_file_gib']:.2f} GiB"),
                ("conversion time", f"{secs:.1f} s (writing the synthetic checkpoint: {write_s:.1f} s)")]
        width = max(len(r[0]) for r in rows)
        print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return result
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _estimate_bytes(cfg):
    import torch
    return 4 * sum(torch.Size(s).numel() for s in _full_shapes(cfg).values())


if __name__ == "__main__":
    main()
