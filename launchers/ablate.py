#!/usr/bin/env python
"""The paper's ablations in one command: train variants for the same steps and seeds,
evaluate each, write a table (mean ± std over seeds, paired t-test against RILS).

    python launchers/ablate.py --output runs/ablate --steps 150 --seeds 0 1 2 \\
        --results docs/results.md

Variants (``--variants``, default all):
  rils          RILS as in the paper (language-space target, random masking)
  clip          contrastive only (--recon-weight 0)
  rils_tgm      RILS + text-guided masking (SemMIM)
  pixel         pixel-space target (MAE normalised pixels) instead of the language space
  vision        vision-space target (the unmasked pass's patch features, no text prototypes)
  rils_textdec  RILS + text-conditioned decoder (SemMIM's text injection)
  semmim        the SemMIM recipe (--recipe semmim: momentum encoder, K-code targets with text
                injection, agreement of global features, text-guided masking, text-conditioned decoder)
  semmim_no_text_targets   SemMIM without text injection in the targets (--no-target-text-injection)
  semmim_no_agreement      SemMIM without agreement learning (--agreement-weight 0)

Every run uses the built-in ``scenes`` data (written once), one tokenizer, the ``tiny``
preset, one CPU rank in fp32 with ZeRO-2 (a plain ``python launchers/pretrain.py`` with the rank set in
the environment: the deepspeed launcher would add nothing on one rank), and the seed for
weights, masks and data order; variants with the same seed form a pair. Each run is
evaluated on the held-out split: zero-shot top-1 (30 classes), localisation (fraction of each
object's patches whose most similar phrase is its own; chance 1/objects), linear probe on
encoder features (C fixed, ``--probe-c``). Finished runs are reused (their ``eval.json``), so
an interrupted ablation continues where it stopped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

VARIANTS = {
    "rils": [],
    "clip": ["--recon-weight", "0"],
    "rils_tgm": ["--mask-strategy", "text-guided"],
    "pixel": ["--recon-target", "pixel"],
    "vision": ["--recon-target", "vision"],
    "rils_textdec": ["--decoder-text-conditioning"],
    "semmim": ["--recipe", "semmim"],
    "semmim_no_text_targets": ["--recipe", "semmim", "--no-target-text-injection"],
    "semmim_no_agreement": ["--recipe", "semmim", "--agreement-weight", "0"],
}
SEMMIM_EMA = "0.9"
"""--ema-momentum of the SemMIM runs here: DINO's 0.996 averages over ~250 steps, longer than a
whole 150-step ablation run (the teacher would stay at its initialisation); 0.9 averages over
~10 steps, a few per cent of the run, as 0.996 is of a long run."""
for _name, _args in VARIANTS.items():
    if _name.startswith("semmim"):
        _args += ["--ema-momentum", SEMMIM_EMA]
TEACHER = "semmim_teacher"
"""Not a run of its own: the momentum encoder of each ``semmim`` run, evaluated in the student's place."""
DESCRIPTIONS = {
    "rils": "RILS (language-space target)", "clip": "CLIP only (recon weight 0)",
    "rils_tgm": "RILS + text-guided masking", "pixel": "pixel-space target (MAE)",
    "vision": "vision-space target", "rils_textdec": "RILS + text-conditioned decoder",
    "semmim": "SemMIM (full)", "semmim_no_text_targets": "SemMIM w/o text injection in targets",
    "semmim_no_agreement": "SemMIM w/o agreement learning", TEACHER: "SemMIM (full), momentum encoder",
}
METRICS = (("zero_shot", "zero-shot top-1"), ("localization", "localisation"), ("linear_probe", "linear probe top-1"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/ablate", help="data/, one run directory per variant and seed, results.json")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="runs to train (semmim also reports its momentum encoder as semmim_teacher)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    p.add_argument("--micro-batch", type=int, default=32, help="images per step (one rank)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--probe-c", type=float, default=1.0, help="inverse regularisation of the linear probe (fixed)")
    p.add_argument("--ds-config", default=os.path.join(REPO, "ds_configs", "zero2.json"),
                   help="DeepSpeed config (ZeRO-2: on one rank ZeRO-3's per-module gathers only cost time)")
    p.add_argument("--results", default=None, help="also write the table as markdown here (e.g. docs/results.md)")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, log_path, env_extra=None):
    # One OpenMP thread unless told otherwise: on a shared CPU box, 2 threads per rank spinning
    # against other jobs ran 10x slower here (2.6-7.6 vs 31-66 samples/s, measured 2026-12-02).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env_extra or {})}
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"ablate: command failed (exit {proc.returncode}), see {log_path}:\n  "
                         + " ".join(shlex.quote(c) for c in cmd))


