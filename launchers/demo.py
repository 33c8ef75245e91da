#!/usr/bin/env python
"""The built-in default: a tiny RILS pre-training run on bundled data, on CPU, in minutes.

    python launchers/demo.py                      # runs/demo: shards, tokenizer, training, evaluation

Steps (each one a command you can also run by hand; the demo prints them):
  1. write the built-in `scenes` dataset as tar shards (train + held-out; 2-3 objects per
     image, captions naming them, per-object masks in each sample's JSON)
  2. train a SentencePiece tokenizer on the training captions
  3. pre-train the `tiny` preset with `deepspeed --num_gpus 2 launchers/pretrain.py
     --ds_config ds_configs/zero3.json` (two CPU ranks: ZeRO-3 over gloo; fp32 unless the CPU
     has native bf16, see `rils_scale/train/precision.py`)
  4. convert the DeepSpeed checkpoint to the `rils` format
  5. evaluate held-out zero-shot classification, localisation (the fraction of each object's
     patches whose most similar phrase, among the image's object phrases, is its own), and
     retrieval, linear probe, k-shot
  6. draw patch-sentence maps for a few held-out images against their objects' phrases and
     their background ("the black background")
and ends with a table and `runs/demo/summary.json` (`zeroshot_top1`, `localization`, `chance`, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/demo", help="demo directory (data/, run/, exported/, summary.json)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--ranks", type=int, default=2, help="CPU ranks started by the deepspeed launcher")
    p.add_argument("--micro-batch", type=int, default=32, help="images per rank per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--dataset", choices=("scenes", "shapes", "digits"), default="scenes",
                   help="built-in dataset: scenes (several objects per image, localisation scored), "
                        "shapes (one object per image) or digits")
    p.add_argument("--ds-config", default=os.path.join(REPO, "ds_configs", "zero3.json"))
    p.add_argument("--fresh", action="store_true", help="delete an earlier run in --output first")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_gpu() -> bool:
    import shutil
    return shutil.which("nvidia-smi") is not None


def run(cmd, title):
    print(f"\n==> {title}\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not _has_gpu():
        env.setdefault("DS_ACCELERATOR", "cpu")  # say it, rather than have every rank warn about it
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"demo step failed ({title}): exit status {proc.returncode}")
    return time.time() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    out = os.path.abspath(args.output)
    data, run_dir, exported = (os.path.join(out, d) for d in ("data", "run", "exported"))
    if args.fresh and os.path.exists(out):
        import shutil
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    timings = {}

    if not os.path.exists(os.path.join(data, "classes.json")):
        timings["shards"] = run([py, "launchers/make_shards.py", "--builtin", args.dataset, "--output", data],
                                f"1/6 built-in dataset '{args.dataset}' as tar shards")
    tok = os.path.join(data, "tokenizer")
    if not os.path.exists(tok + ".model"):
        timings["tokenizer"] = run([py, "launchers/train_tokenizer.py", "--input", os.path.join(data, "train"),
                                    "--vocab-size", "256", "--output", tok], "2/6 SentencePiece tokenizer")
    timings["pretrain"] = run([
        "deepspeed", "--log_level", "warning", "--master_port", str(_free_port()), "--num_gpus", str(args.ranks),
        "launchers/pretrain.py",
        "--ds_config", args.ds_config, "--model", "tiny", "--train-data", os.path.join(data, "train"),
        "--tokenizer", tok + ".model", "--output-dir", run_dir, "--max-steps", str(args.steps),
        "--warmup-steps", str(max(1, args.steps // 10)), "--lr", str(args.lr), "--weight-decay", "0.1",
        "--micro-batch-size", str(args.micro_batch), "--num-workers", "1", "--log-every", "25",
        "--save-every", str(args.steps), "--resume", "--visualize-every", str(max(1, args.steps // 3))],
        f"3/6 pre-training (tiny preset, {args.ranks} CPU ranks, ZeRO-3)")
    timings["convert"] = run([py, "launchers/convert_checkpoint.py", "--checkpoint", run_dir, "--format", "rils",
                              "--output", exported, "--overwrite"], "4/6 checkpoint -> rils format")
    results_path = os.path.join(out, "eval.json")
    timings["evaluate"] = run([py, "launchers/evaluate.py", "--model", exported, "--builtin", data,
                               "--output", results_path], "5/6 held-out evaluation")
    maps = os.path.join(out, "patch_sentence_maps.png")
    objects = (["--object-phrases", "--background-phrase", "the {} background", "--num", "6"]
               if args.dataset == "scenes" else ["--num", "4"])
    timings["visualize"] = run([py, "launchers/visualize.py", "--model", exported, "--shards",
                                os.path.join(data, "heldout"), *objects, "--output", maps],
                               "6/6 patch-sentence maps")

    with open(results_path) as f:
        results = json.load(f)  # launchers/evaluate.py's JSON (docs/evaluation.md)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [r for r in map(json.loads, filter(str.strip, f)) if "event" not in r]  # step rows only
    tasks = results["tasks"]
    zs = tasks["zero_shot"]
    summary = {
        "dataset": args.dataset, "model": "tiny", "steps": metrics[-1]["step"], "ranks": args.ranks,
        "zeroshot_top1": zs["top1"], "zeroshot_top5": zs.get("top5"), "chance": zs["chance_top1"],
        "num_classes": zs["num_classes"], "num_heldout": zs["num_images"],
        "retrieval_image_to_text_r1": tasks.get("retrieval", {}).get("image_to_text", {}).get("R@1"),
        "retrieval_chance_r1": tasks.get("retrieval", {}).get("chance", {}).get("R@1"),
        "linear_probe_top1": tasks.get("linear_probe", {}).get("top1"),
        "kshot_16_top1": tasks.get("few_shot", {}).get("shots", {}).get("16", {}).get("mean"),
        "probe_features": tasks.get("linear_probe", {}).get("features"),
        "localization": tasks.get("localization", {}).get("accuracy"),
        "localization_chance": tasks.get("localization", {}).get("chance"),
        "final_loss": metrics[-1]["loss"], "first_loss": metrics[0]["loss"],
        "final_clip_acc": metrics[-1]["clip_acc"], "samples_per_s": metrics[-1]["samples_per_s"],
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "run_dir": run_dir, "exported": exported, "patch_sentence_maps": maps,
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    rows = [("zero-shot top-1", zs["top1"], zs["chance_top1"]), ("zero-shot top-5", zs.get("top5"), min(1.0, 5 / zs["num_classes"])),
            ("image->text R@1", summary["retrieval_image_to_text_r1"], summary["retrieval_chance_r1"]),
            ("linear probe top-1", summary["linear_probe_top1"], zs["chance_top1"]),
            ("16-shot top-1", summary["kshot_16_top1"], zs["chance_top1"]),
            ("localization", summary["localization"], summary["localization_chance"])]
    print(f"\nheld-out evaluation of the demo model ({summary['num_classes']} classes, "
          f"{summary['num_heldout']} images, {summary['steps']} steps)")
    print(f"{'metric':<22}{'value':>8}{'chance':>9}")
    for name, value, chance in rows:
        if value is not None:
            print(f"{name:<22}{value:>8.3f}{'' if chance is None else f'{chance:9.3f}'}")
    print(f"\ntraining loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}; "
          f"zero-shot is {zs['top1'] / zs['chance_top1']:.1f}x chance")
    if summary["localization"] is not None:
        print(f"localisation: {100 * summary['localization']:.1f}% of each object's patches go to its own phrase "
              f"(chance {100 * summary['localization_chance']:.1f}%); probe/k-shot on {summary['probe_features']} "
              "features")
    print(f"summary: {os.path.join(out, 'summary.json')}\npatch-sentence maps: {maps}\n"
          f"TensorBoard: tensorboard --logdir {run_dir}/tensorboard")
    return 0


if __name__ == "__main__":
    sys.exit(main())
