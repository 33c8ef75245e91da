"""Patch-sentence KL: ``KL(softmax(teacher T^T / tau_t) || softmax(student T^T / tau_s))`` per row.

For one patch row ``i`` with teacher logits ``a_j = teacher_i . T_j / tau_t`` and student logits
``b_j = student_i . T_j / tau_s`` over the ``M`` sentence prototypes ``T``::

    KL_i = sum_j q_j (a_j - b_j) - LSE(a) + LSE(b),      q = softmax(a), p = softmax(b)
    dKL_i/dstudent_i = (1/tau_s) sum_j (p_j - q_j) T_j
    dKL/dT_j         = (1/tau_s) sum_i g_i (p_ij - q_ij) student_i     (g = upstream grad)

The teacher logits are a stop-gradient target: no gradient reaches ``teacher`` (even when it
requires grad) nor reaches ``prototypes`` through the teacher logits (DESIGN.md section 2).

This module is the one front; each backend lives in its own file beside the oracle:

* ``"reference"`` -- :mod:`.kl_reference`, naive P x M form: test oracle and benchmark baseline.
* ``"streaming"`` / ``"streaming_chunked"`` -- :mod:`.kl_streaming`, plain PyTorch on any device
  (full-row blocks / M-chunked online softmax; on CUDA bf16 GEMMs with fp32 outputs over M blocks).
* ``"triton"`` -- :mod:`.kl_triton`, fused Triton kernels (split-M forward, recomputing backward
  with the gradient products on tensor cores). On CPU only under ``TRITON_INTERPRET=1`` (tests).
* ``"hybrid"`` -- :mod:`.kl_hybrid`, the Triton forward, Triton G tiles and cuBLAS gradient GEMMs.
* ``"cuda"`` -- :mod:`.kl_cuda`, the fused extension in ``kernels/`` (built by :mod:`._extension`).
* ``"auto"`` -- :mod:`.kl_select`: the fastest backend that passed its self-check (:mod:`.kl_selfcheck`)
  for this device and shape class, measured once and cached.

See docs/kernels.md for the derivation, build instructions and measured numbers.
"""
from __future__ import annotations

import torch

from .kl_backends import BACKENDS, _cuda, backend_available, backend_function
from .kl_reference import check_inputs, patch_sentence_kl_reference
from .kl_streaming import patch_sentence_kl_streaming

__all__ = ["patch_sentence_kl", "patch_sentence_kl_reference", "patch_sentence_kl_streaming", "cuda_backend_status",
           "backend_function", "backend_available", "BACKENDS"]

def cuda_backend_status(device: torch.device | int | str | None = None) -> tuple[bool, str]:
    """``(usable, reason)`` for the fused CUDA backend on ``device`` (self-check in a subprocess, once)."""
    from .kl_select import backend_ok
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "no CUDA device"
    return backend_ok("cuda", device)


def patch_sentence_kl(student: torch.Tensor, teacher: torch.Tensor, prototypes: torch.Tensor, *,
                      student_temp: float, teacher_temp: float, backend: str = "auto",
                      deterministic: bool = False) -> torch.Tensor:
    """Per-row ``KL(softmax(teacher T^T/teacher_temp) || softmax(student T^T/student_temp))``.

    Args:
        student, teacher: ``[P, D]`` (L2-normalised) patch features; ``teacher`` gets no gradient.
        prototypes: ``[M, D]`` sentence embeddings; gradient only through the student logits.
        backend: one of :data:`BACKENDS` (see the module docstring).
        deterministic: bitwise-repeatable results. Every backend already reduces in a fixed order
            without atomics, so this is a guarantee, not a switch (kept for callers and tests).
    Returns:
        ``[P]`` float32 (float64 for float64 inputs).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_inputs(student, teacher, prototypes)
    kw = dict(student_temp=student_temp, teacher_temp=teacher_temp)
    if backend == "cuda":
        if student.device.type != "cuda":
            raise ValueError("backend='cuda' needs CUDA tensors")
        return _cuda(student, teacher, prototypes, deterministic=deterministic, **kw)
    if backend == "auto":
        grad = torch.is_grad_enabled()
        need_s, need_t = grad and student.requires_grad, grad and prototypes.requires_grad
        if student.shape[0] == 0:
            backend = "streaming"
        else:
            from .kl_select import select_backend
            backend = select_backend(student, teacher, prototypes, need_s=need_s, need_t=need_t, **kw)
    return backend_function(backend)(student, teacher, prototypes, **kw)
