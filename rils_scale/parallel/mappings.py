"""Autograd-aware collectives, Megatron style, in three levels.

1. private tensor functions (``_all_reduce``, ``_split``, ``_gather``) that do one collective;
2. autograd Functions pairing a forward with its backward;
3. public wrappers named for what they do, each docstring stating both directions.

Every function takes its process group explicitly; a ``None`` group or a group of one rank
makes it the identity, so single-process code paths run the same lines.
gloo (CPU) has no reduce-scatter; we emulate it with all-reduce + split, which moves more
bytes but gives the same numbers. ``bytes_sent`` counters feed the communication benchmark.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
import torch.distributed as dist

from .comm import all_reduce_no_grad  # noqa: F401  (re-exported: host values live in comm)

# Bytes this rank has sent, by collective kind, estimated with the ring algorithm
# (all-reduce: 2(n-1)/n of the buffer; all-gather / reduce-scatter: (n-1)/n of the full tensor).
COMM_BYTES = defaultdict(int)


def _size(group) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _rank(group) -> int:
    if group is None or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def _account(kind: str, tensor: torch.Tensor, factor: float) -> None:
    if torch.compiler.is_compiling():  # a Python side effect: not inside compiled blocks (--compile)
        return
    COMM_BYTES[kind] += int(tensor.numel() * tensor.element_size() * factor)


# ---------------------------------------------------------------------------- level 1

def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    x = x.contiguous()
    _account("all_reduce", x, 2 * (n - 1) / n)
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} over {n} ranks")
    return x.chunk(n, dim=dim)[_rank(group)].contiguous()


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    _account("all_gather", x, n - 1)
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    x = x.contiguous().clone()
    # Ring reduce-scatter sends (n-1)/n of the input; we count what NCCL would send.
    _account("reduce_scatter", x, (n - 1) / n)
    dist.all_reduce(x, group=group)
    return _split(x, dim, group)


# ---------------------------------------------------------------------------- level 2

class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim, ctx.group), None, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim, ctx.group), None, None


class _GatherToReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


# ---------------------------------------------------------------------------- level 3

def copy_to_tensor_parallel_region(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Forward: identity. Backward: all-reduce (sum) over ``group``.

    Input of a column-parallel layer: every rank uses the whole input, so the gradient
    of the input is the sum of the ranks' partial gradients.
    """
    if _size(group) == 1:
        return x
    return _CopyToRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Forward: all-reduce (sum) over ``group``. Backward: identity.

    Output of a row-parallel layer: each rank holds a partial sum of the product.
    """
    if _size(group) == 1:
        return x
    return _ReduceFromRegion.apply(x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """Forward: keep this rank's chunk of ``dim``. Backward: all-gather along ``dim``."""
    if _size(group) == 1:
        return x
    return _ScatterToRegion.apply(x, dim, group)


def scatter_rows_to_tensor_parallel_region(tensors, group):
    """Split rows (dim 0) of equally long tensors over the TP ranks, each rank keeping its share
    of every tensor; rows are zero-padded to a multiple of the TP size first (callers weight the
    padding 0). Backward: all-gather. The row count is static, so the padding is too."""
    tp = _size(group)
    if tp == 1:
        return list(tensors)
    out = []
    for t in tensors:
        pad = (-t.shape[0]) % tp
        if pad:
            t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
        out.append(_ScatterToRegion.apply(t, 0, group))
    return out


def gather_from_tensor_parallel_region(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """Forward: all-gather chunks along ``dim``. Backward: keep this rank's chunk."""
    if _size(group) == 1:
        return x
    return _GatherFromRegion.apply(x, dim, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """Forward: keep this rank's chunk of the token dimension. Backward: all-gather it."""
    return scatter_to_tensor_parallel_region(x, group, dim)


def gather_from_sequence_parallel_region(x: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """Forward: all-gather the token dimension. Backward: reduce-scatter the gradient.

    Entry of a column-parallel layer under sequence parallelism: every rank's partial
    gradient of the full sequence is summed, and each keeps its own tokens.
    """
    if _size(group) == 1:
        return x
    return _GatherToReduceScatter.apply(x, dim, group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """Forward: reduce-scatter along the token dimension. Backward: all-gather.

    Exit of a row-parallel layer under sequence parallelism (replaces the all-reduce).
    """
    if _size(group) == 1:
        return x
    return _ReduceScatterToRegion.apply(x, dim, group)


class _AllGatherBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.rows = x.shape[0]
        return _gather(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss may depend on every rank's rows: sum, then keep ours.
        grad = _all_reduce(grad.contiguous().clone(), ctx.group)
        start = _rank(ctx.group) * ctx.rows
        return grad[start:start + ctx.rows], None


def all_gather_batch(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Forward: concatenate the ranks' batches along dim 0 (rank order).
    Backward: all-reduce (sum) the gradient over ``group`` and keep this rank's rows.

    Used over the data-parallel group for the contrastive loss and the sentence
    prototypes, so that gradients reach the rank that produced each row. Together
    with DeepSpeed's averaging of gradients over DP this gives the gradient of the
    global-batch loss.
    """
    if _size(group) == 1:
        return x
    return _AllGatherBatch.apply(x, group)
