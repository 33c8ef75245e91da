"""The backends of :func:`rils_scale.ops.patch_sentence_kl` by name: their functions and whether
they can run on a device. The front (:mod:`.patch_sentence_kl`), the selector (:mod:`.kl_select`)
and the self-check (:mod:`.kl_selfcheck`) all read this table, so none of them imports another
that imports it back.
"""
from __future__ import annotations

import torch

from .kl_reference import patch_sentence_kl_reference
from .kl_streaming import patch_sentence_kl_streaming, patch_sentence_kl_streaming_chunked

BACKENDS = ("auto", "reference", "streaming", "streaming_chunked", "triton", "hybrid", "cuda")


def _cuda(*a, **k):
    from .kl_cuda import patch_sentence_kl_cuda
    return patch_sentence_kl_cuda(*a, **k)


def _triton(*a, **k):
    from .kl_triton import patch_sentence_kl_triton
    return patch_sentence_kl_triton(*a, **k)


def _hybrid(*a, **k):
    from .kl_hybrid import patch_sentence_kl_hybrid
    return patch_sentence_kl_hybrid(*a, **k)


_FUNCTIONS = {"reference": patch_sentence_kl_reference, "streaming": patch_sentence_kl_streaming,
              "streaming_chunked": patch_sentence_kl_streaming_chunked, "cuda": _cuda, "triton": _triton,
              "hybrid": _hybrid}


def backend_function(name: str):
    """The function ``f(student, teacher, prototypes, *, student_temp, teacher_temp)`` of a backend."""
    if name not in _FUNCTIONS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return _FUNCTIONS[name]


def backend_available(name: str, device: torch.device) -> tuple[bool, str]:
    """Whether ``name`` can run on ``device`` at all (before any self-check): importable / buildable."""
    if name in ("reference", "streaming", "streaming_chunked"):
        return True, "ok"
    if name == "cuda":
        if device.type != "cuda":
            return False, "the fused extension needs CUDA tensors"
        from ._extension import load_error, load_extension
        return (True, "ok") if load_extension() is not None else (False, f"fused extension unavailable ({load_error()})")
    from .kl_triton import triton_status
    return triton_status(device)
