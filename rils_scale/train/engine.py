"""DeepSpeed engine set-up: process groups, model under zero.Init, optimizer groups, schedule."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..models import ParallelSpec, RILSConfig, build_model
from ..models.compile import COMPILED_BLOCKS, compile_blocks
from ..models.param_groups import optimizer_groups  # noqa: F401 (re-exported for old imports)
from ..parallel import DeepSpeedMPU, ParallelState
from ..parallel.deepspeed_utils import (check_zero_tensor_parallel_setup, mark_zero3_leaf_modules,
                                        reduce_leaf_gradients_per_parameter, zero_init_context)
from ..parallel.random import model_parallel_seed
from .config import TrainConfig
from .recompute import resolve_activation_checkpointing
from .schedule import warmup_cosine

log = logging.getLogger(__name__)


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_engine(cfg: TrainConfig, model_cfg: RILSConfig, ds_config: dict, state: ParallelState,
                 checkpointing: Optional[float] = None):
    """Seed, build the model (partitioned at construction under ZeRO-3) and initialise DeepSpeed.

    ``checkpointing``: the fraction of every stack's blocks recomputed in backward (the trainer
    resolves ``--activation-checkpointing`` with the planner, train/recompute.py); ``None`` takes
    ``cfg``'s policy through the same planner. Returns ``(engine, model_spec)``.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    device_type = "cuda" if get_accelerator().device_name() == "cuda" else "cpu"
    model_parallel_seed(cfg.seed, state.tp_rank, state.tp_size, device_type)
    if checkpointing is None:  # the trainer's own rule (collective: every rank calls build_engine)
        checkpointing = resolve_activation_checkpointing(cfg, model_cfg, ds_config, state, device_type).fraction
    spec = ParallelSpec(tp_group=state.tp_group if state.tp_size > 1 else None,
                        sequence_parallel=cfg.sequence_parallel, activation_checkpointing=checkpointing)
    mpu = DeepSpeedMPU(state)
    stage = zero_stage(ds_config)
    # Partition over the DP group only: TP peers hold different shards (DESIGN §7).
    with zero_init_context(state, ds_config, enabled=stage == 3):
        model = build_model(model_cfg, spec, attn_backend=cfg.attn_backend)
    if stage == 3:
        check_zero_tensor_parallel_setup(model, state)
    if cfg.compile:  # regional compilation: each block on its own (models/compile.py)
        if stage == 3:
            mark_zero3_leaf_modules(model, COMPILED_BLOCKS)
        log.info("--compile: %d transformer blocks compiled one by one (fullgraph)", compile_blocks(model))

    weight_decay = ds_config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    groups = optimizer_groups(model, weight_decay)
    scheduler = lambda opt: warmup_cosine(opt, cfg.warmup_steps, cfg.max_steps, cfg.min_lr)  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config,
                                           mpu=mpu, lr_scheduler=scheduler)
    if cfg.compile and stage == 3:
        reduce_leaf_gradients_per_parameter(engine)
    return engine, spec


def compute_dtype(ds_config: dict) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32
