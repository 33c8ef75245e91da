"""Resume training from full (TP-local) tensors instead of DeepSpeed's own partitions:

* a weights-only checkpoint (``convert_checkpoint.py --format deepspeed``,
  :func:`load_weights_only_checkpoint`), when the newest tag holds ``rils_weights.json``;
* the trainer's own ZeRO-3 checkpoint on another data-parallel size (a lost node, a larger
  allocation: :func:`load_zero3_on_another_dp`), read from every old DP partition.

Both call :func:`load_full_state`. Works for any ZeRO stage and any DP size of this run, on the
TP size the checkpoint was written for:

1. every module's parameters are loaded inside ``deepspeed.zero.GatheredParameters(...,
   modifier_rank=0)`` (DESIGN §7: under ZeRO-3 a parameter is an empty partition outside
   it; rank 0 of each DP group broadcasts, every rank copies the same values);
2. the optimizer's fp32 master copy of each parameter is set with
   ``deepspeed.utils.safe_set_full_fp32_param`` (otherwise the next step would overwrite the
   loaded weights with the stale masters of the fresh initialisation);
3. step, samples, skip counters and the LR schedule's *position* are restored; the LR values
   follow this run's config (its ``--lr``, warm-up and decay: a conversion is a natural point to
   change them), not the source run's ``base_lrs``;
4. when the checkpoint carries optimizer state (``convert_checkpoint.py --with-optimizer``, the
   default for ZeRO-3 sources), both Adam moments of every parameter are set with
   ``deepspeed.utils.safe_set_full_optimizer_state`` (DeepSpeed partitions them for this run's DP
   size) and Adam's step count is restored: an elastic resume on another DP x TP layout. Without
   it the moments stay at their fresh zero state (docs/checkpoints.md).

Every rank reads the files of its own TP rank.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional, Set, Tuple

import torch

from .layout import WEIGHTS_ONLY_MARKER


def weights_only_tag_dir(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(tag_dir, WEIGHTS_ONLY_MARKER))


def weights_only_tag(checkpoints_dir: str) -> Optional[str]:
    """The tag directory named by ``checkpoints_dir/latest`` if it is a weights-only checkpoint."""
    latest = os.path.join(checkpoints_dir, "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        tag_dir = os.path.join(checkpoints_dir, f.read().strip())
    return tag_dir if os.path.isfile(os.path.join(tag_dir, WEIGHTS_ONLY_MARKER)) else None


def load_weights_only_checkpoint(engine, checkpoints_dir: str, tp_rank: int, tp_size: int,
                                 tag: Optional[str] = None) -> Tuple[str, dict]:
    """Load a weights-only checkpoint (``tag``, default the one ``latest`` names) into a DeepSpeed engine.

    Returns ``(tag_dir, client_state)`` like ``engine.load_checkpoint``. Raises ``SystemExit``
    with a clear message when the checkpoint was written for another TP size or does not
    match the model.
    """
    tag_dir = weights_only_tag(checkpoints_dir) if tag is None else os.path.join(checkpoints_dir, tag)
    if tag_dir is None or not weights_only_tag_dir(tag_dir):
        raise SystemExit(f"{checkpoints_dir}: {tag or 'latest'} is not a weights-only checkpoint")
    with open(os.path.join(tag_dir, WEIGHTS_ONLY_MARKER)) as f:
        meta = json.load(f)
    if int(meta["tensor_parallel"]) != tp_size:
        raise SystemExit(f"{tag_dir} was converted for --tensor-parallel {meta['tensor_parallel']}, this run uses "
                         f"{tp_size}: convert again with launchers/convert_checkpoint.py --format deepspeed "
                         f"--tensor-parallel {tp_size}")
    path = os.path.join(tag_dir, meta["files"][tp_rank])
    optim = meta.get("optimizer") if isinstance(meta.get("optimizer"), dict) else None
    moments = _open_safetensors(os.path.join(tag_dir, optim["files"][tp_rank])) if optim else None
    client = dict(meta.get("client_state", {}))
    with _open_safetensors(path) as f:
        load_full_state(engine, path, set(f.keys()), f.get_tensor,
                        lambda kind, name: moments.get_tensor(f"{kind}.{name}"),
                        tuple(optim["kinds"]) if optim else (), optim.get("step") if optim else None,
                        client, meta.get("lr_scheduler"))
    return tag_dir, client


def load_zero3_on_another_dp(engine, tag_dir: str, tp_rank: int, tp_size: int,
                             trusted: bool = False) -> Tuple[str, dict]:
    """Resume a trainer's own ZeRO-3 checkpoint on another data-parallel size, same TP size.

    DeepSpeed refuses this ("Automatic adjustment of ZeRO's optimizer state partitioning with
    a new world size is not currently supported"). Each rank reads, for its TP rank, every
    parameter's fp32 master and both Adam moments from all the old DP partitions
    (:mod:`.consolidate`'s ZeRO-3 reader: the allowlisting unpickler, memory-mapped, one tensor
    at a time) and sets its own new partition, exactly as a converted checkpoint is loaded.
    Cost: every rank reads its TP rank's whole optimizer state (12 bytes per TP-local
    parameter) instead of its own partition.
    """
    from .consolidate import OPTIMIZER_KINDS, open_checkpoint
    from .layout import CheckpointError
    try:
        ckpt = open_checkpoint(tag_dir, trusted=trusted)
    except CheckpointError as err:
        raise SystemExit(f"--resume: {err}") from None
    if ckpt.kind != "zero3":
        raise SystemExit(f"--resume: {tag_dir} is a {ckpt.kind} checkpoint of DP {ckpt.dp_size}; only ZeRO-3 "
                         "checkpoints resume on another DP size directly. Convert it with "
                         "launchers/convert_checkpoint.py --format deepspeed --weights-only (ZeRO-1/2 Adam moments "
                         "are not converted), or resume on the DP size it was written with")
    if ckpt.tp_size != tp_size:
        raise SystemExit(f"checkpoint was written with --tensor-parallel {ckpt.tp_size}, this run uses {tp_size}: "
                         "convert it with launchers/convert_checkpoint.py --format deepspeed --tensor-parallel N")
    reader = ckpt.readers[tp_rank]
    kinds = OPTIMIZER_KINDS if reader.has_optimizer_state() else ()
    produced = [0]

    def weight(name, kind="fp32"):
        value = reader.get(name, kind)
        produced[0] += value.numel() * 4
        if produced[0] > 256 * 2 ** 20:  # drop the file mappings now and then (pages already read)
            reader.release()
            produced[0] = 0
        return value
    client = dict(ckpt.client_state)
    load_full_state(engine, tag_dir, set(reader.names()), weight, lambda kind, name: weight(name, kind), kinds,
                    reader.optimizer_step() if kinds else None, client, ckpt.lr_scheduler)
    reader.release()
    return tag_dir, client


def load_full_state(engine, source: str, stored: Set[str], weight: Callable[[str], torch.Tensor],
                    moment: Callable[[str, str], torch.Tensor], kinds: Tuple[str, ...], adam_step: Optional[int],
                    client: dict, lr_scheduler: Optional[dict]) -> None:
    """Set every parameter of ``engine`` (its TP-local full value ``weight(name)``), the fp32 master
    copies, Adam's ``kinds`` moments (``moment(kind, name)``) and step, the LR schedule's position
    and the engine's step counters. ``source`` names the checkpoint in messages."""
    import deepspeed

    if kinds:
        _ensure_adam_state(engine)
    module = engine.module
    expected = {n for n, _ in module.named_parameters()}
    if stored != expected:
        missing, extra = sorted(expected - stored)[:5], sorted(stored - expected)[:5]
        raise SystemExit(f"{source} does not match the model: missing {missing}, unexpected {extra}")
    for prefix, sub in module.named_modules():
        params = list(sub.named_parameters(recurse=False))
        if not params:
            continue
        values = {n: weight(f"{prefix}.{n}" if prefix else n) for n, _ in params}
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
            for n, p in params:
                value = values[n]
                if tuple(p.shape) != tuple(value.shape):
                    raise SystemExit(f"{prefix}.{n}: checkpoint shape {tuple(value.shape)}, model {tuple(p.shape)}")
                p.data.copy_(value.to(device=p.device, dtype=p.dtype))
        for n, p in params:  # the optimizer's fp32 master copy (no-op for plain fp32 ZeRO-0)
            _set_full_hp(p, values[n], None)
            name = f"{prefix}.{n}" if prefix else n
            for kind in kinds:
                _set_full_hp(p, moment(kind, name), kind)
    if kinds and adam_step is not None:
        _set_adam_step(engine, int(adam_step))
    _restore_schedule_position(engine, lr_scheduler, int(client.get("step", 0)))
    step = int(client.get("step", 0))
    engine.global_steps = step
    engine.global_samples = int(client.get("batches_consumed", step)) * engine.train_micro_batch_size_per_gpu() \
        * getattr(engine, "dp_world_size", 1)


