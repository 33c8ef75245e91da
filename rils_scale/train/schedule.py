"""Learning-rate schedule: linear warm-up then cosine decay to a floor."""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, warmup_steps: int, max_steps: int, min_factor: float) -> float:
    """Multiplier of the base lr at ``step`` (0-based: the lr used by the step-th update)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer, warmup_steps: int, max_steps: int, min_lr: float) -> LambdaLR:
    """One LambdaLR for all groups (weight-decay and no-decay groups share the base lr)."""
    base = optimizer.param_groups[0]["lr"]
    min_factor = min_lr / base if base > 0 else 0.0
    return LambdaLR(optimizer, lambda s: warmup_cosine_factor(s, warmup_steps, max_steps, min_factor))
