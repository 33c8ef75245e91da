"""AdamW parameter groups of a RILS model, shared by the trainer (``train/engine.py``) and the
checkpoint converter (``checkpoint/consolidate.py``, which rebuilds the group order of ZeRO-0
files). It lives in ``models/`` so that ``checkpoint/`` need not import ``train/``."""
from __future__ import annotations

from typing import Dict, List

import torch.nn as nn

from ..parallel import VocabParallelEmbedding

# Parameters never decayed, by name (shapes are useless under ZeRO-3: partitions report (0,)).
_NO_DECAY_NAMES = ("bias", "q_bias", "v_bias", "cls_token", "mask_token", "positional_embedding",
                   "logit_scale.value")


def optimizer_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """AdamW groups: decay for weight matrices, none for norms, biases, embeddings, tokens and the
    logit scale. Decided by module type and parameter name, never by ``ndim`` (DESIGN §7)."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, VocabParallelEmbedding, nn.Embedding)):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = id(param) in no_decay_ids or name.split(".")[-1] in _NO_DECAY_NAMES \
            or any(name.endswith(n) for n in _NO_DECAY_NAMES)
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
