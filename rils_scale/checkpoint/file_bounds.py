"""What a DeepSpeed ``.pt`` file may make a reader build: checked before and after unpickling.

torch's weights-only unpickler executes no code, but it still builds whatever its allowlist
can build: ``bytearray(3 * 2**30)`` from a 40 KB file (3.7 GB resident in the converter,
``load_model`` and ``--resume``), ``torch.Tensor(n)`` of any size, meta, sparse and nested
tensors. A DeepSpeed checkpoint holds far less (checked on ZeRO-0/1/2/3 files, fp32 and bf16,
DeepSpeed 0.19.8): tensors whose storages are in the archive, ``OrderedDict`` / dict / list /
tuple / set containers, ``torch.Size``, numbers, short strings, and four DeepSpeed classes. So
every reader of these files (:func:`rils_scale.checkpoint.serialization.load_ds_file` for the
converter and ``load_model``, :func:`rils_scale.checkpoint.safe_load.safe_torch_load` for
``--resume``) first calls :func:`check_before_unpickling`, which reads only the zip directory and
parses the pickle's opcodes (``pickletools.genops``: nothing is built) and refuses the file,
naming it, when

- it is not a zip-format torch file (a legacy bare pickle), or a member is compressed (torch
  writes stored members);
- the pickle names a global outside :data:`ALLOWED_GLOBALS`;
- one string / bytes literal is longer than :data:`MAX_LITERAL_BYTES`;
- the Python objects it describes exceed :data:`MAX_OBJECT_BYTES`, estimated per opcode
  (:data:`BYTES_PER_OBJECT` for each opcode that creates a container or calls a constructor,
  :data:`BYTES_PER_OPCODE` for any other, plus every literal's length);

and then :func:`check_after_unpickling` walks the loaded object and refuses any tensor that is
not a strided tensor with data (a meta tensor has none), whose view covers more bytes than its
storage (a stride-0 "expansion" of a small storage that a later ``clone`` would materialise), or
storages beyond the bytes the archive stores (``torch.Tensor(n)`` allocates its own). A file of S bytes therefore materialises
at most its stored tensor bytes (<= S; memory-mapped, not read, by the converter) plus
:data:`MAX_OBJECT_BYTES` of Python objects. See docs/checkpoints.md.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import pickletools
import zipfile
from dataclasses import dataclass
from typing import Iterable, List, Set

from .layout import CheckpointError

log = logging.getLogger(__name__)

MAX_LITERAL_BYTES = 1 << 20
"""Longest string / bytes literal (DeepSpeed's longest: parameter names, ~100 bytes)."""
MAX_OBJECT_BYTES = 64 << 20
"""Estimated Python objects a file may describe (the tiny model's files: < 5 MB)."""
BYTES_PER_OBJECT = 256
"""Estimate for an opcode that makes a container or calls a constructor (an empty set is 232 B)."""
BYTES_PER_OPCODE = 64
"""Estimate for any other opcode (an int, a float, a reference, a list slot)."""

_STORAGE_TYPES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
                  "ComplexFloat", "ComplexDouble")
_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
           "complex64", "complex128")
ALLOWED_GLOBALS = frozenset({
    "collections OrderedDict",
    "torch._utils _rebuild_tensor_v2",
    "torch._tensor _rebuild_from_type_v2",  # a tensor with Python attributes (DeepSpeed's optimizer files)
    "torch Tensor",  # the type argument of the line above
    "torch Size",
    "torch device",
    "_codecs encode",  # how protocol 2 spells a bytes literal (bounded by MAX_LITERAL_BYTES)
    "builtins set",
    "torch UntypedStorage", "torch.storage UntypedStorage",
    *(f"torch {t}Storage" for t in _STORAGE_TYPES),
    *(f"torch {d}" for d in _DTYPES),
    "deepspeed.runtime.fp16.loss_scaler LossScaler",
    "deepspeed.runtime.fp16.loss_scaler DynamicLossScaler",
    "deepspeed.runtime.zero.config ZeroStageEnum",
    "deepspeed.utils.tensor_fragment fragment_address",
})
"""Pickle globals ("module name") a DeepSpeed checkpoint uses. Left out on purpose, although
torch's weights-only unpickler allows them: ``builtins.bytearray`` (``bytearray(n)`` allocates n
bytes), meta / sparse / nested / quantised / subclass tensor rebuilds, ``torch.nn.Parameter``."""

