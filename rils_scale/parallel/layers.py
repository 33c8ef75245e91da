"""Megatron-style tensor-parallel layers that are also the plain layers (TP = 1).

Every layer takes its TP process group explicitly (``None`` = single process) and builds
its shard as the slice of the full weight a TP = 1 model draws from the same seed: the full
weight is initialised on CPU with the default generator, then sliced. So TP = k and TP = 1
compute the same function, and the generator advances identically on every rank.

Sharded parameters carry ``tensor_model_parallel = True``, ``partition_dim`` and
``partition_stride`` for DeepSpeed's gradient-norm code, the optimizer groups and the
checkpoint converter. Plain autograd only (no fused ``main_grad`` accumulation), so ZeRO's
gradient hooks see every gradient (DESIGN §7).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .sharding import padded_size, split_full_tensor
from .mappings import (
    _rank,
    _size,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)

InitMethod = Callable[[torch.Tensor], torch.Tensor]


def initialized_tensor(shape, init_method: "InitMethod") -> torch.Tensor:
    """A float32 CPU tensor filled by ``init_method`` from the default CPU generator.

    Every weight of the model is drawn through here, so a model draws the same numbers
    whatever the device, the TP size and the precision: under ``deepspeed.zero.Init`` tensor
    constructors return the config's dtype (bf16) on the accelerator, and a bf16 tensor's
    ``uniform_`` consumes the generator differently from an fp32 one. ``.float()`` undoes
    that before drawing; ZeRO casts the parameter afterwards.
    """
    if torch.empty(0).device.type == "meta":  # building on the meta device: shapes only
        return torch.empty(tuple(shape), dtype=torch.float32)
    full = torch.empty(tuple(shape), dtype=torch.float32, device="cpu").float().cpu()
    init_method(full)
    return full


def xavier_uniform(w: torch.Tensor) -> torch.Tensor:
    return nn.init.xavier_uniform_(w)


def normal_init(std: float) -> InitMethod:
    return lambda w: nn.init.normal_(w, std=std)


def zeros_init(w: torch.Tensor) -> torch.Tensor:
    return nn.init.zeros_(w)


def set_tensor_parallel_attributes(param: torch.Tensor, partition_dim: int, stride: int = 1) -> None:
    """Mark a parameter as a TP shard of a larger tensor."""
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = stride


def is_tensor_parallel_shard(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def shard_of(full: torch.Tensor, dim: int, group, stride: int = 1) -> torch.Tensor:
    """This rank's slice of ``full`` along ``dim`` (see :func:`.sharding.split_full_tensor`).

    ``stride`` > 1 handles fused weights such as qkv ``[3 * D, D]``: the dimension is cut
    into ``stride`` equal blocks (q, k, v) and each rank takes its slice of every block,
    so a rank's q, k and v belong to the same heads.
    """
    n = _size(group)
    if n == 1:
        return full.clone()
    return split_full_tensor(full, dim, n, _rank(group), stride=stride)


def _sharded_parameter(shape, init_method: InitMethod, dim: int, group, stride: int = 1) -> nn.Parameter:
    full = initialized_tensor(shape, init_method)
    param = nn.Parameter(shard_of(full, dim, group, stride))
    if _size(group) > 1:
        set_tensor_parallel_attributes(param, dim, stride)
    return param


def sharded_parameter(full_shape, dim: int, group, init_method: InitMethod = zeros_init,
                      stride: int = 1) -> nn.Parameter:
    """A free-standing parameter sharded like a column-parallel output (e.g. q/v biases)."""
    if full_shape[dim] % (_size(group) * stride):
        raise ValueError(f"dim {dim} of {tuple(full_shape)} is not divisible by TP={_size(group)}")
    return _sharded_parameter(full_shape, init_method, dim, group, stride)


def sequence_parallel_weight(param: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """A replicated parameter used on this rank's tokens only (sequence-parallel region).

    Its gradient from this rank covers only this rank's tokens, so it must be summed over
    TP. DeepSpeed will not do it (DESIGN §7); routing the parameter through
    ``copy_to_tensor_parallel_region`` (identity forward, all-reduce backward) makes the
    gradient that reaches ZeRO's hooks already complete.
    """
    return copy_to_tensor_parallel_region(param, group) if sequence_parallel else param


def activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a GEMM on ``x`` computes in: autocast's when it is on, else ``x``'s own."""
    kind = x.device.type
    if kind in ("cuda", "cpu", "xpu") and x.is_floating_point() and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype  # no autocast (or a device without it, e.g. meta)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear``, except while torch.compile traces (``--compile``, models/compile.py).

    Under ZeRO-3 DeepSpeed replaces ``F.linear`` by its own autograd Function, which re-gathers
    the weight in backward through Python calls dynamo cannot trace. A compiled block is a
    ZeRO-3 leaf module: all its parameters are gathered before its forward and again before its
    backward by the hooks around the block, so the plain op is right inside it.
    """
    if torch.compiler.is_compiling():
        return torch._C._nn.linear(x, weight, bias)
    return F.linear(x, weight, bias)


class SequenceParallelLayerNorm(nn.LayerNorm):
    """LayerNorm whose affine gradients are summed over TP when sequence parallel is on."""

    def __init__(self, dim: int, eps: float = 1e-6, *, tp_group=None, sequence_parallel: bool = False):
        super().__init__(dim, eps=eps)
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and _size(tp_group) > 1
        if self.sequence_parallel:
            self.weight.sequence_parallel = self.bias.sequence_parallel = True

    def forward(self, x):
        w = sequence_parallel_weight(self.weight, self.tp_group, self.sequence_parallel)
        b = sequence_parallel_weight(self.bias, self.tp_group, self.sequence_parallel)
        # Autocast runs layer_norm in fp32 and returns fp32, which the next GEMM would cast
        # again: hand it the compute dtype at once, so no fp32 copy sits between norm and matmul
        # (the residual stream keeps its own dtype).
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps).to(activation_dtype(x))


class ColumnParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A`` split along its output features.

    Forward: the input is copied to the TP region (identity forward, all-reduce backward);
    under sequence parallelism it is all-gathered along ``sequence_dim`` instead. The output
    stays split unless ``gather_output``.
    """

    def __init__(self, in_features: int, out_features: int, *, tp_group=None, bias: bool = True,
                 gather_output: bool = False, stride: int = 1, sequence_parallel: bool = False,
                 sequence_dim: int = 1, init_method: InitMethod = xavier_uniform):
        super().__init__()
        tp = _size(tp_group)
        if out_features % (tp * stride):
            raise ValueError(f"output features {out_features} not divisible by "
                             f"TP={tp} (x stride {stride})")
        self.in_features, self.out_features = in_features, out_features
        self.tp_group, self.gather_output = tp_group, gather_output
        self.sequence_parallel, self.sequence_dim = sequence_parallel and tp > 1, sequence_dim
        self.weight = _sharded_parameter((out_features, in_features), init_method, 0, tp_group, stride)
        self.bias = sharded_parameter((out_features,), 0, tp_group, zeros_init, stride) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.tp_group, self.sequence_dim)
        else:
            x = copy_to_tensor_parallel_region(x, self.tp_group)
        y = linear(x, self.weight, self.bias)
        if self.gather_output:
            y = gather_from_tensor_parallel_region(y, self.tp_group, dim=-1)
        return y

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, tp={_size(self.tp_group)}"


class RowParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A`` split along its input features.

    Forward: each rank multiplies its slice of the input, partial sums are all-reduced
    (reduce-scattered along ``sequence_dim`` under sequence parallelism), then the
    replicated bias is added. Backward of the reduction: identity (all-gather under SP).
    """

    def __init__(self, in_features: int, out_features: int, *, tp_group=None, bias: bool = True,
                 input_is_parallel: bool = True, sequence_parallel: bool = False,
                 sequence_dim: int = 1, init_method: InitMethod = xavier_uniform):
        super().__init__()
        tp = _size(tp_group)
        if in_features % tp:
            raise ValueError(f"input features {in_features} not divisible by TP={tp}")
        self.in_features, self.out_features = in_features, out_features
        self.tp_group, self.input_is_parallel = tp_group, input_is_parallel
        self.sequence_parallel, self.sequence_dim = sequence_parallel and tp > 1, sequence_dim
        self.weight = _sharded_parameter((out_features, in_features), init_method, 1, tp_group)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if self.bias is not None and self.sequence_parallel:
            self.bias.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, self.tp_group, dim=-1)
        y = linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.tp_group, self.sequence_dim)
        else:
            y = reduce_from_tensor_parallel_region(y, self.tp_group)
        if self.bias is None:
            return y
        # In y's dtype, as F.linear adds its bias under autocast: an fp32 bias would promote
        # the residual stream (and every activation after it) to fp32.
        return y + sequence_parallel_weight(self.bias, self.tp_group, self.sequence_parallel).to(y.dtype)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, tp={_size(self.tp_group)}"


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocabulary rounded up to a multiple of TP (padding rows are zero and never indexed)."""
    return padded_size(vocab_size, tp)


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the vocabulary.

    Each rank looks up the ids in its range (others give zero rows) and the partial
    results are all-reduced. The table is padded to a multiple of TP; the padding rows are
    zero, never looked up, and dropped by the checkpoint converter.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group=None,
                 init_method: InitMethod = normal_init(0.02)):
        super().__init__()
        tp = _size(tp_group)
        self.num_embeddings, self.embedding_dim, self.tp_group = num_embeddings, embedding_dim, tp_group
        self.padded_num_embeddings = padded_vocab_size(num_embeddings, tp)
        full = initialized_tensor((num_embeddings, embedding_dim), init_method)  # as a TP = 1 table
        per = self.padded_num_embeddings // tp
        self.vocab_start = _rank(tp_group) * per
        self.vocab_end = self.vocab_start + per
        self.weight = nn.Parameter(split_full_tensor(full, 0, tp, _rank(tp_group), pad=True))
        if tp > 1:
            set_tensor_parallel_attributes(self.weight, 0)
            self.weight.vocab_size = num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if _size(self.tp_group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(out, self.tp_group)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, tp={_size(self.tp_group)}"
