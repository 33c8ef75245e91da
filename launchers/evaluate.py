#!/usr/bin/env python
"""Evaluate a RILS model: zero-shot classification, image-text retrieval, linear probe, k-shot,
localisation.

    # a built-in dataset (make_shards.py --builtin); if DIR holds none it is written first: the
    # dataset named by --builtin-name, else by DIR's name (data/shapes -> shapes), else scenes
    python launchers/evaluate.py --model runs/tiny --builtin data/shapes --output results.json
    # your own data: labelled shards (KEY.json: label, class_name) or ImageFolder directories
    python launchers/evaluate.py --model exports/b16 --data val_shards/ --train-data train_shards/ \\
        --class-names classes.txt --templates templates.txt --output results.json
    # a CLIP_benchmark set (make_shards.py --layout clip_benchmark): its class names, templates
    # and train split are read from the folder
    python launchers/evaluate.py --model exports/b16 --data data/wds_mine --output results.json

--model takes an exported rils directory or a training run / checkpoint directory (consolidated
on the fly). Without --tasks, every task the data allows runs and the others are reported as
left out, with the reason (zero-shot: labels + class names; retrieval: captions; linear probe and
k-shot: labelled --train-data; localisation: object masks); a task named in --tasks that cannot
run is an error. Samples the readers skip are counted by reason (printed, and in the JSON's
skipped_samples). Prints a table and, with --output, writes every number as JSON.
Exit status: 0 on success, 2 on bad arguments, 1 when evaluation fails.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TASK_CHOICES = ("zero_shot", "retrieval", "linear_probe", "few_shot", "localization")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="rils export dir, or run / checkpoints / tag dir")
    p.add_argument("--tag", default=None, help="checkpoint tag when --model is a DeepSpeed run (default: latest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--builtin", metavar="DIR", help="built-in dataset (make_shards.py --builtin): DIR/heldout is "
                     "evaluated, DIR/train feeds the probe and k-shot, DIR/classes.json gives class names and "
                     "prompts; written first (see --builtin-name) if DIR holds no dataset")
    p.add_argument("--builtin-name", default=None, choices=("scenes", "shapes", "digits"),
                   help="which built-in dataset --builtin writes when DIR holds none (default: the one DIR's "
                        "name names, e.g. data/shapes -> shapes; else scenes)")
    src.add_argument("--data", help="evaluation shards (dir / brace pattern), an ImageFolder root, or a "
                     "CLIP_benchmark set (make_shards.py --layout clip_benchmark: the folder or one split)")
    p.add_argument("--train-data", help="labelled training shards or ImageFolder (linear probe, k-shot)")
    p.add_argument("--tasks", nargs="+", default=None, choices=TASK_CHOICES,
                   help="tasks to run (default: every one the data allows; the others are listed as left out)")
    p.add_argument("--class-names", help="text file, one class name per line (line i = label i)")
    p.add_argument("--templates", help="text file, one prompt template per line with {} for the class name")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="k of k-shot")
    p.add_argument("--seeds", type=int, default=3, help="k-shot draws per k")
    p.add_argument("--few-shot-method", choices=("ncm", "logreg"), default="ncm",
                   help="nearest class mean or logistic regression on the k x classes samples")
    p.add_argument("--probe-features", choices=("encoder", "joint"), default="encoder",
                   help="features of the linear probe and k-shot: encoder (pooled, final-normed, before the "
                        "projection, as the paper's tables) or joint (the projected image-text embedding)")
    p.add_argument("--probe-c", type=float, default=None, help="fix the probe's C (default: chosen on a val split)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-samples", type=int, default=0, help="cap on evaluation images (0: all)")
    p.add_argument("--max-train-samples", type=int, default=0, help="cap on training images (0: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", help="write results JSON here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from rils_scale.checkpoint.layout import CheckpointError
    from rils_scale.checkpoint.load import load_model
    from rils_scale.eval.runner import builtin_paths, evaluate, format_table, read_lines

    if args.seeds < 1 or any(k < 1 for k in args.shots):
        print("evaluate.py: error: --seeds and --shots must be >= 1", file=sys.stderr)
        return 2
    try:
        model = load_model(args.model, device=args.device, tag=args.tag)
        opts = {"data": args.data, "train_data": args.train_data, "class_names": None, "templates": None}
        if args.builtin:
            opts.update(builtin_paths(args.builtin, model.cfg.vision.image_size, args.builtin_name))
        if args.class_names:
            opts["class_names"] = read_lines(args.class_names)
        if args.templates:
            opts["templates"] = read_lines(args.templates)
        torch.set_grad_enabled(False)
        results = evaluate(model, tasks=args.tasks, shots=args.shots, seeds=list(range(args.seeds)),
                           few_shot_method=args.few_shot_method, probe_c=args.probe_c, batch_size=args.batch_size,
                           probe_features=args.probe_features,
                           max_samples=args.max_samples, max_train_samples=args.max_train_samples, **opts)
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 1
    results["model"] = {"path": os.path.abspath(args.model), **getattr(model, "source", {})}
    print(format_table(results))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
        print(f"[evaluate] wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