_OBJECT_OPCODES = frozenset({"EMPTY_DICT", "EMPTY_LIST", "EMPTY_SET", "FROZENSET", "DICT", "LIST", "TUPLE",
                             "TUPLE1", "TUPLE2", "TUPLE3", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD", "BINPERSID",
                             "PERSID", "OBJ", "INST"})


class UnsafeCheckpointError(CheckpointError, RuntimeError):
    """A checkpoint file a safe reader refused (never unpickled, or dropped right after)."""


@dataclass(frozen=True)
class FileBounds:
    """What the pre-scan learnt about a file."""

    path: str
    file_bytes: int
    stored_tensor_bytes: int
    """Bytes of the archive's tensor storages (``<archive>/data/*`` members)."""
    object_bytes: int
    """Estimate of the Python objects the pickle describes."""
    globals: frozenset


def refusal(path: str, reason: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: refused by the restricted unpickler: {reason}. Nothing was executed. If this file comes "
        "from your own training run, retry with --trust-pickle (trusted=True), which unpickles it fully.")


def check_before_unpickling(path: str) -> FileBounds:
    """Refuse ``path`` (:class:`UnsafeCheckpointError`) unless its pickle stays within the bounds
    of the module docstring; reads the zip directory and the pickle only, builds nothing."""
    size = os.path.getsize(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"\x80"):  # a bare pickle: torch's legacy format, never checked, never bounded
            raise refusal(path, "a legacy (non-zip) torch file (torch.save's format before torch 1.6; "
                                "DeepSpeed writes zip archives)")
        what = "a damaged or truncated zip archive" if head == b"PK\x03\x04" else "not a torch file"
        raise CheckpointError(f"{path}: not a readable torch file ({what})")
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            pickles = [m for m in members if m.filename.endswith("/data.pkl") and m.filename.count("/") == 1]
            if len(pickles) != 1:
                raise refusal(path, f"{len(pickles)} data.pkl records (a torch file has one)")
            prefix = pickles[0].filename[:-len("data.pkl")]
            compressed = [m.filename for m in members if m.compress_type != zipfile.ZIP_STORED]
            if compressed:
                raise refusal(path, f"compressed members ({compressed[0]}; torch stores its records uncompressed)")
            pickle_info = pickles[0]
            if pickle_info.file_size > MAX_OBJECT_BYTES:  # each pickle byte stands for >= 1 byte of objects
                raise refusal(path, f"a {pickle_info.file_size}-byte pickle (it describes over "
                                    f"{MAX_OBJECT_BYTES >> 20} MiB of objects)")
            data = archive.read(pickle_info)
            stored = sum(m.file_size for m in members if m.filename.startswith(prefix + "data/"))
    except zipfile.BadZipFile as err:
        raise CheckpointError(f"{path}: not a readable torch file ({err})") from None
    names, estimate = _scan_pickle(path, data)
    return FileBounds(path, size, stored, estimate, frozenset(names))


def _scan_pickle(path: str, data: bytes):
    names: Set[str] = set()
    estimate = 0
    try:
        for opcode, arg, _ in pickletools.genops(io.BytesIO(data)):
            if opcode.name in ("GLOBAL", "INST"):
                arg = _python3_name(arg)
                if arg not in ALLOWED_GLOBALS:
                    raise refusal(path, f"it needs the global {arg.replace(' ', '.')}, which no DeepSpeed "
                                        "checkpoint holds")
                names.add(arg)
            elif opcode.name == "STACK_GLOBAL":  # protocol 4+: torch.save writes protocol 2
                raise refusal(path, "a protocol-4 global (torch.save writes protocol 2)")
            if isinstance(arg, (str, bytes, bytearray)):
                if len(arg) > MAX_LITERAL_BYTES:
                    raise refusal(path, f"a {len(arg)}-byte {type(arg).__name__} literal (over "
                                        f"{MAX_LITERAL_BYTES >> 20} MiB; DeepSpeed's are names of ~100 bytes)")
                estimate += len(arg)
            estimate += BYTES_PER_OBJECT if opcode.name in _OBJECT_OPCODES else BYTES_PER_OPCODE
            if estimate > MAX_OBJECT_BYTES:
                raise refusal(path, f"its pickle describes over {MAX_OBJECT_BYTES >> 20} MiB of Python objects")
    except UnsafeCheckpointError:
        raise
    except ValueError as err:  # genops: unknown opcode, truncated argument
        raise CheckpointError(f"{path}: not a readable torch file (its pickle is malformed: {err})") from None
    return names, estimate


