"""In-place clamp of a parameter after the optimizer step, safe under every ZeRO stage.

Why here and not in forward: a clamp inside forward has zero gradient above the cap, and the
logit scale is exempt from weight decay, so once Adam pushes it past the cap it can never
come back (OpenCLIP clamps the parameter in place after the step for this reason).

Why it needs care: under ZeRO-3 a parameter outside its module's forward is an empty
partition (DESIGN §7), and with bf16 (or any ZeRO stage) the optimizer steps an fp32 master
copy that it writes back over the model's parameter after every step. So both are clamped:
the fp32 master through DeepSpeed's ``safe_get/set_full_fp32_param`` (the value the next
step starts from), and the model's parameter inside ``GatheredParameters(modifier_rank=0)``
(the value the next forward reads). Every rank must call :func:`clamp_parameter_` (the
gather and the master read are collectives); all ranks see the same gathered value, so they
take the same branch.
"""
from __future__ import annotations


import torch


def _master_copy(param):
    try:
        from deepspeed.utils import safe_get_full_fp32_param
    except ImportError:
        return None
    return safe_get_full_fp32_param(param)


@torch.no_grad()
def clamp_parameter_(param: torch.nn.Parameter, maximum: float) -> bool:
    """Clamp ``param`` (and its optimizer master copy, if any) to ``<= maximum`` in place.
    Returns whether anything was above the cap."""
    master = _master_copy(param)
    clamped = False
    if master is not None and bool((master > maximum).any()):
        from deepspeed.utils import safe_set_full_fp32_param
        safe_set_full_fp32_param(param, master.clamp(max=maximum))
        clamped = True
    if hasattr(param, "ds_id"):  # ZeRO-3: gather, modify on rank 0, re-partition from rank 0
        import deepspeed
        import torch.distributed as dist
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            above = bool((param.data > maximum).any())
            if above and (not dist.is_initialized() or dist.get_rank() == 0):
                param.data.clamp_(max=maximum)
    else:
        above = bool((param.data > maximum).any())
        if above:
            param.data.clamp_(max=maximum)
    return clamped or above


def clamp_logit_scale_(model) -> bool:
    """Keep a RILS model's (or DeepSpeed engine's) ``logit_scale`` parameter <= its cap.
    Call on every rank after each applied optimizer step."""
    module = getattr(model, "module", model)
    scale = module.logit_scale
    return clamp_parameter_(scale.value, scale.maximum)


__all__ = ["clamp_parameter_", "clamp_logit_scale_"]
