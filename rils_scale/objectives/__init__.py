"""Training objectives: contrastive InfoNCE and the patch-sentence reconstruction KL."""
from .contrastive import ContrastiveLoss, ContrastiveOutput
from .reconstruction import PatchSentenceReconstructionLoss, ReconstructionOutput
from .rils_loss import LossConfig, RILSLoss
