"""Float64-capable naive form of the patch-sentence KL: the test oracle and benchmark baseline.

See :mod:`rils_scale.ops.patch_sentence_kl` for the formula; every backend is tested against this.
"""
from __future__ import annotations

import torch

__all__ = ["patch_sentence_kl_reference", "check_inputs"]


def patch_sentence_kl_reference(student: torch.Tensor, teacher: torch.Tensor, prototypes: torch.Tensor, *,
                                student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Naive form (materialises the P x M matrices): the test oracle. Returns float32 ``[P]``
    (float64 for float64 inputs). The teacher logits are a stop-gradient target: neither ``teacher``
    nor ``prototypes`` receive gradient through them."""
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    t = prototypes.to(dtype)
    log_q = torch.log_softmax(teacher.detach().to(dtype) @ t.detach().T / teacher_temp, dim=-1)
    log_p = torch.log_softmax(student.to(dtype) @ t.T / student_temp, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=-1).to(torch.float32 if dtype != torch.float64 else dtype)


def check_inputs(student, teacher, prototypes):
    if student.dim() != 2 or teacher.dim() != 2 or prototypes.dim() != 2:
        raise ValueError("patch_sentence_kl expects 2-D student [P,D], teacher [P,D], prototypes [M,D]; got "
                         f"{tuple(student.shape)}, {tuple(teacher.shape)}, {tuple(prototypes.shape)}")
    if student.shape != teacher.shape or student.shape[1] != prototypes.shape[1]:
        raise ValueError(f"shape mismatch: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}, "
                         f"prototypes {tuple(prototypes.shape)}")
    if prototypes.shape[0] == 0:
        raise ValueError("patch_sentence_kl needs at least one prototype (M >= 1)")
    dts = {student.dtype, teacher.dtype, prototypes.dtype}
    if not dts <= {torch.float32, torch.bfloat16, torch.float16, torch.float64}:
        raise TypeError(f"unsupported dtypes {dts}")
    if len({student.device, teacher.device, prototypes.device}) != 1:
        raise ValueError("student, teacher and prototypes must be on the same device")