def _open_safetensors(path: str):
    from safetensors import safe_open
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as err:  # safetensors never unpickles: a planted pickle is just not a safetensors file
        raise SystemExit(f"--resume: {path} is not a valid safetensors file ({err}); refused") from None


def _set_full_hp(param, value: torch.Tensor, key: Optional[str]) -> None:
    """Set this rank's partition of the fp32 master (``key=None``) or of an optimizer state.

    ZeRO-3: DeepSpeed's ``set_full_hp_param`` narrows the unpadded full value at
    ``partition_numel * rank``, which runs past the end on the DP ranks whose partition is
    (partly) padding (``logit_scale``: 1 element over 2 DP ranks fails on rank 1). So the slice is
    taken here and the padding set to zero. Other stages: DeepSpeed's ``safe_set_full_*``.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    if not param.requires_grad:  # SemMIM's momentum branch: no master, no moments (train/ema.py)
        return
    value = value.to(dtype=torch.float32)
    if not hasattr(param, "ds_id"):
        value = value.to(param.device)
        if key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
        return
    opt = param._z3_optimizer
    if not param.requires_grad:
        return
    part, _ = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    start = part.numel() * opt._get_param_partition_rank(param)
    piece = value.flatten()[start:start + part.numel()]
    part.data.zero_()
    part.data[:piece.numel()].copy_(piece.to(part.device))


def _ensure_adam_state(engine) -> None:
    """Create Adam's state before the first step, as the optimizer's first ``step`` would.

    torch's Adam/AdamW (and DeepSpeed's fused/CPU Adam) create ``exp_avg`` / ``exp_avg_sq`` lazily,
    and ZeRO-3's ``initialize_optimizer_states`` does not always run a step, so a fresh engine
    may have no state to set. Zeros, step 0: exactly the state a first step starts from.
    """
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    torch_adam = isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))
    # ZeRO-3 empties the groups' "params" between steps; its flat fp32 partitions are the params.
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    params = list(flat) if flat else [p for g in inner.param_groups for p in g["params"]]
    amsgrad = any(g.get("amsgrad") for g in inner.param_groups)
    for p in params:
        state = inner.state[p]
        if "exp_avg" in state:
            continue
        state["step"] = torch.tensor(0.0, dtype=torch.float32) if torch_adam else 0
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if amsgrad:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _set_adam_step(engine, step: int) -> None:
    """Adam's step count (its bias correction) on every state of the (inner) torch optimizer."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        if "step" in state:
            if torch.is_tensor(state["step"]):
                state["step"].fill_(step)
            else:
                state["step"] = step


def _restore_schedule_position(engine, state: Optional[dict], step: int) -> None:
    """Put the LR scheduler at the checkpoint's position, with this run's base LRs."""
    sched = engine.lr_scheduler
    if sched is None:
        return
    last_epoch = int(state.get("last_epoch", step)) if state else step
    sched.last_epoch = last_epoch
    sched._step_count = int(state.get("_step_count", last_epoch + 1)) if state else last_epoch + 1
    if hasattr(sched, "lr_lambdas"):  # LambdaLR (rils_scale.train.schedule): closed form
        lrs = [base * fn(last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    else:
        lrs = sched.get_last_lr()
    for group, lr in zip(engine.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = list(lrs)
