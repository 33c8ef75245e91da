"""How tensor-parallel shards map to full tensors: pure functions, plus one collective.

A TP shard is described by three numbers, stored as attributes on every sharded
parameter by :func:`rils_scale.parallel.layers.set_tensor_parallel_attributes`:

- ``partition_dim``: the dimension that is split (0 for column-parallel weights and biases,
  q/v biases and the vocab-parallel embedding; 1 for row-parallel weights);
- ``partition_stride``: number of equal blocks the full dimension is made of, each of which
  is split separately (3 for the fused qkv weight ``[3D, D]``: rank r holds rows
  ``[q_r; k_r; v_r]``, so its q, k and v belong to the same heads);
- ``vocab_size``: for the vocab-parallel embedding only, the real number of rows; the full
  tensor is padded to a multiple of TP with zero rows that :func:`merge_shards` drops.

:func:`split_full_tensor` and :func:`merge_shards` are exact inverses and never communicate;
the layers use the first to build their shards, the checkpoint converter and the tests use
the second. :func:`gather_full_tensor` all-gathers one parameter's shards over a TP group and
merges them (tests, debugging; not for ZeRO-3 partitioned parameters, gather those first).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .comm import all_gather_tensor_list


@dataclass(frozen=True)
class ShardSpec:
    """How one parameter is split over TP ranks."""

    partition_dim: int
    """Dimension that is split."""
    stride: int = 1
    """Equal blocks of the full dimension, each split separately (3 for fused qkv)."""
    vocab_size: Optional[int] = None
    """Unpadded length of ``partition_dim`` (vocab-parallel embedding only)."""


def padded_size(size: int, tp_size: int, stride: int = 1) -> int:
    """``size`` rounded up to a multiple of ``tp_size * stride``."""
    unit = tp_size * stride
    return -(-size // unit) * unit


def split_full_tensor(full: torch.Tensor, partition_dim: int, tp_size: int, tp_rank: Optional[int] = None,
                      *, stride: int = 1, pad: bool = False) -> torch.Tensor | List[torch.Tensor]:
    """Cut a full tensor into TP shards, exactly as the TP layers do.

    Args:
        full: the tensor a TP = 1 model holds.
        partition_dim: dimension to split.
        tp_size: number of TP ranks.
        tp_rank: return only this rank's shard; ``None`` returns the list of all shards.
        stride: the dimension is ``stride`` equal blocks (q, k, v); rank r gets its slice of
            every block, concatenated in block order.
        pad: append zero slices up to a multiple of ``tp_size`` (vocab-parallel embedding);
            without it an indivisible size raises ``ValueError``.

    Returns:
        One contiguous shard (new memory) or a list of ``tp_size`` of them.
    """
    size = full.shape[partition_dim]
    if pad:
        if stride != 1:
            raise ValueError("padding is only defined for stride 1 (vocab-parallel tables)")
        extra = padded_size(size, tp_size) - size
        if extra:
            shape = list(full.shape)
            shape[partition_dim] = extra
            full = torch.cat([full, full.new_zeros(shape)], dim=partition_dim)
    elif size % (tp_size * stride):
        raise ValueError(f"dim {partition_dim} of shape {tuple(full.shape)} is not divisible by "
                         f"TP={tp_size} x stride {stride}")
    blocks = full.chunk(stride, dim=partition_dim)
    per = blocks[0].shape[partition_dim] // tp_size

    def shard(r: int) -> torch.Tensor:
        return torch.cat([b.narrow(partition_dim, r * per, per) for b in blocks], dim=partition_dim).contiguous()

    if tp_rank is not None:
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank {tp_rank} outside [0, {tp_size})")
        return shard(tp_rank)
    return [shard(r) for r in range(tp_size)]


def merge_shards(shards: Sequence[torch.Tensor], partition_dim: int, stride: int = 1,
                 vocab_size: Optional[int] = None) -> torch.Tensor:
    """Rebuild the full tensor from the TP shards (in TP-rank order); inverse of
    :func:`split_full_tensor`.

    Column-parallel weights and biases: ``partition_dim=0`` (qkv: ``stride=3``); row-parallel
    weights: ``partition_dim=1``; vocab-parallel embedding: ``partition_dim=0`` and
    ``vocab_size`` to drop the padding rows.
    """
    if len(shards) == 0:
        raise ValueError("no shards to merge")
    if len(shards) == 1 or stride == 1:
        full = torch.cat(list(shards), dim=partition_dim)
    else:
        pieces = [s.chunk(stride, dim=partition_dim) for s in shards]
        full = torch.cat([pieces[r][b] for b in range(stride) for r in range(len(shards))], dim=partition_dim)
    if vocab_size is not None:
        if vocab_size > full.shape[partition_dim]:
            raise ValueError(f"vocab_size {vocab_size} > merged size {full.shape[partition_dim]}")
        full = full.narrow(partition_dim, 0, vocab_size)
    return full.contiguous()


def shard_spec(param: torch.Tensor) -> Optional[ShardSpec]:
    """The :class:`ShardSpec` stored on a parameter, or ``None`` if it is replicated."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return ShardSpec(int(param.partition_dim), int(getattr(param, "partition_stride", 1)),
                     getattr(param, "vocab_size", None))


def tensor_parallel_layout(model: nn.Module) -> Dict[str, ShardSpec]:
    """``{parameter name: ShardSpec}`` of a model built with TP > 1 (replicated ones omitted).

    Works under ZeRO-3 (attributes survive partitioning). The checkpoint converter stores this
    table next to the shards so it can merge them without building the model.
    """
    return {name: spec for name, p in model.named_parameters() if (spec := shard_spec(p)) is not None}


def gather_full_tensor(shard: torch.Tensor, group, spec: Optional[ShardSpec] = None) -> torch.Tensor:
    """Collective over ``group``: all-gather a TP shard and merge it into the full tensor.

    ``spec`` defaults to the attributes of ``shard`` (a parameter); a replicated tensor
    (no spec) is returned as is. Every rank of ``group`` must call it. Detached: for
    checks and export, not for autograd.
    """
    spec = spec if spec is not None else shard_spec(shard)
    n = 1 if group is None or not dist.is_initialized() else dist.get_world_size(group)
    if spec is None or n == 1:
        return shard.detach().clone()
    parts = all_gather_tensor_list(shard, group)
    return merge_shards(parts, spec.partition_dim, spec.stride, spec.vocab_size)


def gather_full_tensors(shards: Sequence[torch.Tensor], specs: Sequence[Optional[ShardSpec]],
                        group) -> List[torch.Tensor]:
    """Collective: :func:`gather_full_tensor` for many tensors with one all-gather.

    ``shards`` must share a dtype; replicated entries (spec ``None``) are returned as clones.
    Every rank of ``group`` must pass the same shapes in the same order.
    """
    n = 1 if group is None or not dist.is_initialized() else dist.get_world_size(group)
    sharded = [i for i, s in enumerate(specs) if s is not None]
    out = [t.detach().clone() for t in shards]
    if n == 1 or not sharded:
        return out
    flat = torch.cat([shards[i].detach().reshape(-1) for i in sharded])
    parts = all_gather_tensor_list(flat, group)
    offset = 0
    for i in sharded:
        numel, shape, spec = shards[i].numel(), shards[i].shape, specs[i]
        pieces = [p[offset:offset + numel].view(shape) for p in parts]
        out[i] = merge_shards(pieces, spec.partition_dim, spec.stride, spec.vocab_size)
        offset += numel
    return out
