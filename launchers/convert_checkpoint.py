#!/usr/bin/env python
"""Convert a RILS training checkpoint (DeepSpeed, any ZeRO stage x TP x DP, fp32 or bf16).

    # single-process model for rils_scale.load_model / evaluate.py
    python launchers/convert_checkpoint.py --checkpoint runs/b16 --format rils --output exports/b16
    # the vision encoder for timm: timm.create_model("local-dir:exports/b16_timm", pretrained=True)
    python launchers/convert_checkpoint.py --checkpoint runs/b16 --format timm --output exports/b16_timm
    # image + text towers for OpenCLIP / CLIP_benchmark: open_clip.create_model_and_transforms(
    #   "local-dir:exports/b16_openclip"), open_clip.get_tokenizer("local-dir:exports/b16_openclip")
    python launchers/convert_checkpoint.py --checkpoint runs/b16 --format open_clip --output exports/b16_openclip
    # a checkpoint for another tensor-parallel size (and any DP size), Adam moments included; then
    #   deepspeed launchers/pretrain.py ... --tensor-parallel 4 --output-dir runs/b16_tp4 --resume
    python launchers/convert_checkpoint.py --checkpoint runs/b16 --format deepspeed \\
        --tensor-parallel 4 --output runs/b16_tp4
    # a --recipe semmim run: its momentum encoder instead of the online one (any of rils/timm/open_clip)
    python launchers/convert_checkpoint.py --checkpoint runs/semmim --which teacher --format timm --output exports/t

--format deepspeed writes tp_rank_XX.safetensors (+ _optim) shards that DeepSpeed's own
load_checkpoint cannot read: continue training with pretrain.py --output-dir OUT --resume
(rils_scale loads them into any ZeRO stage and DP size; the global batch may change with the
DP size, and the resume says so).

--checkpoint takes a run directory, its checkpoints/ directory, one tag directory
(checkpoints/global_stepN) or, for --format timm/open_clip/deepspeed, an exported rils directory.
Streams tensor by tensor: peak memory is about one tensor plus a bounded read window.
Exit status: 0 on success, 2 on bad arguments, 1 when the checkpoint cannot be converted.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir, tag dir, or rils export dir")
    p.add_argument("--format", required=True, choices=("rils", "timm", "open_clip", "deepspeed"),
                   help="output format; deepspeed: shards for pretrain.py --output-dir OUT --resume (not readable "
                        "by DeepSpeed's own load_checkpoint)")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. global_step2000 (default: 'latest')")
    p.add_argument("--tensor-parallel", type=int, default=None,
                   help="TP size of the --format deepspeed output (required for that format)")
    p.add_argument("--vision-tower", default="auto", choices=("auto", "native", "timm"),
                   help="--format open_clip: OpenCLIP's own ViT (native), a timm trunk (timm), or native unless "
                        "the towers' activations differ (auto; OpenCLIP has one quick_gelu flag). A timm trunk is "
                        "named by its timm architecture when one has the encoder's shape (presets small and up: "
                        "the folder is relocatable), else by the absolute path of OUT/timm_trunk (see "
                        "docs/checkpoints.md)")
    p.add_argument("--which", default="student", choices=("student", "teacher"),
                   help="--recipe semmim runs: export the online model (student, default) or, in its place, the "
                        "momentum encoder (teacher: vision encoder, text-fusion block and code head are the EMA "
                        "weights; projections and text tower stay the student's); rils / timm / open_clip formats")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model to ship (default: the run's copy)")
    p.add_argument("--replica-tolerance", type=float, default=0.0,
                   help="max abs difference accepted between TP copies of a replicated parameter "
                        "(default 0: bit-identical, as a correct TP run produces)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="if the restricted unpickler refuses a DeepSpeed file, unpickle it fully "
                        "(only for checkpoints you produced yourself)")
    carry = p.add_mutually_exclusive_group()
    carry.add_argument("--with-optimizer", dest="with_optimizer", action="store_true", default=None,
                       help="--format deepspeed: also carry both Adam moments and Adam's step (default whenever the "
                            "source holds them: ZeRO-3 checkpoints), for an exact elastic resume on another DP x TP")
    carry.add_argument("--weights-only", dest="with_optimizer", action="store_false",
                       help="--format deepspeed: weights, step and schedule only; Adam restarts from zero moments")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.format == "deepspeed" and args.tensor_parallel is None:
        parser.error("--format deepspeed needs --tensor-parallel N")
    if args.format != "deepspeed" and args.tensor_parallel is not None:
        parser.error("--tensor-parallel only applies to --format deepspeed")
    if args.format != "deepspeed" and args.with_optimizer is not None:
        parser.error("--with-optimizer / --weights-only only apply to --format deepspeed")
    if args.format == "deepspeed" and args.which != "student":
        parser.error("--which teacher applies to the rils, timm and open_clip formats (a training checkpoint "
                     "already carries both)")
    from rils_scale.checkpoint.export import export
    from rils_scale.checkpoint.layout import CheckpointError
    from rils_scale.checkpoint.teacher_view import select_weights
    from rils_scale.checkpoint.sources import open_source

    start = time.time()
    try:
        source = select_weights(open_source(args.checkpoint, args.tag, trusted=args.trust_pickle,
                                            replica_tolerance=args.replica_tolerance), args.which)
        info = source.describe()
        print(f"[convert] reading {info.get('path', args.checkpoint)} ({info.get('layout', 'rils')}, "
              f"TP={info.get('tensor_parallel', 1)}, DP={info.get('data_parallel', 1)}, step {info.get('step')}); "
              f"model {source.model_config.name}", flush=True)
        written = export(source, args.format, args.output, tensor_parallel=args.tensor_parallel or 1,
                         tokenizer=args.tokenizer, overwrite=args.overwrite, vision_tower=args.vision_tower,
                         with_optimizer=args.with_optimizer)
    except (CheckpointError, OSError, ValueError, RuntimeError) as err:  # named by the readers: no traceback
        print(f"convert_checkpoint.py: error: {err}", file=sys.stderr)
        return 1
    warning = written.pop("warning", None)
    for key, value in written.items():
        print(f"[convert] wrote {key}: {value}")
    if warning:
        print(f"[convert] warning: {warning}", file=sys.stderr)
    print(f"[convert] {args.format} export done in {time.time() - start:.1f}s -> {os.path.abspath(args.output)}")
    if args.format == "deepspeed":
        print(f"[convert] continue training with: deepspeed --num_gpus G launchers/pretrain.py ... --tensor-parallel "
              f"{args.tensor_parallel} --output-dir {args.output} --resume (DeepSpeed's own load_checkpoint cannot "
              "read these shards)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
