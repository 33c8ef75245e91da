"""SemMIM's momentum state in a checkpoint: one safetensors file per (DP, TP) rank, and its view
merged to TP = 1 (the teacher in the student's place for the converter: :mod:`.teacher_view`).

Files (written by ``rils_scale.train.ema`` into the tag directory, before it is marked complete)::

    TAG/semmim_state_dp{d:03d}_tp{t:02d}.safetensors

    momentum.<name>     fp32 EMA of the online parameter <name>: under ZeRO-3 this rank's flat
                        partition (``ceil(numel / DP)`` elements, the last one zero-padded: the
                        layout of ``ds_tensor``), otherwise the whole TP-local tensor
    center.global       [K] teacher centre of the global rows (identical on every rank)
    center.patch        [K] teacher centre of the patch rows
    metadata "semmim"   JSON: step, dp_size, tp_size, partitioned, shapes (TP-local), ema schedule

No pickle anywhere: safetensors only. DeepSpeed's own files do not hold these values in fp32
(its ``frozen_param_fragments`` are the compute-dtype copies), so a consolidation reads them here.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch

from .layout import CheckpointError

STATE_FILE = "semmim_state_dp{dp:03d}_tp{tp:02d}.safetensors"
_STATE_RE = re.compile(r"^semmim_state_dp(\d+)_tp(\d+)\.safetensors$")
MOMENTUM_PREFIX = "momentum."
CENTERS = ("center.global", "center.patch")


def state_file(tag_dir: str, dp_rank: int, tp_rank: int) -> str:
    return os.path.join(tag_dir, STATE_FILE.format(dp=dp_rank, tp=tp_rank))


def write_rank_state(path: str, tensors: Dict[str, torch.Tensor], meta: dict) -> None:
    """Write one rank's state (contiguous CPU fp32 copies) atomically (tmp + rename)."""
    from safetensors.torch import save_file
    tmp = path + ".tmp"
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, tmp,
              metadata={"semmim": json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)


def read_rank_state(path: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` of one rank's file; a clear error for anything that is not one."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {})["semmim"])
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors never unpickles: a foreign file is just refused
        raise CheckpointError(f"{path} is not a SemMIM state file ({type(err).__name__}: {err})") from None


class _MomentumRankReader:
    """The momentum tensors of one TP rank, TP-local and whole (DP partitions joined)."""

    def __init__(self, files: List[str], tp_rank: int):
        self.files, self.tp_rank = files, tp_rank
        _, self.meta = read_rank_state(files[0])
        self._shapes = OrderedDict((n, torch.Size(s)) for n, s in self.meta["shapes"].items())

    def names(self) -> List[str]:
        return list(self._shapes)

    def shapes(self):
        return self._shapes

    def get(self, name: str, kind: str = "fp32") -> torch.Tensor:
        shape = self._shapes[name]
        if kind != "fp32":  # the optimizer never sees the momentum branch: no Adam moments
            return torch.zeros(shape)
        if not self.meta.get("partitioned"):
            return read_rank_state(self.files[0])[0][name].float().view(shape)
        per = math.ceil(shape.numel() / len(self.files))
        parts = []
        for path in self.files:
            part = read_rank_state(path)[0][name].float().flatten()
            if part.numel() != per:
                raise CheckpointError(f"{path}: {name} partition has {part.numel()} elements, expected {per}")
            parts.append(part)
        return torch.cat(parts)[:shape.numel()].view(shape)

    def centers(self) -> Dict[str, torch.Tensor]:
        tensors, _ = read_rank_state(self.files[0])
        return {k: tensors[k].float() for k in CENTERS}


class MomentumState:
    """Every rank's momentum file of one tag: ``readers[t]`` per TP rank (``.get``, ``.shapes``)."""

    def __init__(self, tag_dir: str, grid: Dict[Tuple[int, int], str]):
        dps = sorted({d for d, _ in grid})
        tps = sorted({t for _, t in grid})
        if dps != list(range(len(dps))) or tps != list(range(len(tps))) or len(grid) != len(dps) * len(tps):
            raise CheckpointError(f"{tag_dir}: incomplete set of SemMIM state files (expected every DP x TP rank); "
                                  f"found {sorted(os.path.basename(p) for p in grid.values())}")
        self.tag_dir, self.dp_size, self.tp_size = tag_dir, len(dps), len(tps)
        self.readers = [_MomentumRankReader([grid[(d, t)] for d in dps], t) for t in tps]
        meta = self.readers[0].meta
        if meta.get("dp_size") != self.dp_size or meta.get("tp_size") != self.tp_size:
            raise CheckpointError(f"{tag_dir}: SemMIM state files written for DP={meta.get('dp_size')} x "
                                  f"TP={meta.get('tp_size')}, found DP={self.dp_size} x TP={self.tp_size}")
        self.step = meta.get("step")

    def names(self) -> List[str]:
        return self.readers[0].names()

    def centers(self) -> Dict[str, torch.Tensor]:
        return self.readers[0].centers()


def open_momentum_state(tag_dir: str) -> Optional[MomentumState]:
    """The tag's momentum state, or None when it has no SemMIM state files (a RILS run)."""
    grid = {}
    for path in glob.glob(os.path.join(tag_dir, "semmim_state_dp*_tp*.safetensors")):
        m = _STATE_RE.match(os.path.basename(path))
        if m:
            grid[(int(m.group(1)), int(m.group(2)))] = path
    return MomentumState(tag_dir, grid) if grid else None
