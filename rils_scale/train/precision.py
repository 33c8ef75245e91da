"""Training precision on CPU ranks: fp32 unless the CPU computes bf16 natively.

DeepSpeed's CPU accelerator runs bf16 either way, but without the ``avx512_bf16`` or
``amx_bf16`` instructions (or Arm's ``bf16``) every bf16 GEMM is emulated: on this repository's
2-core AVX2 machine, 3-4x slower than fp32 (24-30 against 75-120 samples/s for ``tiny``,
alternated under the same load). So when the DeepSpeed config asks for bf16 and the command
line does not (``--precision config``, the default), a CPU run without native bf16 trains in
fp32 and says so in its start-up line; ``--precision bf16`` keeps bf16, as does a CPU that has
it. GPUs are left to the config.
"""
from __future__ import annotations

import json
import os
import platform
from typing import Optional, Tuple

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # x86 (/proc/cpuinfo "flags")
ARM_BF16_FLAG = "bf16"                             # aarch64 (/proc/cpuinfo "Features")


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> Optional[set]:
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return None


def cpu_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> Tuple[bool, str]:
    """``(native, evidence)``: whether this CPU has bf16 arithmetic instructions, and why we think so."""
    flags = _cpuinfo_flags(cpuinfo)
    if flags is not None:
        found = [f for f in NATIVE_BF16_FLAGS if f in flags]
        if not found and ARM_BF16_FLAG in flags and platform.machine().lower() in ("aarch64", "arm64"):
            found = [ARM_BF16_FLAG]
        if found:
            return True, "/".join(found)
        return False, "no avx512_bf16 or amx_bf16 CPU flag"
    try:  # no /proc/cpuinfo (macOS, some containers): ask torch's own CPU probe
        import torch
        if torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported():
            return True, "avx512_bf16/amx (torch)"
        return False, f"torch CPU capability {torch.backends.cpu.get_cpu_capability()} (no avx512_bf16/amx)"
    except (AttributeError, RuntimeError):
        return False, "CPU bf16 support unknown"


def run_trained_bf16(run_dir: str) -> Optional[bool]:
    """Whether the run in ``run_dir`` trained in bf16 (its ``config.json``), None if unknown."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            return bool(json.load(f).get("deepspeed", {}).get("bf16", {}).get("enabled"))
    except (OSError, ValueError, AttributeError):
        return None


def resolve_precision(requested: str, ds_config: dict, device_type: Optional[str] = None,
                      native: Optional[Tuple[bool, str]] = None, resume_dir: Optional[str] = None) -> str:
    """Settle ``ds_config``'s bf16 switch for this machine (in place) and return what to say.

    ``requested`` is ``--precision`` (``config`` | ``bf16`` | ``fp32``, already applied to
    ``ds_config`` by ``load_ds_config``); ``device_type`` and ``native`` default to this machine.
    ``resume_dir``: on ``--resume``, a run that trained in bf16 stays in bf16 (DeepSpeed's
    optimizer files are named by precision, and a run should not change it silently).
    """
    if device_type is None:
        from deepspeed.accelerator import get_accelerator
        device_type = "cpu" if get_accelerator().device_name() == "cpu" else "gpu"
    bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
    if device_type != "cpu" or not bf16:
        return ""
    has_bf16, evidence = native if native is not None else cpu_native_bf16()
    if has_bf16:
        return f"bf16, native on this CPU ({evidence})"
    if requested == "bf16":
        return f"bf16 as asked by --precision bf16, emulated on this CPU ({evidence}): expect 3-4x slower than fp32"
    if resume_dir and run_trained_bf16(resume_dir):
        return (f"bf16 as the resumed run trained, emulated on this CPU ({evidence}); new runs here default to fp32 "
                "(3-4x faster)")
    ds_config["bf16"] = dict(ds_config.get("bf16", {}), enabled=False)
    return (f"fp32 instead of the DeepSpeed config's bf16: this CPU has no native bf16 ({evidence}) and emulated "
            "bf16 is 3-4x slower; --precision bf16 forces it")
