"""SemMIM's momentum encoder: an fp32 exponential moving average of the online weights, kept per
ZeRO-3 partition, never gathered.

After each *applied* optimizer step ``k`` (0-based), for every momentum parameter::

    ema <- m_k * ema + (1 - m_k) * online,      m_k = 1 - (1 - m_0) (cos(pi k / K) + 1) / 2

(DINO/iBOT's cosine schedule from ``m_0`` = ``--ema-momentum`` to 1 over ``K`` = ``--max-steps``),
then the momentum parameter := ``ema`` in the compute dtype (the teacher's forward runs in bf16
under bf16 training, as the student's does).

Why fp32 and per partition: with m = 0.996 a step moves the EMA by 0.4 % of the difference to the
online weight, below bf16's resolution (2^-8 relative) for most weights, so a bf16 EMA would
simply not move. Under ZeRO-3 every rank holds ``ceil(numel / DP)`` elements of each parameter
(``ds_tensor``) and the optimizer's fp32 master of exactly those elements; a momentum parameter
has the same shape and DP group, so its partition lines up element for element with its online
parameter's. Each (TP, DP) rank therefore updates the fp32 EMA of what it holds from the fp32
master it holds, with no collective and no gather of full weights; TP shards are just different
tensors. Without ZeRO-3 (stages 0-2, or no DeepSpeed) the EMA is of the whole (TP-local)
parameter, from the parameter itself (its fp32 master is split over DP there; in a bf16 run the
source is the bf16 weight, the EMA still fp32). Persistent ZeRO-3 parameters (below the
persistence threshold) are re-gathered after the update (``parallel.deepspeed_utils``).

State for checkpoints: the fp32 EMA partitions and the teacher centres, one safetensors file
per rank (``checkpoint/momentum.py``); the step fixes the schedule position.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List

import torch

from ..checkpoint.momentum import CENTERS, read_rank_state, state_file, write_rank_state


def momentum_at(step: int, total_steps: int, base: float) -> float:
    """DINO's cosine momentum schedule: ``base`` at step 0, 1 at ``total_steps``."""
    if total_steps <= 0:
        return base
    frac = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * frac) + 1.0) / 2.0


def _zero3_master_partition(param) -> torch.Tensor:
    """This rank's slice of ``param``'s fp32 master: a view into the ZeRO-3 optimizer's flat fp32
    partition (DeepSpeed 0.19.8 ``grad_position``; no stream synchronisation, unlike
    ``safe_get_local_fp32_param``), the same elements as ``param.ds_tensor``."""
    opt = param._z3_optimizer
    group, offset, numel = opt.grad_position[opt.get_param_id(param)]
    if opt._swappable_optimizer_subgroup(group):
        raise SystemExit("--recipe semmim: the EMA reads the fp32 master partitions in memory; NVMe-swapped "
                         "optimizer states are not supported")
    return opt.fp32_partitioned_groups_flat[group].narrow(0, offset, numel)


class _Slot:
    """One momentum parameter: where its fp32 source is, its fp32 EMA and where the EMA goes."""

    def __init__(self, name: str, online: torch.nn.Parameter, momentum: torch.nn.Parameter):
        self.name, self.online, self.momentum = name, online, momentum
        self.partitioned = hasattr(online, "ds_id")
        if self.partitioned and getattr(online, "_z3_optimizer", None) is None:
            raise SystemExit(f"--recipe semmim: {name} has no ZeRO-3 optimizer partition (is it trainable?)")
        if self.partitioned and online.ds_tensor.numel() != momentum.ds_tensor.numel():
            raise RuntimeError(f"{name}: online and momentum partitions differ in size")
        self.ema = self.source().detach().float().clone()

    def source(self) -> torch.Tensor:
        return _zero3_master_partition(self.online) if self.partitioned else self.online.detach()

    def target(self) -> torch.Tensor:
        return self.momentum.ds_tensor.data if self.partitioned else self.momentum.data

    def local_shape(self) -> List[int]:
        return list(self.online.ds_shape if self.partitioned else self.online.shape)


