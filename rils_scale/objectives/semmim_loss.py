"""The SemMIM objective: contrastive + agreement of global features + masked-patch code prediction.

    loss = InfoNCE + agreement_weight * CE_global + mim_weight * CE_patches

Both cross-entropies are DINO/iBOT self-distillation over the K shared codes
(``rils_scale.ops.code_cross_entropy``): the teacher is the momentum branch, its cosine logits
are **centred** (minus a running mean of the teacher logits, one centre for global rows and one
for patch rows, as iBOT) and **sharpened** (``teacher_temp`` < ``student_temp``), and it gets no
gradient. Centring keeps one code from dominating, sharpening keeps the distribution from
going uniform; together they are DINO's guard against collapse. The centre is updated after
the loss of each micro-batch (DINO's order) with momentum ``center_momentum``:

    c <- m c + (1 - m) * mean over the global batch of (t . C_t)   (the uncentred cosine logits)

The mean of a linear map is the map of the mean, so only the mean teacher feature is reduced
(``E`` floats), never ``rows x K``: one DP all-reduce through ``parallel.comm`` per micro-batch
(it also carries the code-usage statistics). Every rank then holds the same centre.

Rows and means, without host synchronisation: every sample has exactly ``N - keep`` masked
patches, so the row counts are static shapes and every rank of a DP group has the same number;
the per-rank mean is then the global mean's share and DeepSpeed's DP gradient averaging yields
the gradient of the global mean. Under TP the rows are split over TP peers (zero-weight padding
rows up to a multiple of TP), each computes its share against all K codes, the sums are
all-reduced (``reduce_from_tensor_parallel_region``) and the replicated student codes enter
through ``copy_to_tensor_parallel_region`` (their gradient is summed over TP in backward).

Collapse check (logged): ``code_ppl_*`` is the perplexity ``exp H(mean_i q_i)`` of the teacher's
mean code distribution over the global batch (1 = one code for everything, K = all codes used
equally) and ``code_row_ppl_*`` is ``exp(mean_i H(q_i))`` (K = every single distribution uniform,
the other collapse).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from ..ops.code_cross_entropy import code_cross_entropy
from ..parallel.comm import all_reduce_no_grad
from ..parallel.mappings import (_size, copy_to_tensor_parallel_region, reduce_from_tensor_parallel_region,
                                 scatter_rows_to_tensor_parallel_region)
from .contrastive import ContrastiveLoss


@dataclass
class SemMIMLossConfig:
    student_temp: float = 0.1
    """tau_s of the student code distributions (DINO/iBOT: 0.1)."""
    teacher_temp: float = 0.04
    """tau_t of the teacher code distributions (DINO/iBOT: 0.04): sharpening."""
    mim_weight: float = 0.5
    """Weight of the masked-patch code cross-entropy (RILS's reconstruction weight, same role)."""
    agreement_weight: float = 0.5
    """Weight of the global agreement cross-entropy (0: no agreement learning)."""
    center_momentum: float = 0.9
    """Momentum of the teacher centres (DINO/iBOT: 0.9)."""


def perplexity(mass: torch.Tensor) -> torch.Tensor:
    """``exp(entropy)`` of the distribution proportional to ``mass`` (zeros allowed)."""
    p = mass / mass.sum().clamp(min=torch.finfo(mass.dtype).tiny)
    return torch.exp(-torch.special.xlogy(p, p).sum())


class SemMIMLoss(torch.nn.Module):
    """Takes SemMIM's output dict; returns the loss and detached metrics (this rank's, like RILSLoss)."""

    def __init__(self, cfg: SemMIMLossConfig, num_codes: int, dp_group: Optional[dist.ProcessGroup] = None,
                 tp_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.cfg, self.dp_group, self.tp_group = cfg, dp_group, tp_group
        self.contrastive = ContrastiveLoss(dp_group)
        # Replicated on every rank (identical by construction: updated from all-reduced means).
        self.register_buffer("center_global", torch.zeros(num_codes))
        self.register_buffer("center_patch", torch.zeros(num_codes))

    # ------------------------------------------------------------------ one K-way term
    def _code_term(self, student: torch.Tensor, teacher: torch.Tensor, student_codes: torch.Tensor,
                   teacher_codes: torch.Tensor, center: torch.Tensor, weight: float
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean CE over ``[R, E]`` rows (this rank's share under TP: summed over TP peers), plus the
        usage column sums ``[K]`` and the entropy sum of this TP rank's rows."""
        rows, e = student.shape
        teacher = teacher.detach()
        weights = torch.ones(rows, device=student.device, dtype=torch.float32)
        tp = _size(self.tp_group)
        with torch.set_grad_enabled(torch.is_grad_enabled() and weight != 0):
            if tp > 1:  # padding rows carry weight 0
                student, teacher, weights = scatter_rows_to_tensor_parallel_region((student, teacher, weights),
                                                                                   self.tp_group)
                student_codes = copy_to_tensor_parallel_region(student_codes, self.tp_group)
            ce, usage, entropy = code_cross_entropy(student, teacher, student_codes, teacher_codes.detach(), center,
                                                    student_temp=self.cfg.student_temp,
                                                    teacher_temp=self.cfg.teacher_temp, weights=weights)
            total = reduce_from_tensor_parallel_region((ce * weights.to(ce.dtype)).sum(), self.tp_group)
        return total / rows, usage, (entropy * weights.to(entropy.dtype)).sum().reshape(1)

    # ------------------------------------------------------------------ the objective
    def forward(self, out: Dict[str, torch.Tensor]):
        cfg = self.cfg
        clip = self.contrastive(out["image_features"], out["text_features"], out["logit_scale"])
        e = out["student_global"].shape[-1]
        if self.center_global.device != out["teacher_codes"].device:
            self.center_global = self.center_global.to(out["teacher_codes"].device)
            self.center_patch = self.center_patch.to(out["teacher_codes"].device)
        agree, usage_g, ent_g = self._code_term(out["student_global"], out["teacher_global"], out["student_codes"],
                                                out["teacher_codes"], self.center_global, cfg.agreement_weight)
        mim, usage_p, ent_p = self._code_term(out["student_patches"].reshape(-1, e),
                                              out["teacher_patches"].reshape(-1, e), out["student_codes"],
                                              out["teacher_codes"], self.center_patch, cfg.mim_weight)
        loss = clip.loss + cfg.mim_weight * mim + cfg.agreement_weight * agree
        stats = self._update_centers_(out, usage_g, usage_p, ent_g, ent_p)
        dp = _size(self.dp_group)
        metrics = {
            "clip_loss": clip.loss.detach().float(),
            "recon_loss_share": mim.detach().float() / dp,  # this rank's share of the global mean
            "agreement_loss": agree.detach().float(),
            "extra_loss": cfg.agreement_weight * agree.detach().float(),  # the loop adds it to the logged loss
            "clip_acc": clip.correct_image_to_text.float().mean(),
            "recon_keep_frac": torch.ones((), device=clip.loss.device),  # every masked patch counts
            "logit_scale": out["logit_scale"].detach().float(),
            **stats,
        }
        return loss, metrics

    @torch.no_grad()
    def _update_centers_(self, out, usage_g, usage_p, ent_g, ent_p) -> Dict[str, torch.Tensor]:
        """DINO's centre update from the global batch, and the collapse statistics (one DP
        all-reduce, plus one over TP for the statistics of the TP-split rows)."""
        k = self.center_global.shape[0]
        stats = torch.cat([usage_g.float(), usage_p.float(), ent_g.float(), ent_p.float()])
        if _size(self.tp_group) > 1:
            stats = all_reduce_no_grad(stats, self.tp_group)
        zg = out["teacher_global"].float().detach()
        zp = out["teacher_patches_all"].float().detach().reshape(-1, zg.shape[-1])
        rows = torch.cat([zg.new_full((1,), zg.shape[0]), zg.new_full((1,), zp.shape[0]),
                          zg.new_full((1,), out["teacher_patches"].shape[0] * out["teacher_patches"].shape[1])])
        buf = torch.cat([zg.sum(dim=0), zp.sum(dim=0), stats, rows])
        buf = all_reduce_no_grad(buf, self.dp_group)
        e = zg.shape[-1]
        mean_g, mean_p = buf[:e] / buf[-3], buf[e:2 * e] / buf[-2]
        codes = out["teacher_codes"].float().detach()
        m = self.cfg.center_momentum
        self.center_global.mul_(m).add_(codes @ mean_g, alpha=1 - m)
        self.center_patch.mul_(m).add_(codes @ mean_p, alpha=1 - m)
        usage_g, usage_p = buf[2 * e:2 * e + k], buf[2 * e + k:2 * e + 2 * k]
        ent_g, ent_p = buf[2 * e + 2 * k], buf[2 * e + 2 * k + 1]
        return {
            "code_ppl_global": perplexity(usage_g),
            "code_ppl_patch": perplexity(usage_p),
            "code_row_ppl_global": torch.exp(ent_g / buf[-3]),
            "code_row_ppl_patch": torch.exp(ent_p / buf[-1]),
        }
