"""DeepSpeed engine set-up: process groups, model under zero.Init, optimizer groups, schedule."""
from __future__ import annotations

import logging
from typing import Dict, List

import torch
import torch.nn as nn

from ..models import ParallelSpec, RILSConfig, build_model
from ..parallel import DeepSpeedMPU, ParallelState, VocabParallelEmbedding
from ..parallel.deepspeed_utils import check_zero_tensor_parallel_setup, zero_init_context
from ..parallel.random import model_parallel_seed
from .config import TrainConfig
from .schedule import warmup_cosine

log = logging.getLogger(__name__)

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


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_engine(cfg: TrainConfig, model_cfg: RILSConfig, ds_config: dict, state: ParallelState):
    """Seed, build the model (partitioned at construction under ZeRO-3) and initialise DeepSpeed.

    Returns ``(engine, model_spec)``.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    device_type = "cuda" if get_accelerator().device_name() == "cuda" else "cpu"
    model_parallel_seed(cfg.seed, state.tp_rank, state.tp_size, device_type)
    spec = ParallelSpec(tp_group=state.tp_group if state.tp_size > 1 else None,
                        sequence_parallel=cfg.sequence_parallel,
                        activation_checkpointing=cfg.activation_checkpointing)
    mpu = DeepSpeedMPU(state)
    stage = zero_stage(ds_config)
    # Partition over the DP group only: TP peers hold different shards (DESIGN §7).
    with zero_init_context(state, ds_config, enabled=stage == 3):
        model = build_model(model_cfg, spec, attn_backend=cfg.attn_backend)
    if stage == 3:
        check_zero_tensor_parallel_setup(model, state)

    weight_decay = ds_config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    groups = optimizer_groups(model, weight_decay)
    scheduler = lambda opt: warmup_cosine(opt, cfg.warmup_steps, cfg.max_steps, cfg.min_lr)  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config,
                                           mpu=mpu, lr_scheduler=scheduler)
    return engine, spec


def compute_dtype(ds_config: dict) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32
