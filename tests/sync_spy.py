"""A dispatch-level spy for device->host synchronisation (test helper).

On a GPU, an op whose result the host must read (``.item()``, ``bool(tensor)``, ``nonzero``,
boolean indexing, ``unique``, ...) makes the CPU wait until every kernel queued before it has run;
then the GPU idles while the CPU launches the next kernels. A CPU has no queue, so such a sync is
invisible in a CPU run's timings. This spy sees the ops instead: inside ``with SyncSpy() as spy``,
every aten op is checked and each host read is recorded with its Python stack
(``spy.violations``), except those whose stack passes through an allowlisted call site
(``spy.allowed``: each with the documented reason). It records rather than raises, so that a
distributed test can finish its collectives on every rank and report all violations at once.

What it cannot see on a CPU (every tensor is a host tensor there, so these are no ops at all):
device-to-host copies (``.cpu()``, ``.numpy()``, ``.tolist()``: the last two are caught by patching
while the spy is active) and blocking host-to-device copies (``torch.tensor(..., device=cuda)``,
``.to(cuda)`` without ``non_blocking``), which also wait for the queue. The GPU check is
``torch.cuda.set_sync_debug_mode("error")`` (docs/performance.md).
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _ops(*names: str):
    out = {}
    for name in names:
        packet_name, _, overload = name.partition(".")
        packet = getattr(aten, packet_name, None)
        if packet is None:
            continue
        for o in ([overload] if overload else packet.overloads()):
            out[getattr(packet, o)] = name
    return out


# Ops that return a value the host must read, or whose output shape depends on tensor values.
HOST_READ_OPS = _ops("_local_scalar_dense", "is_nonzero", "equal", "nonzero", "argwhere", "masked_select",
                     "unique_dim", "unique_consecutive", "_unique", "_unique2", "unique_dim_consecutive",
                     "bincount")
# Ops that read the host only with a boolean index / without a static output size.
INDEX_OPS = _ops("index.Tensor", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put")
REPEAT_INTERLEAVE = _ops("repeat_interleave.Tensor", "repeat_interleave.self_Tensor")


@dataclass(frozen=True)
class AllowedSite:
    """A host read accepted where the stack passes through ``function`` in a file ending in ``path``."""

    path: str
    function: str
    reason: str


@dataclass
class HostRead:
    op: str
    why: str
    stack: List[str]
    site: Optional[AllowedSite] = None
    where: str = ""

    def __str__(self) -> str:
        return f"{self.op} ({self.why}) at\n" + "".join(self.stack[-12:])


def _bool_index(indices: Sequence) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _why(func, args, kwargs) -> Optional[str]:
    if func in HOST_READ_OPS:
        return "reads a value or a data-dependent shape back to the host"
    if func in INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices")
        if _bool_index(indices):
            return "boolean-mask indexing (a nonzero inside)"
    if func in REPEAT_INTERLEAVE and (kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)):
        return "repeat_interleave without output_size"
    return None


class SyncSpy(TorchDispatchMode):
    def __init__(self, allowed: Sequence[AllowedSite] = ()):
        super().__init__()
        self.allowed_sites = tuple(allowed)
        self.violations: List[HostRead] = []
        self.allowed: List[HostRead] = []
        self._patched: List[Tuple[str, object]] = []

    def _record(self, op: str, why: str) -> None:
        frames = traceback.extract_stack()[:-2]
        site = next((s for s in self.allowed_sites for f in frames
                     if f.filename.replace("\\", "/").endswith(s.path) and f.name == s.function), None)
        # the innermost frame outside torch itself names the call site
        inner = next((f for f in reversed(frames) if "/torch/" not in f.filename.replace("\\", "/")), frames[-1])
        read = HostRead(op, why, traceback.format_list(frames), site,
                        f"{inner.filename.split('site-packages/')[-1]}:{inner.lineno} in {inner.name}")
        (self.allowed if site else self.violations).append(read)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = _why(func, args, kwargs)
        if why:
            self._record(str(func), why)
        return func(*args, **kwargs)

    # .tolist() / .numpy() read memory without an aten op on a CPU tensor: watch them directly.
    def __enter__(self):
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)

            def watched(t, *a, _original=original, _name=name, **k):
                self._record(f"Tensor.{_name}", "copies the tensor to the host")
                return _original(t, *a, **k)

            self._patched.append((name, original))
            setattr(torch.Tensor, name, watched)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched:
            setattr(torch.Tensor, name, original)
        self._patched.clear()
        return super().__exit__(*exc)

    def report(self, limit: int = 5) -> str:
        """The distinct call sites of the violations (innermost frames), then the first stacks."""
        return "\n".join(sorted(self.sites())) + "\n\n" + "\n\n".join(str(v) for v in self.violations[:limit])

    def sites(self) -> set:
        return {f"{v.op} at {v.where}" for v in self.violations}


# Host reads of the optimizer step that are there by design (bf16 / fp32 ZeRO-3, torch AdamW).
STEP_SITES = (
    AllowedSite("deepspeed/runtime/utils.py", "is_invalid_grad_norm",
                "DeepSpeed ZeRO-3's step skips the update when the global gradient norm is not finite: "
                "a host branch on the norm, once per optimizer step, after backward (the one device "
                "read the step needs)"),
    AllowedSite("torch/optim/optimizer.py", "_get_value",
                "torch Adam(W) keeps its step counter in a CPU tensor (not capturable, not fused): "
                "reading it reads host memory, no device sync"),
    AllowedSite("rils_scale/parallel/comm.py", "host_values",
                "the non-finite guard's loss flag: copied to pinned host memory behind the loss, before "
                "backward, with an event; read after DeepSpeed's norm check above, which has already "
                "waited past it, so it waits for nothing"),
)
