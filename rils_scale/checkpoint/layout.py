"""Where things are: run directories, DeepSpeed shard files, and the TP layout of the model.

A run directory (``--output-dir`` of ``launchers/pretrain.py``)::

    RUN/config.json                    {"train", "model", "deepspeed", "parallel", "tokenizer", ...}
    RUN/tokenizer.model                SentencePiece model used for training
    RUN/metrics.jsonl, RUN/tensorboard/
    RUN/checkpoints/latest             text file: the newest tag, e.g. "global_step2000"
    RUN/checkpoints/global_stepN/      one DeepSpeed checkpoint (files below)

Files of one tag, for DP rank ``d`` and TP rank ``t`` (DeepSpeed 0.19)::

    ZeRO-3:   zero_pp_rank_{d}_mp_rank_{t:02d}_model_states.pt   param shapes + client state
              [bf16_]zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt
                                                     fp32 flat partitions ("fp32_flat_groups") + Adam
    ZeRO-1/2: mp_rank_{t:02d}_model_states.pt        low-precision weights, param shapes, client state
              [bf16_]zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt
                                                     fp32 partitions ("single_partition_of_fp32_groups")
    ZeRO-0:   mp_rank_{t:02d}_model_states.pt        weights (+ fp32 master groups for bf16) + optimizer
    ours:     rils_weights.json + tp_rank_{t:02d}.safetensors   weights-only (convert_checkpoint.py
                                                     --format deepspeed), read by the trainer's resume

The ``bf16_`` prefix appears when bf16 is enabled. ``zero_to_fp32.py`` copied into the
checkpoints directory reads only ``mp_rank_00``; this package reads every TP rank.
"""
from __future__ import annotations

import contextlib
import copy
import glob
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional
from unittest import mock

from ..models.config import RILSConfig
from ..parallel.sharding import ShardSpec

WEIGHTS_ONLY_MARKER = "rils_weights.json"
"""Marker file of a weights-only checkpoint written by ``export_deepspeed``."""

_ZERO3_MODEL = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_MP_MODEL = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as asked (missing files, wrong layout...)."""


@dataclass
class CheckpointRef:
    """A resolved checkpoint: the tag directory and, when known, its run directory."""

    path: str
    """The tag directory (``.../checkpoints/global_stepN``)."""
    tag: str
    """Its name."""
    run_dir: Optional[str] = None
    """The run directory holding ``config.json`` and ``tokenizer.model`` (None if unknown)."""

    def run_config(self) -> Optional[dict]:
        if self.run_dir and os.path.isfile(os.path.join(self.run_dir, "config.json")):
            with open(os.path.join(self.run_dir, "config.json")) as f:
                return json.load(f)
        return None

    def tokenizer_path(self) -> Optional[str]:
        """The run's tokenizer copy, else the path the run was started with, else None."""
        if self.run_dir:
            local = os.path.join(self.run_dir, "tokenizer.model")
            if os.path.isfile(local):
                return local
        cfg = self.run_config() or {}
        path = cfg.get("train", {}).get("tokenizer")
        return path if path and os.path.isfile(path) else None


def _is_tag_dir(path: str) -> bool:
    names = os.listdir(path)
    return WEIGHTS_ONLY_MARKER in names or any(n.endswith("_model_states.pt") for n in names)


def _tags(checkpoints_dir: str) -> List[str]:
    tags = [os.path.basename(p) for p in glob.glob(os.path.join(checkpoints_dir, "*")) if os.path.isdir(p)]
    tags = [t for t in tags if _is_tag_dir(os.path.join(checkpoints_dir, t))]

    def key(t):
        m = re.search(r"(\d+)$", t)
        return (int(m.group(1)) if m else -1, t)
    return sorted(tags, key=key)