def _python3_name(arg: str) -> str:
    """"module name" as unpicklers resolve it: protocol 2 writes Python 2 spellings
    (``__builtin__ set``), mapped back as torch's unpickler and ``pickle`` map them."""
    from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
    module, _, name = arg.partition(" ")
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module} {name}"


def check_after_unpickling(bounds: FileBounds, obj) -> None:
    """Refuse a loaded object whose tensors are not strided tensors backed by the archive's storages."""
    import torch
    path = bounds.path
    storages = {}
    view_bytes = 0
    for tensor in _tensors(obj):
        if tensor.layout != torch.strided or tensor.device.type == "meta" or tensor.is_quantized:
            raise refusal(path, f"a {tensor.layout} tensor on device {tensor.device} (DeepSpeed stores strided "
                                "tensors with data; a meta tensor has none to read)")
        storage = tensor.untyped_storage()
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > storage.nbytes():
            raise refusal(path, f"a tensor of shape {tuple(tensor.shape)} viewing a {storage.nbytes()}-byte storage "
                                "(a copy would materialise more than the file stores)")
        view_bytes += nbytes
        storages[storage.data_ptr()] = storage.nbytes()
    # Memory-mapped storages are slices of the file and may run to its end: bound by the file.
    limit = max(bounds.stored_tensor_bytes, bounds.file_bytes)
    if sum(storages.values()) > limit or view_bytes > 2 * limit:
        raise refusal(path, f"tensors over {sum(storages.values())} bytes of storage ({view_bytes} bytes of views) "
                            f"where the archive stores {bounds.stored_tensor_bytes}")


def _tensors(obj) -> Iterable:
    """Every distinct tensor reachable from ``obj`` (iterative: nesting depth is up to the file)."""
    import torch
    seen: Set[int] = set()
    stack: List = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            yield item
            stack.extend(getattr(item, "__dict__", {}).values())
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not isinstance(item, type):
            stack.extend(vars(item).values())


def _unreadable(path: str, err: BaseException) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable torch file ({str(err).splitlines()[0][:200] if str(err) else type(err).__name__})")


def bounded_torch_load(path: str, safe_globals: list, *, map_location=None, mmap: bool = False,
                       trusted: bool = False):
    """``torch.load(weights_only=True)`` of a DeepSpeed file with ``safe_globals`` allowed, held to
    the bounds checked before and after unpickling; a refused file is unpickled fully only if
    ``trusted`` (``--trust-pickle``). The one reader behind ``load_ds_file`` and ``safe_torch_load``."""
    import torch
    try:
        bounds = check_before_unpickling(path)
        try:
            with torch.serialization.safe_globals(safe_globals):
                state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:  # name the offending global, not torch's advice
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            first = next((ln for ln in lines if "global" in ln.lower()), lines[0] if lines else type(err).__name__)
            raise refusal(path, first[:300]) from None
        except Exception as err:  # a truncated or damaged archive
            raise _unreadable(path, err) from None
        check_after_unpickling(bounds, state)
        return state
    except UnsafeCheckpointError:
        if not trusted:
            raise
    log.warning("%s: refused by the restricted reader; unpickling fully (--trust-pickle)", path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as err:  # noqa: BLE001 (--trust-pickle on a file that is no pickle at all)
        raise _unreadable(path, err) from None
