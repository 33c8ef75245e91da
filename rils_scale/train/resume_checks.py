"""What a resume changes that the user should hear about before the first step.

After ``convert_checkpoint.py --format deepspeed --tensor-parallel N`` (a reshard) or a launch
on another number of GPUs, the data-parallel size -- and with it the global batch, micro x
accumulation x DP -- usually changes. Training continues correctly (the step count, schedule and
data position carry over), but every step from then on sees another number of samples, which
changes the effective learning rate; the start-up line shows the new batch, this says it changed.
"""
from __future__ import annotations

import json
import os
from typing import Optional


def global_batch_change(run_dir: str, micro: int, accum: int, dp: int, step: int) -> Optional[str]:
    """A one-line warning when the global batch differs from the one recorded in ``run_dir``'s
    ``config.json`` (the run, or the run a converted checkpoint came from); None otherwise."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            before = json.load(f)
        old = int(before["global_batch_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # nothing recorded: nothing to compare
    new = micro * accum * dp
    if old == new:
        return None
    ds, parallel = before.get("deepspeed", {}), before.get("parallel", {})
    was = (f"micro {ds.get('train_micro_batch_size_per_gpu', '?')} x accumulation "
           f"{ds.get('gradient_accumulation_steps', '?')} x DP {parallel.get('data_parallel', '?')}")
    return (f"[rils_scale] warning: the global batch changes from {old} ({was}) to {new} (micro {micro} x "
            f"accumulation {accum} x DP {dp}) at step {step}: each step from here sees {new} samples; keep {old} "
            "with --micro-batch-size / --grad-accum, or scale --lr")