def resolve_checkpoint(path: str, tag: Optional[str] = None) -> CheckpointRef:
    """Accept a run directory, its ``checkpoints/`` directory or a tag directory.

    Without ``tag`` the tag named in ``latest`` is used, else the highest ``global_stepN``.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path} does not exist or is not a directory")
    if _is_tag_dir(path):
        if tag is not None and tag != os.path.basename(path):
            raise CheckpointError(f"{path} is the checkpoint {os.path.basename(path)!r}; --tag {tag} does not apply")
        checkpoints_dir = os.path.dirname(path)
        parent = os.path.dirname(checkpoints_dir)
        run_dir = parent if os.path.isfile(os.path.join(parent, "config.json")) else None
        return CheckpointRef(path, os.path.basename(path), run_dir)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        run_dir, checkpoints_dir = path, os.path.join(path, "checkpoints")
    else:
        checkpoints_dir = path
        parent = os.path.dirname(path)
        run_dir = parent if os.path.isfile(os.path.join(parent, "config.json")) else None
    available = _tags(checkpoints_dir)
    if tag is None:
        latest = os.path.join(checkpoints_dir, "latest")
        if os.path.isfile(latest):
            with open(latest) as f:
                tag = f.read().strip()
        elif available:
            tag = available[-1]
        else:
            raise CheckpointError(f"no checkpoint found under {checkpoints_dir} (no 'latest' file, no tag directories)")
    tag_dir = os.path.join(checkpoints_dir, tag)
    if not os.path.isdir(tag_dir) or not _is_tag_dir(tag_dir):
        raise CheckpointError(f"checkpoint tag {tag!r} not found in {checkpoints_dir}; available: {available or 'none'}")
    return CheckpointRef(tag_dir, tag, run_dir)


@dataclass
class ShardFiles:
    """The files of one tag, indexed by TP rank then DP rank."""

    kind: str
    """``zero3`` | ``zero12`` | ``zero0`` | ``weights_only``."""
    tp_size: int
    dp_size: int
    model_files: Dict[int, List[str]] = field(default_factory=dict)
    """TP rank -> model-states files (ZeRO-3: one per DP rank; otherwise one)."""
    optim_files: Dict[int, List[str]] = field(default_factory=dict)
    """TP rank -> optimizer-states files, ordered by DP rank (empty for ZeRO-0)."""


def discover_files(tag_dir: str) -> ShardFiles:
    """Classify the files of a tag directory and check that no rank is missing."""
    names = sorted(os.listdir(tag_dir))
    if WEIGHTS_ONLY_MARKER in names:
        with open(os.path.join(tag_dir, WEIGHTS_ONLY_MARKER)) as f:
            meta = json.load(f)
        tp = int(meta["tensor_parallel"])
        files = {t: [os.path.join(tag_dir, meta["files"][t])] for t in range(tp)}
        for t, (p,) in files.items():
            if not os.path.isfile(p):
                raise CheckpointError(f"{tag_dir}: weights-only checkpoint is missing {os.path.basename(p)}")
        return ShardFiles("weights_only", tp, 1, files, {})
    zero3 = {(int(m.group(1)), int(m.group(2))): n for n in names if (m := _ZERO3_MODEL.match(n))}
    mp = {int(m.group(1)): n for n in names if (m := _MP_MODEL.match(n))}
    optim = {(int(m.group(1)), int(m.group(2))): n for n in names if (m := _OPTIM.match(n))}

    def grid(entries, what):
        dps = sorted({d for d, _ in entries})
        tps = sorted({t for _, t in entries})
        dp, tp = len(dps), len(tps)
        if dps != list(range(dp)) or tps != list(range(tp)) or len(entries) != dp * tp:
            have = ", ".join(sorted(entries.values()))
            raise CheckpointError(f"{tag_dir}: incomplete set of {what} files (expected every DP x TP rank); "
                                  f"found: {have}")
        return dp, tp

    join = lambda n: os.path.join(tag_dir, n)  # noqa: E731
    if zero3:
        dp, tp = grid(zero3, "ZeRO-3 model-states")
        if optim and grid(optim, "optimizer-states") != (dp, tp):
            raise CheckpointError(f"{tag_dir}: model-states and optimizer-states files disagree on DP x TP")
        if not optim:
            raise CheckpointError(f"{tag_dir}: ZeRO-3 checkpoint without *_optim_states.pt files: the fp32 "
                                  "weights live there (was the checkpoint copied incompletely?)")
        return ShardFiles("zero3", tp, dp,
                          {t: [join(zero3[(d, t)]) for d in range(dp)] for t in range(tp)},
                          {t: [join(optim[(d, t)]) for d in range(dp)] for t in range(tp)})
    if mp:
        tp = len(mp)
        if sorted(mp) != list(range(tp)):
            raise CheckpointError(f"{tag_dir}: missing mp_rank_XX_model_states.pt files; found {sorted(mp.values())}")
        if optim:
            dp, tp_o = grid(optim, "optimizer-states")
            if tp_o != tp:
                raise CheckpointError(f"{tag_dir}: {tp} model-states files but optimizer states for TP={tp_o}")
            return ShardFiles("zero12", tp, dp, {t: [join(mp[t])] for t in range(tp)},
                              {t: [join(optim[(d, t)]) for d in range(dp)] for t in range(tp)})
        return ShardFiles("zero0", tp, 1, {t: [join(mp[t])] for t in range(tp)}, {})
    raise CheckpointError(f"{tag_dir} holds no DeepSpeed model-states files")


# ------------------------------------------------------------------------- tensor-parallel layout
def _structural_config(cfg: RILSConfig, tp_size: int) -> RILSConfig:
    """The same module tree at a tiny width: every parameter name and every TP split rule is kept
    (heads, depths and vocabulary are unchanged), only the widths shrink (head dim 4, MLP ratio 1)."""
    small = copy.deepcopy(cfg)
    v, t = small.vision, small.text
    v.width, v.mlp_ratio = v.heads * 4, 1.0
    v.image_size = v.patch_size * 2
    t.width, t.mlp_ratio = t.heads * 4, 1.0
    t.context_length = min(t.context_length, 4)
    small.embed_dim = 4
    return small


@contextlib.contextmanager
def _pretend_tensor_parallel(tp_size: int):
    """Make the TP layers believe they run on TP rank 0 of ``tp_size`` (no process group needed)."""
    from ..models import transformer
    from ..parallel import layers
    size = lambda group: tp_size if group is not None else 1  # noqa: E731
    rank = lambda group: 0  # noqa: E731
    with mock.patch.object(layers, "_size", size), mock.patch.object(layers, "_rank", rank), \
            mock.patch.object(transformer, "_size", size):
        yield


def tensor_parallel_layout_for(cfg: RILSConfig, tp_size: int) -> Dict[str, ShardSpec]:
    """``{parameter name: ShardSpec}`` of the RILS model at TP = ``tp_size`` (replicated omitted).

    Read from the TP layers themselves: the model is built at a tiny width with the layers
    told they are TP rank 0 of ``tp_size``, and :func:`tensor_parallel_layout` collects the
    ``partition_dim`` / ``partition_stride`` / ``vocab_size`` attributes they set -- the same
    attributes the training run used. No string matching on names, no process group, and a
    few MB of memory even for ViT-g.
    """
    from ..models import ParallelSpec, build_model
    from ..parallel.sharding import tensor_parallel_layout
    if tp_size == 1:
        return {}
    with _pretend_tensor_parallel(tp_size):
        model = build_model(_structural_config(cfg, tp_size), ParallelSpec(tp_group=object()), attn_backend="math")
    return tensor_parallel_layout(model)


def model_parameter_names(cfg: RILSConfig) -> List[str]:
    """Parameter names of the single-process model (structure only, built at a tiny width)."""
    from ..models import build_model
    return [n for n, _ in build_model(_structural_config(cfg, 1), attn_backend="math").named_parameters()]
