"""The RILS objective: contrastive + weight x patch-sentence reconstruction."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist

from ..parallel.mappings import _size
from .contrastive import ContrastiveLoss
from .feature_targets import FeatureReconstructionLoss
from .reconstruction import PatchSentenceReconstructionLoss


@dataclass
class LossConfig:
    student_temp: float = 0.1
    """tau_s of the student (decoder) distribution."""
    teacher_temp: float = 0.04
    """tau_t of the teacher (unmasked pass) distribution; the teacher is stop-gradient."""
    recon_weight: float = 0.5
    """total = contrastive + recon_weight x reconstruction."""
    prototype_grad: bool = False
    """Let the reconstruction loss train the text tower through the sentence prototypes.
    False as in the official code: the text tower learns only from the contrastive loss."""
    retrieval_filter: bool = True
    """Reconstruct only samples whose image->text top-1 retrieval is correct (the paper)."""
    kl_backend: str = "auto"
    """Backend of rils_scale.ops.patch_sentence_kl: one of rils_scale.ops.BACKENDS."""
    recon_target: str = "language"
    """language (RILS) | pixel | vision: must match the model's ``recon_target``. The two
    baselines reconstruct every sample's masked patches (no retrieval filter: it is part of
    RILS's language-space target, not of MAE-style targets)."""


class RILSLoss(torch.nn.Module):
    """Takes the model's output dict, returns the loss and detached metrics.

    Reported values are this rank's; the trainer averages them over DP for logging. The
    reconstruction term is scaled for DeepSpeed's DP averaging (see reconstruction.py), so
    ``loss`` on one rank is not the global loss: the logged ``recon_loss`` is.
    """

    def __init__(self, cfg: LossConfig = LossConfig(), dp_group: Optional[dist.ProcessGroup] = None,
                 tp_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.cfg, self.dp_group = cfg, dp_group
        self.contrastive = ContrastiveLoss(dp_group)
        if cfg.recon_target == "language":
            self.reconstruction = PatchSentenceReconstructionLoss(
                student_temp=cfg.student_temp, teacher_temp=cfg.teacher_temp, prototype_grad=cfg.prototype_grad,
                backend=cfg.kl_backend, dp_group=dp_group, tp_group=tp_group)
        else:
            self.reconstruction = FeatureReconstructionLoss(cfg.recon_target, dp_group)

    def forward(self, out: Dict[str, torch.Tensor]):
        clip = self.contrastive(out["image_features"], out["text_features"], out["logit_scale"])
        language = self.cfg.recon_target == "language"
        keep = clip.correct_image_to_text if self.cfg.retrieval_filter and language else torch.ones_like(
            clip.correct_image_to_text)
        masked_ids = out.get("masked_ids")  # fixed-size masked rows (objectives/rows.py)
        if language:
            recon = self.reconstruction(out["student_patches"], out["teacher_patches"], out["mask"], keep,
                                        clip.all_text_features, masked_ids)
        else:
            recon = self.reconstruction(out["student_patches"], out["teacher_patches"], out["mask"], keep,
                                        masked_ids)
        loss = clip.loss + self.cfg.recon_weight * recon.loss
        dp = _size(self.dp_group)
        recon_global = recon.loss.detach() / dp  # this rank's share of the global mean
        metrics = {
            "clip_loss": clip.loss.detach().float(),
            "recon_loss_share": recon_global.float(),
            "clip_acc": clip.correct_image_to_text.float().mean(),
            "recon_keep_frac": keep.float().mean(),
            "logit_scale": out["logit_scale"].detach().float(),
        }
        return loss, metrics
