"""CLIP_benchmark's own evaluation, with the two fixes a small local set needs.

    python -m rils_scale.eval.clip_benchmark eval --model_type open_clip \\
        --model local-dir:exported/b16_openclip --dataset wds/mine --dataset_root data/wds_mine \\
        --task zeroshot_classification --no_amp --output mine.json

takes exactly the arguments of ``clip_benchmark eval`` (its own parser parses them) and runs
its ``main_eval``, after two changes that only matter where the stock command fails:

1. clip_benchmark 1.6.2's ``accuracy()`` converts a one-element array with ``float()``, a
   ``TypeError`` with numpy >= 2.4 (zero-shot classification and linear probe); the same
   formula with ``.item()`` replaces it.
2. For a local ``wds/`` dataset, ``--num_workers`` (default 4) is lowered to the split's shard
   count (``nshards.txt``): webdataset hands each DataLoader worker whole shards, and a worker
   left without one stops the run with "No samples found in dataset; perhaps you have fewer
   shards than workers". The line it prints says so.

clip_benchmark stays an optional (``[interop]``) dependency: nothing else in rils_scale imports
this module. ``build`` (clip_benchmark's CSV summary) passes through unchanged.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

PROG = "python -m rils_scale.eval.clip_benchmark"


def accuracy(output, target, topk=(1,)) -> List[float]:
    """clip_benchmark's top-k accuracy (``metrics.zeroshot_classification.accuracy``) without the
    numpy >= 2.4 ``float(array)`` error."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def split_shards(root: str, split: str) -> Optional[int]:
    """Shards of a local CLIP_benchmark webdataset split (its ``nshards.txt``), None if unknown."""
    if "://" in root:
        return None
    try:
        with open(os.path.join(root, split, "nshards.txt")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _workers_for_shards(run):
    """Wrap clip_benchmark's per-(model, dataset) ``run(args)``: at most one worker per shard."""
    def wrapped(args):
        if args.dataset.startswith("wds/") and not args.skip_load:
            name = args.dataset.replace("wds/", "", 1)
            root = args.dataset_root.format(dataset=name, dataset_cleaned=name.replace("/", "-"))
            splits = [args.split] + ([args.train_split] if args.task == "linear_probe" else [])
            counts = [(split_shards(root, s), s) for s in splits if isinstance(s, str)]
            counts = [(n, s) for n, s in counts if n is not None]
            if counts and args.num_workers > min(counts)[0]:
                shards, split = min(counts)
                print(f"[clip_benchmark] {root}: {shards} shard(s) in split {split!r}, so --num_workers {shards} "
                      f"instead of {args.num_workers} (webdataset gives each worker whole shards; a worker without "
                      "one fails)", flush=True)
                args.num_workers = shards
        return run(args)
    return wrapped


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("eval", "build"):
        args = ["eval"] + args  # `python -m rils_scale.eval.clip_benchmark --dataset ...` means eval
    try:
        from clip_benchmark import cli
        from clip_benchmark.metrics import linear_probe, zeroshot_classification
    except ImportError as err:
        print(f"{PROG}: error: needs clip_benchmark ({err}): pip install -e '.[interop]'", file=sys.stderr)
        return 2
    zeroshot_classification.accuracy = accuracy
    linear_probe.accuracy = accuracy  # it imported the name
    cli.run = _workers_for_shards(cli.run)
    saved = sys.argv
    sys.argv = [PROG] + args  # clip_benchmark's parser reads sys.argv
    try:
        cli.main()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
