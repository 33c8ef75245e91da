"""Range checks of the training options, run by ``parse_args`` before any process group starts.

A value that cannot work should fail at once with the option's name, not minutes later inside a
collective or at step 1 (``--seed -1`` used to reach numpy's ``SeedSequence`` after ~17 s of
start-up: ``ValueError: expected non-negative integer``). Every problem is reported in one message.
"""
from __future__ import annotations

import math
from typing import List

SEED_MAX = 2 ** 32 - 1
"""Largest seed (numpy's and most tools' range; torch's generators take it too)."""

# option -> (minimum, strict): value must be > minimum when strict, >= minimum otherwise
_LOWER_BOUNDS = {
    "max_steps": (1, False), "warmup_steps": (0, False), "min_lr": (0.0, False), "lr": (0.0, False),
    "weight_decay": (0.0, False), "micro_batch_size": (1, False), "grad_accum": (1, False),
    "num_workers": (0, False), "shuffle_buffer": (0, False), "data_wait_warning_s": (0.0, False),
    "mask_temperature": (0.0, True), "recon_weight": (0.0, False), "student_temp": (0.0, True),
    "teacher_temp": (0.0, True), "tensor_parallel": (1, False), "log_every": (1, False),
    "save_every": (1, False), "keep_checkpoints": (0, False), "exit_after_steps": (0, False),
    "max_nonfinite_steps": (0, False), "collective_timeout_s": (0.0, True), "peak_tflops": (0.0, True),
    "visualize_every": (0, False),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def option_errors(cfg) -> List[str]:
    """Every out-of-range option of a ``TrainConfig``, as ``--flag VALUE: reason`` lines."""
    errors = []
    if not 0 <= cfg.seed <= SEED_MAX:
        errors.append(f"--seed {cfg.seed}: must be between 0 and {SEED_MAX}")
    for name, (low, strict) in _LOWER_BOUNDS.items():
        value = getattr(cfg, name)
        if value is None:  # an optional override left unset
            continue
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{_flag(name)} {value}: must be a finite number")
        elif value < low or (strict and value == low):
            errors.append(f"{_flag(name)} {value}: must be {'>' if strict else '>='} {low}")
    if not 0.0 < cfg.mask_ratio < 1.0:
        errors.append(f"--mask-ratio {cfg.mask_ratio}: must be strictly between 0 and 1 "
                      "(some patches masked, some visible)")
    return errors


def validate_options(cfg) -> None:
    """``SystemExit`` listing every out-of-range option (see :func:`option_errors`)."""
    errors = option_errors(cfg)
    if errors:
        raise SystemExit("invalid options:\n  " + "\n  ".join(errors))
