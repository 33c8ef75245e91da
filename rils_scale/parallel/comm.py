"""Collectives on small host values (flags, counters, metrics, objects), on the right device.

NCCL only accepts CUDA tensors ("No backend type associated with device type cpu"), while gloo
accepts CPU tensors, so a CPU test suite cannot see a collective on a host tensor that would
crash the first GPU step. Every helper here moves its tensor to the group's communication device
(:func:`comm_device`) and returns the result where the caller had it. Activations, which are
already on the GPU, go through the autograd-aware functions of :mod:`.mappings`.

Group convention (as in :mod:`.mappings`): ``None`` means "no group" (a single process), and the
helper is the identity; use :func:`world_group` for a collective over every rank.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

_REDUCE_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def world_group() -> Optional[dist.ProcessGroup]:
    """The default group when torch.distributed is initialised, else ``None`` (one process)."""
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def device_for_backend(backend: str) -> torch.device:
    """The device whose tensors ``backend`` communicates.

    ``"nccl"`` (and ``"cuda:nccl"``) needs the current CUDA device; a mixed ``"cpu:gloo,cuda:nccl"``
    group and plain gloo take CPU tensors (cheaper for a few host scalars: no device sync).
    """
    b = backend.lower()
    if "gloo" in b or "mpi" in b:
        return torch.device("cpu")
    if "nccl" in b:
        return torch.device("cuda", torch.cuda.current_device())
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():  # xccl, hccl, ...
        return torch.device(accelerator.current_accelerator().type, accelerator.current_device_index())
    return torch.device("cpu")


def comm_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    return device_for_backend(str(dist.get_backend(group)))


def _op(name: str):
    return getattr(dist.ReduceOp, _REDUCE_OPS[name])


def all_reduce_no_grad(x: torch.Tensor, group: Optional[dist.ProcessGroup], op: str = "sum") -> torch.Tensor:
    """All-reduce a detached copy of ``x`` over ``group``; identity (a copy) on one rank."""
    if isinstance(op, str):
        op = _op(op)
    if group_size(group) == 1:
        return x.detach().clone()
    buf = x.detach().to(comm_device(group), copy=True).contiguous()
    dist.all_reduce(buf, op=op, group=group)
    return buf.to(x.device)


def all_reduce_values(values: Sequence[float], group: Optional[dist.ProcessGroup], op: str = "sum") -> List[float]:
    """All-reduce a list of Python numbers in float64 (one collective for all of them)."""
    if group_size(group) == 1:
        return [float(v) for v in values]
    out = all_reduce_no_grad(torch.tensor([float(v) for v in values], dtype=torch.float64), group, op)
    return out.tolist()


def any_rank(flag: bool, group: Optional[dist.ProcessGroup] = None) -> bool:
    """True on every rank if ``flag`` is true on any rank of ``group`` (default: the world)."""
    group = world_group() if group is None else group
    return all_reduce_values([1.0 if flag else 0.0], group, "max")[0] > 0


class PendingValues:
    """A device tensor's values on their way to the host, without a device-wide wait.

    The copy is queued on the current stream right behind the work that produced the values (on
    CUDA into pinned memory, non-blocking, with an event); :meth:`host_values` waits for that event
    only, never for work queued after it. Read it after something else has synchronised past it
    (e.g. DeepSpeed's per-step gradient-norm check) and it costs nothing. On a CPU it is a copy.
    """

    def __init__(self, x: torch.Tensor):
        x = x.detach()
        self._event = None
        if x.device.type == "cuda":
            self._host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            self._host.copy_(x, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = x.to("cpu", copy=True)

    def host_values(self) -> List[float]:
        if self._event is not None:
            self._event.synchronize()
        return [float(v) for v in self._host.reshape(-1).tolist()]


def any_rank_async(flags: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> PendingValues:
    """Per element, whether it is non-zero on any rank of ``group`` (default: the world), as
    :class:`PendingValues`: the all-reduce runs on the device, the host reads the result later."""
    group = world_group() if group is None else group
    return PendingValues(all_reduce_no_grad(flags.detach().float(), group, "max"))


def broadcast_values(values: Sequence[float], src: int = 0, group: Optional[dist.ProcessGroup] = None) -> List[float]:
    """Rank ``src``'s (global rank) float64 values on every rank of ``group`` (default: world)."""
    group = world_group() if group is None else group
    if group_size(group) == 1:
        return [float(v) for v in values]
    buf = torch.tensor([float(v) for v in values], dtype=torch.float64, device=comm_device(group))
    dist.broadcast(buf, src=src, group=group)
    return buf.cpu().tolist()


def agree_on_choice(choice: str, usable: Sequence[str], options: Sequence[str], fallback: str,
                    group: Optional[dist.ProcessGroup] = None) -> str:
    """One of ``options`` for every rank of ``group`` (default: the world): global rank 0's
    ``choice`` when every rank lists it in ``usable``, else ``fallback``. Two small collectives
    (a broadcast and a MIN all-reduce); for a one-time decision, not for a training step."""
    group = world_group() if group is None else group
    if group_size(group) == 1:
        return choice
    index = int(broadcast_values([list(options).index(choice)], 0, group)[0])
    usable_everywhere = all_reduce_values([float(o in usable) for o in options], group, "min")
    return options[index] if usable_everywhere[index] >= 1 else fallback


def all_gather_tensor_list(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> List[torch.Tensor]:
    """Every rank's copy of ``x`` (same shape and dtype on all ranks), on ``x``'s device."""
    n = group_size(group)
    if n == 1:
        return [x.detach().clone()]
    buf = x.detach().to(comm_device(group)).contiguous()
    parts = [torch.empty_like(buf) for _ in range(n)]
    dist.all_gather(parts, buf, group=group)
    return [p.to(x.device) for p in parts]


def all_gather_objects(obj: Any, group: Optional[dist.ProcessGroup]) -> List[Any]:
    """Every rank's ``obj`` (picklable; only our own dicts of counters, never untrusted data).

    ``all_gather_object`` serialises through a tensor on ``torch.cuda.current_device()`` under
    NCCL, so the rank's device must be set (DeepSpeed's launcher + ``set_device`` do that).
    """
    n = group_size(group)
    if n == 1:
        return [obj]
    gathered: List[Any] = [None] * n
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def barrier(group: Optional[dist.ProcessGroup] = None) -> None:
    """Barrier over ``group`` (default: world). Under NCCL, names the device so that NCCL does
    not guess one (a guess that differs between ranks hangs)."""
    group = world_group() if group is None else group
    if group_size(group) == 1:
        return
    device = comm_device(group)
    if device.type == "cuda":
        dist.barrier(group=group, device_ids=[device.index])
    else:
        dist.barrier(group=group)