class MomentumEMA:
    """The momentum branch's fp32 EMA (module docstring). ``model`` is the SemMIM module (the engine's
    ``.module``); construction sets momentum := online, as training starts."""

    def __init__(self, model, base_momentum: float, total_steps: int):
        self.base, self.total_steps = float(base_momentum), int(total_steps)
        params = dict(model.named_parameters())
        self.slots = [_Slot(m, params[o], params[m]) for o, m in model.momentum_pairs()]
        self._write_targets()

    @torch.no_grad()
    def update(self, step: int) -> float:
        """EMA after applied step ``step`` (0-based); returns the momentum used."""
        m = momentum_at(step, self.total_steps, self.base)
        for s in self.slots:
            s.ema.mul_(m).add_(s.source().float(), alpha=1.0 - m)
        self._write_targets()
        return m

    @torch.no_grad()
    def _write_targets(self) -> None:
        for s in self.slots:
            target = s.target()
            target.copy_(s.ema.to(device=target.device).view_as(target))
        from ..parallel.deepspeed_utils import regather_persistent_parameters
        regather_persistent_parameters([s.momentum for s in self.slots])

    # ------------------------------------------------------------------ checkpoint state
    def write(self, path: str, centers: Dict[str, torch.Tensor], *, step: int, dp_size: int, tp_size: int) -> None:
        tensors = {s.name: s.ema for s in self.slots}
        tensors.update(centers)
        write_rank_state(path, tensors, {
            "format": "semmim-momentum", "format_version": 1, "step": int(step), "dp_size": int(dp_size),
            "tp_size": int(tp_size), "partitioned": all(s.partitioned for s in self.slots),
            "shapes": {s.name: s.local_shape() for s in self.slots},
            "ema_momentum": self.base, "total_steps": self.total_steps})

    def load(self, path: str, *, step: int, dp_size: int, tp_size: int) -> Dict[str, torch.Tensor]:
        """Restore the EMA from one rank's file (written at ``step`` on this layout); returns the centres."""
        if not os.path.isfile(path):
            raise SystemExit(f"--resume: {path} is missing: the checkpoint holds no SemMIM momentum state for "
                             "this rank (written with --recipe rils, or on another DP x TP layout?)")
        tensors, meta = read_rank_state(path)
        if (meta.get("dp_size"), meta.get("tp_size")) != (dp_size, tp_size):
            raise SystemExit(f"--resume: {path} was written for DP={meta.get('dp_size')} x TP={meta.get('tp_size')}, "
                             f"this run is DP={dp_size} x TP={tp_size}: convert the checkpoint with "
                             "launchers/convert_checkpoint.py --format deepspeed first")
        if int(meta.get("step", -1)) != int(step):
            raise SystemExit(f"--resume: {path} holds the momentum state of step {meta.get('step')}, the checkpoint "
                             f"is step {step}")
        with torch.no_grad():
            for s in self.slots:
                value = tensors.get(s.name)
                if value is None or value.numel() != s.ema.numel():
                    raise SystemExit(f"--resume: {path}: {s.name} missing or of the wrong size")
                s.ema.copy_(value.view_as(s.ema))
            self._write_targets()
        return {k: tensors[k] for k in CENTERS}

    def load_full_local(self, tensors: Dict[str, torch.Tensor], dp_rank: int, dp_size: int) -> None:
        """Restore from whole TP-local fp32 tensors (a weights-only checkpoint): this rank's partition."""
        with torch.no_grad():
            for s in self.slots:
                full = tensors[s.name].float().flatten()
                if s.partitioned:
                    per = s.ema.numel()
                    piece = full[dp_rank * per:(dp_rank + 1) * per]
                    s.ema.zero_()
                    s.ema[:piece.numel()].copy_(piece)
                else:
                    s.ema.copy_(full.view_as(s.ema))
            self._write_targets()


def rank_state_path(tag_dir: str, dp_rank: int, tp_rank: int) -> str:
    return state_file(tag_dir, dp_rank, tp_rank)


__all__ = ["MomentumEMA", "momentum_at", "rank_state_path"]
