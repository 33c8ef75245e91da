"""DeepSpeed's own resume path without pickle code execution.

``DeepSpeedEngine.load_checkpoint`` reads every ``*_model_states.pt`` / ``*_optim_states.pt``
through its checkpoint engine, whose ``load`` is ``torch.load(weights_only=False)``: a
checkpoint that travelled between clusters or people could run any code on ``--resume``.
:class:`SafeCheckpointEngine` keeps DeepSpeed's writer and replaces the reader with
``torch.load(weights_only=True)`` plus an explicit allowlist of the DeepSpeed classes its files
contain. The list was taken from real files with
``torch.serialization.get_unsafe_globals_in_checkpoint`` (DeepSpeed 0.19.8: ZeRO-3 bf16 optimizer
files hold ``LossScaler`` and ``ZeroStageEnum``; fp16 runs ``DynamicLossScaler``; ZeRO-1/2 files
``fragment_address``; model-states files none). The weights-only unpickler rebuilds an
allowlisted class by ``__new__`` + ``__setstate__``/``__dict__`` update, so none of DeepSpeed's
code runs either. The file is also held to the bounds of :mod:`.file_bounds` (only the globals a
DeepSpeed file uses, bounded objects, tensors backed by the archive's own storages), checked
before and after unpickling. Anything else is refused with :class:`UnsafeCheckpointError`;
``--trust-pickle`` (``trusted=True``) restores DeepSpeed's full unpickling for files you wrote.

Unlike :func:`rils_scale.checkpoint.serialization.load_ds_file` (the converter's reader, which
maps the same names to inert stand-ins so DeepSpeed need not be installed), this one returns the
real DeepSpeed objects, because the engine goes on to use its loss scaler.
"""
from __future__ import annotations

from typing import List

from .file_bounds import UnsafeCheckpointError, bounded_torch_load
from .layout import CheckpointError

__all__ = ["CheckpointError", "UnsafeCheckpointError", "install_safe_checkpoint_engine", "safe_torch_load"]


def deepspeed_safe_globals() -> List:
    """The DeepSpeed classes its checkpoint files pickle (see the module docstring)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    out = [LossScaler, DynamicLossScaler, ZeroStageEnum]
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        out.append(fragment_address)
    except ImportError:  # older DeepSpeed: ZeRO-1/2 files without it
        pass
    return out


def safe_torch_load(path: str, map_location=None, trusted: bool = False):
    """``torch.load`` of a DeepSpeed file with the allowlist and the bounds of
    :mod:`.file_bounds`; full unpickling only if ``trusted``."""
    return bounded_torch_load(path, deepspeed_safe_globals(), map_location=map_location, trusted=trusted)


def _torch_engine_class():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    return TorchCheckpointEngine


def install_safe_checkpoint_engine(engine, trusted: bool = False) -> None:
    """Make ``engine.load_checkpoint`` read files with :func:`safe_torch_load`.

    DeepSpeed's default (torch) checkpoint engine is replaced by a subclass that writes the same
    files; any other engine (Nebula, fast, decoupled writers) keeps its writer and gets the safe
    reader on the instance.
    """
    current = engine.checkpoint_engine
    base = _torch_engine_class()

    class SafeCheckpointEngine(base):
        """DeepSpeed's torch checkpoint engine whose ``load`` never executes pickled code."""

        def load(self, path: str, map_location=None):
            return safe_torch_load(path, map_location=map_location, trusted=trusted)

    if type(current) is base:
        safe = SafeCheckpointEngine.__new__(SafeCheckpointEngine)
        safe.__dict__.update(current.__dict__)  # same name / serialization settings as DeepSpeed chose
        engine.checkpoint_engine = safe
    else:
        current.load = lambda path, map_location=None: safe_torch_load(path, map_location, trusted)