def prepare_data(out: str):
    data = os.path.join(out, "data")
    py = sys.executable
    if not os.path.exists(os.path.join(data, "classes.json")):
        os.makedirs(out, exist_ok=True)
        _run([py, "launchers/make_shards.py", "--builtin", "scenes", "--output", data], os.path.join(out, "data.log"))
    tok = os.path.join(data, "tokenizer")
    if not os.path.exists(tok + ".model"):
        _run([py, "launchers/train_tokenizer.py", "--input", os.path.join(data, "train"), "--vocab-size", "256",
              "--output", tok], os.path.join(out, "tokenizer.log"))
    return data, tok + ".model"


def train_and_evaluate(args, variant: str, seed: int, data: str, tokenizer: str) -> dict:
    run_dir = os.path.join(os.path.abspath(args.output), f"{variant}_seed{seed}_steps{args.steps}_batch{args.micro_batch}")
    result_path = os.path.join(run_dir, "eval.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    os.makedirs(run_dir, exist_ok=True)
    t0 = time.time()
    cmd = [sys.executable, "launchers/pretrain.py", "--ds_config", args.ds_config, "--precision", "fp32",
           "--model", "tiny", "--train-data", os.path.join(data, "train"), "--tokenizer", tokenizer,
           "--output-dir", run_dir, "--max-steps", str(args.steps), "--warmup-steps", str(max(1, args.steps // 10)),
           "--lr", str(args.lr), "--weight-decay", "0.1", "--micro-batch-size", str(args.micro_batch),
           "--num-workers", "1", "--log-every", str(max(1, args.steps // 4)), "--save-every", str(args.steps),
           "--seed", str(seed), "--resume", *VARIANTS[variant]]
    _run(cmd, os.path.join(run_dir, "train.log"), {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                                                     "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                                                     "MASTER_PORT": str(_free_port())})
    train_s = time.time() - t0

    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from rils_scale.checkpoint.load import load_model
    torch.set_grad_enabled(False)
    model = load_model(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        last = [r for r in map(json.loads, filter(str.strip, f)) if "event" not in r][-1]  # no event rows
    out = {"variant": variant, "seed": seed, "steps": last["step"], "train_seconds": round(train_s, 1),
           **_evaluate(args, model, data), "final_clip_loss": last["clip_loss"], "final_recon_loss": last["recon_loss"]}
    for key in ("code_ppl_patch", "code_ppl_global", "code_row_ppl_patch", "agreement_loss"):
        if key in last:  # SemMIM's collapse check at the end of training
            out[f"final_{key}"] = last[key]
    if variant == "semmim":  # its momentum encoder in the student's place (convert_checkpoint.py --which teacher)
        model.visual.load_state_dict(model.momentum.visual.state_dict())
        out[TEACHER] = _evaluate(args, model, data)
    with open(result_path, "w") as f:
        json.dump(out, f, indent=1)
    return out


def _evaluate(args, model, data) -> dict:
    from rils_scale.eval.runner import builtin_paths, evaluate
    opts = builtin_paths(data, model.cfg.vision.image_size, "scenes")
    res = evaluate(model, tasks=["zero_shot", "localization", "linear_probe"], probe_c=args.probe_c,
                   log=lambda *_: None, **opts)["tasks"]
    return {"zero_shot": res["zero_shot"]["top1"], "zero_shot_chance": res["zero_shot"]["chance_top1"],
            "localization": res["localization"]["accuracy"], "localization_chance": res["localization"]["chance"],
            "linear_probe": res["linear_probe"]["top1"]}


def table(results: list, variants, seeds, reference: str = "rils") -> str:
    """Mean ± std over seeds; Δ and p: paired against ``reference`` (same seeds)."""
    from rils_scale.eval.stats import mean_std, paired_t_test
    by = {(r["variant"], r["seed"]): r for r in results}
    for r in results:  # the momentum encoder of each semmim run, as a row of its own
        if TEACHER in r:
            by[(TEACHER, r["seed"])] = dict(r[TEACHER], variant=TEACHER, seed=r["seed"])
    ref = [by[(reference, s)] for s in seeds] if reference in variants else None
    head = "| variant | " + " | ".join(f"{name} (mean ± std)" for _, name in METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 1)]
    for v in variants:
        runs = [by[(v, s)] for s in seeds]
        cells = []
        for key, _ in METRICS:
            vals = [r[key] for r in runs]
            ms = mean_std(vals)
            cell = f"{100 * ms['mean']:.1f} ± {100 * ms['std']:.1f}"
            if ref is not None and v != reference:
                t = paired_t_test(vals, [r[key] for r in ref])
                p_text = "n/a: same Δ on every seed" if t["p"] != t["p"] else f"{t['p']:.3f}"
                cell += f" (Δ {100 * t['mean_diff']:+.1f}, p={p_text})"
            cells.append(cell)
        lines.append(f"| {DESCRIPTIONS[v]} | " + " | ".join(cells) + " |")
    chance = results[0]
    lines.append(f"| chance | {100 * chance['zero_shot_chance']:.1f} | {100 * chance['localization_chance']:.1f} | "
                 f"{100 * chance['zero_shot_chance']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    data, tokenizer = prepare_data(args.output)
    results, t0 = [], time.time()
    for seed in args.seeds:  # seed-major: an interrupted run leaves complete pairs behind
        for variant in args.variants:
            r = train_and_evaluate(args, variant, seed, data, tokenizer)
            results.append(r)
            print(f"[ablate] {variant:<13} seed {seed}: zero-shot {r['zero_shot']:.3f}  localisation "
                  f"{r['localization']:.3f}  probe {r['linear_probe']:.3f}  ({r['train_seconds']}s training)",
                  flush=True)
    md = table(results, args.variants + ([TEACHER] if "semmim" in args.variants else []), args.seeds)
    semmim_rows = [v for v in args.variants if v.startswith("semmim_")]
    if "semmim" in args.variants:
        md += ("\n\nSemMIM's parts, paired against SemMIM (full) on the same seeds:\n\n"
               + table(results, ["semmim", TEACHER] + semmim_rows, args.seeds, reference="semmim"))
    command = "python launchers/ablate.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump({"command": command, "results": results}, f, indent=1)
    print("\n" + md)
    print(f"\n[ablate] {len(results)} runs in {time.time() - t0:.0f}s")
    if args.results:
        header = (f"# Ablations\n\nCommand (from the repository root; {datetime.date.today().isoformat()}, "
                  f"2-core CPU dev box, shared):\n\n    {command}\n\n"
                  f"`tiny` preset, built-in `scenes` data (4000 train / 600 held-out images), {args.steps} steps of "
                  f"batch {args.micro_batch} on one CPU rank (fp32, ZeRO-2 config), seeds {args.seeds}. Percentages "
                  "on the held-out split; Δ is the mean paired difference to RILS over seeds and p a two-sided "
                  "paired t-test (df = seeds − 1). Linear probe on encoder features, C fixed at "
                  f"{args.probe_c}.\n\n")
        with open(args.results, "w") as f:
            f.write(header + md + "\n")
        print(f"[ablate] wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
