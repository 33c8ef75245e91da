"""Masked reconstruction in language space: the patch-sentence KL of RILS (DESIGN §1.6).

Only masked patch positions of samples whose image->text top-1 retrieval is correct count.
The rows are a fixed number per sample with 0/1 weights (:mod:`.rows`: no host sync), and the
mean is over the weight-1 rows of the global batch (a count all-reduced over DP on the device),
scaled so that DeepSpeed's DP gradient averaging yields the gradient of that global mean. Under
TP the rows are split across TP ranks (each computes its share, the sums are all-reduced)
instead of being computed TP times; the row count is static, so the padding to a multiple of TP
is too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..ops import patch_sentence_kl
from ..parallel.comm import agree_on_choice, all_reduce_no_grad
from ..parallel.mappings import (_size, copy_to_tensor_parallel_region,
                                 reduce_from_tensor_parallel_region, scatter_rows_to_tensor_parallel_region)
from .rows import candidate_rows


@dataclass
class ReconstructionOutput:
    loss: torch.Tensor
    """Mean loss over the counted rows of the global batch (scaled by DP size for gradient averaging)."""
    rows: torch.Tensor
    """Counted rows on this DP rank (int64 device scalar: reading it on the host is a sync)."""
    global_rows: torch.Tensor
    """Counted rows in the global batch (int64 device scalar)."""


def global_mean(total: torch.Tensor, rows: torch.Tensor, dp_group: Optional[dist.ProcessGroup]):
    """``(loss, global_rows)``: ``total`` over the DP-summed ``rows``, times the DP size (DeepSpeed
    averages gradients over DP). No rows anywhere gives 0 (``total`` is then 0), without a branch."""
    global_rows = all_reduce_no_grad(rows, dp_group)
    acc = torch.promote_types(total.dtype, torch.float32)  # a bf16 count would round
    return total.to(acc) * (_size(dp_group) / global_rows.clamp(min=1).to(acc)), global_rows


class PatchSentenceReconstructionLoss(torch.nn.Module):
    def __init__(self, *, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 prototype_grad: bool = False, backend: str = "auto",
                 dp_group: Optional[dist.ProcessGroup] = None, tp_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.prototype_grad, self.backend = prototype_grad, backend
        self.dp_group, self.tp_group = dp_group, tp_group
        self._agreed = {}  # shape class -> the KL backend every rank uses for ``auto``

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                keep: torch.Tensor, prototypes: torch.Tensor,
                masked_ids: Optional[torch.Tensor] = None) -> ReconstructionOutput:
        """``student``/``teacher`` ``[B, N, E]``, ``mask`` ``[B, N]`` (1 = masked), ``keep`` ``[B]``
        bool, ``prototypes`` ``[M, E]`` (the global batch's text embeddings), ``masked_ids``
        ``[B, K]`` (optional: the masked positions, see :func:`.rows.candidate_rows`)."""
        idx, counted = candidate_rows(mask, keep, masked_ids)
        rows = counted.sum()
        e = student.shape[-1]
        # Rows that do not count enter as zero students: they add nothing to the prototypes'
        # gradient, and the streaming KL keeps its uniform-gradient shortcut (ops/kl_streaming.py)
        s_rows = student.reshape(-1, e).index_select(0, idx) * counted[:, None].to(student.dtype)
        t_rows = teacher.detach().reshape(-1, e).index_select(0, idx)
        protos = prototypes if self.prototype_grad else prototypes.detach()

        tp = _size(self.tp_group)
        if tp > 1:  # split rows over TP peers (padding rows do not count)
            s_rows, t_rows, counted = scatter_rows_to_tensor_parallel_region((s_rows, t_rows, counted), self.tp_group)
            if self.prototype_grad:
                protos = copy_to_tensor_parallel_region(protos, self.tp_group)

        kl = patch_sentence_kl(s_rows, t_rows, protos, student_temp=self.student_temp,
                               teacher_temp=self.teacher_temp, backend=self._backend(s_rows, t_rows, protos))
        # where, not a product: a row that does not count must not bring a NaN/inf into the sum
        total = reduce_from_tensor_parallel_region(torch.where(counted, kl, 0).sum(), self.tp_group)
        loss, global_rows = global_mean(total, rows, self.dp_group)
        return ReconstructionOutput(loss, rows, global_rows)

    def _backend(self, s_rows: torch.Tensor, t_rows: torch.Tensor, protos: torch.Tensor) -> str:
        """``auto`` is decided once per shape class for all ranks: global rank 0's measured choice,
        if it passed the self-check everywhere (else ``streaming``). Ranks that chose on their own
        (timing noise, node-local caches) would round differently rank by rank and run by run.
        The first step of a shape class pays two small collectives; the row count is static, so a
        run has one class."""
        if self.backend != "auto" or (_size(self.dp_group) == 1 and _size(self.tp_group) == 1) \
                or s_rows.shape[0] == 0:
            return self.backend
        grad = torch.is_grad_enabled()
        need_s, need_t = grad and s_rows.requires_grad, grad and protos.requires_grad
        key = (tuple(s_rows.shape), tuple(protos.shape), s_rows.dtype, s_rows.device.type, need_s, need_t)
        if key not in self._agreed:
            from ..ops import BACKENDS
            from ..ops.kl_select import backend_ok, candidates, select_backend
            local = select_backend(s_rows, t_rows, protos, student_temp=self.student_temp,
                                   teacher_temp=self.teacher_temp, need_s=need_s, need_t=need_t)
            usable = [b for b in candidates(s_rows.device, s_rows.dtype) if backend_ok(b, s_rows.device)[0]]
            self._agreed[key] = agree_on_choice(local, usable, BACKENDS, "streaming")
        return self._agreed[key]
