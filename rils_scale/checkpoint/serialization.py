"""File I/O for checkpoints: safe reading of DeepSpeed's ``.pt`` files and a streaming
safetensors writer.

Reading. DeepSpeed pickles a few of its own objects next to the tensors (``LossScaler``,
``ZeroStageEnum``, the ``fragment_address`` dataclass of ZeRO-1/2). We load every file with
``torch.load(weights_only=True)`` and map exactly those global names to inert stand-in classes
defined here, so no DeepSpeed code (and no other code) runs while unpickling, and DeepSpeed
does not even have to be installed to convert a checkpoint. Before and after unpickling the file
is held to the bounds of :mod:`.file_bounds` (the globals a DeepSpeed file uses, bounded
objects, tensors backed by the archive's storages); anything else is refused naming the file;
``load_ds_file(..., trusted=True)`` (CLI: ``--trust-pickle``) falls back to a full unpickle,
which is only acceptable for files you wrote yourself. Files are memory-mapped (``mmap=True``): tensors are read from disk when
touched, so the optimizer moments stored next to the fp32 master weights never enter memory.

Writing. :class:`StreamingSafetensorsWriter` writes the safetensors header first (names,
dtypes, shapes, offsets known in advance) and then each tensor at its offset, in any order,
so a converter never holds more than one tensor: peak memory is one tensor, not one model.
The files are ordinary safetensors files (``safetensors.torch.load_file`` reads them).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch

from .layout import CheckpointError


# ---------------------------------------------------------------------------------- reading
class _LossScalerStandIn:
    """Stand-in for ``deepspeed.runtime.fp16.loss_scaler.LossScaler`` (state only)."""

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


class _DynamicLossScalerStandIn(_LossScalerStandIn):
    pass


def _zero_stage_standin(value):
    """Stand-in for ``ZeroStageEnum(value)``: the plain int stage."""
    return int(value)


class _FragmentAddress:
    """Stand-in for the ``fragment_address(numel, start)`` dataclass of ZeRO-1/2 files."""

    def __setstate__(self, state):
        self.__dict__.update(state)

_DEEPSPEED_GLOBALS = [
    (_LossScalerStandIn, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_DynamicLossScalerStandIn, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_zero_stage_standin, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (_FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
]


def load_ds_file(path: str, *, mmap: bool = True, trusted: bool = False) -> dict:
    """Load one DeepSpeed checkpoint file on CPU, memory-mapped, without running pickled code.

    The file is checked before and after unpickling (:mod:`.file_bounds`): only the globals a
    DeepSpeed file uses, bounded objects, tensors backed by the archive's own storages.

    Args:
        path: a ``*_model_states.pt`` / ``*_optim_states.pt`` file.
        mmap: map tensor storages from the file instead of reading them.
        trusted: if the restricted reader refuses the file, unpickle it fully. Only for
            files you produced yourself (a pickle can execute arbitrary code).

    Raises:
        UnsafeCheckpointError (a ``CheckpointError`` and ``RuntimeError``) naming the file and the
        reason it was refused; ``CheckpointError`` for a file that is not a readable torch file.
    """
    from .file_bounds import bounded_torch_load
    return bounded_torch_load(path, _DEEPSPEED_GLOBALS, map_location="cpu", mmap=mmap, trusted=trusted)


# ---------------------------------------------------------------------------------- writing
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}


class StreamingSafetensorsWriter:
    """Write a safetensors file one tensor at a time.

    ``entries`` lists every tensor (name, shape, dtype) up front; the header is written at
    once and each :meth:`write` seeks to that tensor's offset, so tensors may come in any
    order. :meth:`close` checks that every entry was written exactly once.
    """

    def __init__(self, path: str, entries: Sequence[Tuple[str, Sequence[int], torch.dtype]],
                 metadata: Optional[Mapping[str, str]] = None):
        self.path = path
        header: Dict[str, dict] = {}
        self._slots: Dict[str, Tuple[int, Tuple[int, ...], torch.dtype]] = {}
        offset = 0
        for name, shape, dtype in entries:
            if name in header:
                raise ValueError(f"duplicate tensor name {name!r}")
            if dtype not in _ST_DTYPES:
                raise ValueError(f"{name}: dtype {dtype} not supported by safetensors")
            shape = tuple(int(s) for s in shape)
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._slots[name] = (offset, shape, dtype)
            offset += nbytes
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * ((-len(blob)) % 8)
        self._data_start = 8 + len(blob)
        self._total = offset
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._tmp = path + ".partial"
        self._file = open(self._tmp, "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self._file.truncate(self._data_start + offset)
        self._written: set = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._slots:
            raise KeyError(f"{name!r} is not an entry of {self.path}")
        if name in self._written:
            raise ValueError(f"{name!r} written twice to {self.path}")
        offset, shape, dtype = self._slots[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, header says {shape} {dtype}")
        data = tensor.detach().cpu().contiguous()
        self._file.seek(self._data_start + offset)
        if data.numel():
            self._file.write(data.view(-1).view(torch.uint8).numpy().tobytes())
        self._written.add(name)

    def close(self) -> None:
        missing = set(self._slots) - self._written
        self._file.close()
        if missing:
            os.remove(self._tmp)
            raise ValueError(f"{self.path}: {len(missing)} tensors never written, e.g. {sorted(missing)[:3]}")
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def open_safetensors(path: str):
    """``safetensors.safe_open`` on CPU; a malformed file raises ``CheckpointError`` naming it
    (safetensors' own ``SafetensorError`` says neither which file nor that it is one of ours)."""
    from safetensors import safe_open
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as err:  # SafetensorError (header, offsets), OSError; never a pickle: nothing runs
        raise CheckpointError(f"{path}: not a valid safetensors file ({str(err).splitlines()[0][:200]})") from None


def iter_safetensors(path: str, names: Optional[Iterable[str]] = None):
    """``(name, tensor)`` from a safetensors file, one tensor in memory at a time."""
    with open_safetensors(path) as f:
        for name in (names if names is not None else f.keys()):
            try:
                tensor = f.get_tensor(name)
            except Exception as err:  # a name missing from the header, a dtype torch lacks
                raise CheckpointError(f"{path}: cannot read tensor {name!r} ({str(err).splitlines()[0][:200]})") from None
            yield name, tensor
