"""In-place clamp of a parameter after the optimizer step, safe under every ZeRO stage.

Why after the step and not (only) in forward: a clamp inside forward has zero gradient above
the cap, and the logit scale is exempt from weight decay, so once Adam pushes it past the cap
it can never come back (OpenCLIP clamps the parameter in place after the step for this reason).

Why it needs care: under ZeRO-3 a parameter outside its module's forward is an empty
partition (DESIGN §7), and under ZeRO / bf16 the optimizer steps an fp32 master copy that it
writes back over the model's parameter after every step: clamping only the model's copy would
be undone by the next step. A clamp is elementwise, so each rank clamps what it holds, in
place, with no communication and no gather:

- ZeRO-3: this rank's partition of the parameter (``ds_tensor``, what forward all-gathers)
  and of its fp32 master (``safe_get_local_fp32_param``);
- ZeRO-1/2 and DeepSpeed's bf16 optimizer: the full low-precision parameter and this rank's
  fragment of the fp32 master (``_hp_mapping``);
- no DeepSpeed: the parameter.

(``GatheredParameters(modifier_rank=0)`` would also fix the model's copy, but not the master;
DeepSpeed 0.19's ``safe_set_full_fp32_param`` fails on a 1-element parameter partitioned over
two ranks, measured here.) Because nothing communicates, a rank may call this alone, but the
loop calls it on every rank after each applied step.
"""
from __future__ import annotations

import torch


def _above(t: torch.Tensor, maximum: float) -> bool:
    """Above the cap as rounded to ``t``'s dtype (a float32 parameter clamped to ln 100 reads
    4.6051702, a hair above the float64 cap)."""
    return t.numel() > 0 and bool((t > torch.tensor(maximum, dtype=t.dtype, device=t.device)).any())


def _clamp_(t: torch.Tensor, maximum: float, report: bool) -> bool:
    if t is None or t.numel() == 0:
        return False
    above = _above(t, maximum) if report else False  # the check syncs with the host: only when asked
    t.clamp_(max=maximum)
    return above


@torch.no_grad()
def clamp_parameter_(param: torch.nn.Parameter, maximum: float, report: bool = False) -> bool:
    """Clamp ``param`` and its optimizer master copy (if any) to ``<= maximum`` in place, on
    what this rank holds. With ``report``, returns whether anything held here was above the cap
    (a device-to-host sync); without, never syncs and returns False."""
    if hasattr(param, "ds_id"):  # ZeRO-3 partition
        changed = _clamp_(param.ds_tensor.data, maximum, report)
        if getattr(param, "_z3_optimizer", None) is not None and param.requires_grad:
            from deepspeed.utils import safe_get_local_fp32_param
            master = safe_get_local_fp32_param(param)  # a view into the optimizer's flat fp32 partition
            changed |= _clamp_(master.data, maximum, report)
        return changed
    changed = _clamp_(param.data, maximum, report)
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is not None:  # ZeRO-1/2, bf16 optimizer: this rank's fragment of the fp32 master
        changed |= _clamp_(mapping.get_hp_fragment().data, maximum, report)
    return changed


def clamp_logit_scale_(model, report: bool = False) -> bool:
    """Keep a RILS model's (or DeepSpeed engine's) ``logit_scale`` parameter <= its cap.
    Call after each applied optimizer step (no host sync unless ``report``)."""
    module = getattr(model, "module", model)
    scale = module.logit_scale
    return clamp_parameter_(scale.value, scale.maximum, report)


__all__ = ["clamp_parameter_", "clamp_logit_scale_"]
