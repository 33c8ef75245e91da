"""Masked reconstruction in language space: the patch-sentence KL of RILS (DESIGN §1.6).

Rows that do not count are dropped *before* the KL: only masked patch positions of samples
whose image->text top-1 retrieval is correct. The mean is over all kept rows of the global
batch (a count all-reduced over DP), scaled so that DeepSpeed's DP gradient averaging yields
the gradient of that global mean. Under TP the kept rows are split across TP ranks (each
computes its share, the sums are all-reduced) instead of being computed TP times.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..ops import patch_sentence_kl
from ..parallel.comm import all_reduce_values
from ..parallel.mappings import (_size, copy_to_tensor_parallel_region,
                                 reduce_from_tensor_parallel_region, scatter_to_tensor_parallel_region)


@dataclass
class ReconstructionOutput:
    loss: torch.Tensor
    """Mean KL over the kept rows of the global batch (scaled by DP size for gradient averaging)."""
    rows: int
    """Kept rows on this DP rank."""
    global_rows: int
    """Kept rows in the global batch."""


class PatchSentenceReconstructionLoss(torch.nn.Module):
    def __init__(self, *, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 prototype_grad: bool = False, backend: str = "auto",
                 dp_group: Optional[dist.ProcessGroup] = None, tp_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.prototype_grad, self.backend = prototype_grad, backend
        self.dp_group, self.tp_group = dp_group, tp_group

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                keep: torch.Tensor, prototypes: torch.Tensor) -> ReconstructionOutput:
        """``student``/``teacher`` ``[B, N, E]``, ``mask`` ``[B, N]`` (1 = masked), ``keep`` ``[B]``
        bool, ``prototypes`` ``[M, E]`` (the global batch's text embeddings)."""
        selected = (mask > 0) & keep[:, None]
        idx = selected.flatten().nonzero().squeeze(1)
        rows = int(idx.numel())
        global_rows = int(all_reduce_values([rows], self.dp_group)[0])
        if global_rows == 0:  # nothing counts anywhere: keep the graph, contribute zero
            return ReconstructionOutput(student.sum() * 0.0, 0, 0)

        e = student.shape[-1]
        s_rows, t_rows = student.reshape(-1, e)[idx], teacher.detach().reshape(-1, e)[idx]
        protos = prototypes if self.prototype_grad else prototypes.detach()
        weights = torch.ones(rows, device=student.device, dtype=torch.float32)

        tp = _size(self.tp_group)
        if tp > 1:  # split rows over TP peers (padding rows carry weight 0)
            pad = (-rows) % tp
            if pad:
                s_rows = torch.cat([s_rows, s_rows.new_zeros(pad, e)])
                t_rows = torch.cat([t_rows, t_rows.new_zeros(pad, e)])
                weights = torch.cat([weights, weights.new_zeros(pad)])
            s_rows = scatter_to_tensor_parallel_region(s_rows, self.tp_group, dim=0)
            t_rows = scatter_to_tensor_parallel_region(t_rows, self.tp_group, dim=0)
            weights = scatter_to_tensor_parallel_region(weights, self.tp_group, dim=0)
            if self.prototype_grad:
                protos = copy_to_tensor_parallel_region(protos, self.tp_group)

        kl = patch_sentence_kl(s_rows, t_rows, protos, student_temp=self.student_temp,
                               teacher_temp=self.teacher_temp, backend=self.backend)
        total = reduce_from_tensor_parallel_region((kl * weights.to(kl.dtype)).sum(), self.tp_group)
        loss = total * (_size(self.dp_group) / global_rows)
        return ReconstructionOutput(loss, rows, global_rows)
