"""Process groups for world = data parallel (DP) x tensor parallel (TP).

TP groups are blocks of consecutive ranks (so they sit inside one node, where the
all-reduces of every layer are cheap); DP groups are the strided complements.
One validated :class:`ParallelDims` is built at start-up and a :class:`ParallelState`
holding the groups is passed explicitly to whatever needs it; nothing here is a
module-level global except the optional "current" state used by DeepSpeed's ``mpu``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelDims:
    """Parallel degrees of a run, validated before any compute."""

    world_size: int
    """Total number of ranks."""
    tensor_parallel: int = 1
    """Ranks that split every layer of both towers (consecutive ranks)."""
    sequence_parallel: bool = False
    """Split norm/dropout regions along the sequence inside each TP group."""

    def __post_init__(self):
        if self.world_size < 1:
            raise ValueError(f"world size must be >= 1, got {self.world_size}")
        if self.tensor_parallel < 1:
            raise ValueError(f"--tensor-parallel must be >= 1, got {self.tensor_parallel}")
        if self.world_size % self.tensor_parallel:
            raise ValueError(
                f"world size {self.world_size} is not divisible by --tensor-parallel "
                f"{self.tensor_parallel}: world = data_parallel x tensor_parallel")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ValueError("--sequence-parallel needs --tensor-parallel > 1")

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.tensor_parallel

    def tp_rank_of(self, rank: int) -> int:
        return rank % self.tensor_parallel

    def dp_rank_of(self, rank: int) -> int:
        return rank // self.tensor_parallel


@dataclass
class ParallelState:
    """The groups of one rank. ``None`` groups mean "single process"."""

    dims: ParallelDims
    rank: int = 0
    tp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None

    @property
    def tp_size(self) -> int:
        return self.dims.tensor_parallel

    @property
    def dp_size(self) -> int:
        return self.dims.data_parallel

    @property
    def tp_rank(self) -> int:
        return self.dims.tp_rank_of(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.dims.dp_rank_of(self.rank)

    @property
    def sequence_parallel(self) -> bool:
        return self.dims.sequence_parallel

    def tp_ranks(self):
        start = self.dp_rank * self.tp_size
        return list(range(start, start + self.tp_size))

    def dp_ranks(self):
        return [self.tp_rank + i * self.tp_size for i in range(self.dp_size)]


def single_process_state() -> ParallelState:
    """State for a model used outside any distributed run (tests, export, eval)."""
    return ParallelState(ParallelDims(world_size=1))


def init_parallel_state(tensor_parallel: int = 1, sequence_parallel: bool = False,
                        timeout_s: Optional[float] = None) -> ParallelState:
    """Create TP and DP groups on an initialised default process group.

    Every rank must call this, in the same order (``new_group`` is collective). ``timeout_s``
    bounds every collective of the groups (``--collective-timeout-s``): a peer that died makes
    the others fail after it instead of waiting forever.
    """
    import datetime
    kw = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    if not dist.is_initialized():
        return ParallelState(ParallelDims(1, tensor_parallel, sequence_parallel))
    world, rank = dist.get_world_size(), dist.get_rank()
    dims = ParallelDims(world, tensor_parallel, sequence_parallel)
    tp_group = dp_group = None
    for d in range(dims.data_parallel):
        ranks = list(range(d * tensor_parallel, (d + 1) * tensor_parallel))
        group = dist.new_group(ranks, **kw)
        if rank in ranks:
            tp_group = group
    for t in range(tensor_parallel):
        ranks = list(range(t, world, tensor_parallel))
        group = dist.new_group(ranks, **kw)
        if rank in ranks:
            dp_group = group
    state = ParallelState(dims, rank, tp_group, dp_group)
    set_current_state(state)
    return state


_CURRENT: Optional[ParallelState] = None


def set_current_state(state: ParallelState) -> None:
    global _CURRENT
    _CURRENT = state


def current_state() -> ParallelState:
    """The state built by :func:`init_parallel_state`, or a single-process one."""
    return _CURRENT if _CURRENT is not None else single_process_state()


class DeepSpeedMPU:
    """The ``mpu`` interface DeepSpeed reads (model parallel = our tensor parallel).

    Passed to ``deepspeed.initialize`` and ``deepspeed.zero.Init`` so that ZeRO partitions
    over the DP group only and gradient norms reduce over the right groups.
    """

    def __init__(self, state: ParallelState):
        self.state = state

    def _world(self):
        return dist.group.WORLD

    # tensor (model) parallel
    def get_model_parallel_group(self):
        return self.state.tp_group if self.state.tp_group is not None else self._world()

    def get_model_parallel_rank(self):
        return self.state.tp_rank

    def get_model_parallel_world_size(self):
        return self.state.tp_size

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self):
        return self.state.dp_rank * self.state.tp_size

    # data parallel
    def get_data_parallel_group(self):
        return self.state.dp_group if self.state.dp_group is not None else self._world()

    def get_data_parallel_rank(self):
        return self.state.dp_rank

    def get_data_parallel_world_size(self):
        return self.state.dp_size

    def get_data_parallel_group_ranks(self):
        return self.state.dp_ranks()

    # no pipeline parallelism
    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_rank(self):
        return 0

    def get_pipe_parallel_world_size(self):
        return 1
