"""Which transformer blocks recompute in backward: the trainer's ``--activation-checkpointing``.

``none | selective | every | auto`` becomes ``ParallelSpec.activation_checkpointing`` (the
fraction of every stack's blocks that is recomputed) through the capacity planner
(:func:`.capacity.choose_activation_checkpointing`), for this run's model, micro-batch,
parallel layout, ZeRO stage, precision and the smallest device memory of any rank (so every
rank picks the same). On a CPU, ``auto`` is ``none``: the ranks' activations live in host
memory, where checkpointing would only cost time (tests and smoke runs use tiny models).
docs/performance.md ("Activation checkpointing") has the memory model and the reasoning.
"""
from __future__ import annotations

import dataclasses
import os

from ..models.config import RILSConfig
from ..parallel import comm
from ..parallel.state import ParallelState
from .capacity import CHECKPOINTING_POLICIES, GiB, CheckpointingChoice, PlanConfig, choose_activation_checkpointing
from .config import TrainConfig


def normalize_policy(value) -> str:
    """``True`` / ``False`` (the flag's old meaning, and programmatic callers) or a policy name."""
    if value is True:
        return "every"
    if value is False or value is None:
        return "none"
    if value not in CHECKPOINTING_POLICIES:
        raise ValueError(f"--activation-checkpointing must be one of {CHECKPOINTING_POLICIES}, got {value!r}")
    return value


def _precision(ds_config: dict) -> str:
    if ds_config.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds_config.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def plan_config(cfg: TrainConfig, model_cfg: RILSConfig, ds_config: dict, state: ParallelState,
                device_memory_bytes: float) -> PlanConfig:
    """This run as the planner sees it (fraction 0: the policy is what is being chosen)."""
    zero = ds_config.get("zero_optimization", {})
    offload = str(zero.get("offload_optimizer", {}).get("device", "none")).lower() in ("cpu", "nvme")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", state.tp_size)))
    defaults = PlanConfig(model=model_cfg, gpus=state.dims.world_size,
                          tensor_parallel=state.tp_size, gpus_per_node=max(local, state.tp_size))
    return dataclasses.replace(
        defaults, zero_stage=int(zero.get("stage", 0)), micro_batch=int(ds_config["train_micro_batch_size_per_gpu"]),
        grad_accum=int(ds_config.get("gradient_accumulation_steps", 1)), sequence_parallel=cfg.sequence_parallel,
        offload=offload, precision=_precision(ds_config), attention="math" if cfg.attn_backend == "math" else "flash",
        recon_backend="reference" if cfg.kl_backend == "reference" else "streaming",
        prototype_grad=cfg.prototype_grad, gpu_memory_gb=device_memory_bytes / GiB,
        reduce_bucket_elems=float(zero.get("reduce_bucket_size", defaults.reduce_bucket_elems)),
        prefetch_bucket_elems=float(zero.get("stage3_prefetch_bucket_size", defaults.prefetch_bucket_elems)))


def resolve_activation_checkpointing(cfg: TrainConfig, model_cfg: RILSConfig, ds_config: dict,
                                     state: ParallelState, device_type: str) -> CheckpointingChoice:
    """The policy for this run. Collective (every rank calls it): the device memory is the
    minimum over ranks."""
    from .hardware import device_memory_bytes
    requested = normalize_policy(cfg.activation_checkpointing)
    memory = device_memory_bytes("cuda" if device_type == "cuda" else "cpu")
    if device_type != "cuda":  # ranks on one host share its memory
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
        memory /= max(1, local)
    memory = comm.all_reduce_values([memory], comm.world_group(), "min")[0]
    pc = plan_config(cfg, model_cfg, ds_config, state, memory)
    if device_type == "cuda" or requested != "auto":
        return choose_activation_checkpointing(pc, requested)
    choice = choose_activation_checkpointing(pc, "none")
    return dataclasses.replace(choice, requested="auto", reason=(
        "CPU: activations live in host memory (this rank's share shown), recompute would only cost time"))
