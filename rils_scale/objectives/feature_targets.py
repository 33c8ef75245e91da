"""The paper's two baselines for the masked-modelling target, in the same row bookkeeping as
the language-space loss (reconstruction.py): masked patch positions only, a mean over the
kept rows of the global batch, scaled by the DP size for DeepSpeed's gradient averaging.

- ``pixel`` (MAE): ``mean_rows mean_dims (prediction - normalised pixels)^2``.
- ``vision`` (a high-level vision-space target, no text prototypes): the unmasked pass's
  final-normed patch features as stop-gradient teacher, loss ``|| s/|s| - t/|t| ||^2 =
  2 - 2 cos(s, t)`` per row (a normalised regression, as BEiT-v2 / MaskFeat-style feature
  targets; scale-free, so its weight is comparable to the KL's).

Every TP rank holds the full rows (they are replicated after the decoder) and computes the
same loss; these losses are cheap (no ``P x M`` products), so there is no TP row split.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .reconstruction import ReconstructionOutput, global_mean
from .rows import candidate_rows

FEATURE_TARGETS = ("pixel", "vision")


def per_row_loss(student_rows: torch.Tensor, teacher_rows: torch.Tensor, target: str) -> torch.Tensor:
    """``[R, F]`` predictions and targets -> ``[R]`` losses (float32 or wider)."""
    s = student_rows.float() if student_rows.dtype in (torch.float16, torch.bfloat16) else student_rows
    t = teacher_rows.detach().to(s.dtype)
    if target == "pixel":
        return (s - t).pow(2).mean(dim=-1)
    if target == "vision":
        return (F.normalize(s, dim=-1) - F.normalize(t, dim=-1)).pow(2).sum(dim=-1)
    raise ValueError(f"unknown feature target {target!r}; choose from {FEATURE_TARGETS}")


class FeatureReconstructionLoss(torch.nn.Module):
    def __init__(self, target: str, dp_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        if target not in FEATURE_TARGETS:
            raise ValueError(f"unknown feature target {target!r}; choose from {FEATURE_TARGETS}")
        self.target, self.dp_group = target, dp_group

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                keep: torch.Tensor, masked_ids: Optional[torch.Tensor] = None) -> ReconstructionOutput:
        """``student``/``teacher`` ``[B, N, F]``, ``mask`` ``[B, N]`` (1 = masked), ``keep`` ``[B]``,
        ``masked_ids`` ``[B, K]`` (optional: the masked positions, see :func:`.rows.candidate_rows`)."""
        idx, counted = candidate_rows(mask, keep, masked_ids)  # fixed-size rows: no host sync
        f = student.shape[-1]
        losses = per_row_loss(student.reshape(-1, f).index_select(0, idx),
                              teacher.reshape(-1, f).index_select(0, idx), self.target)
        rows = counted.sum()
        loss, global_rows = global_mean(torch.where(counted, losses, 0).sum(), rows, self.dp_group)
        return ReconstructionOutput(loss, rows, global_rows)
