"""Accelerator peak throughput, MFU and peak-memory helpers.

Peaks are **dense** tensor-core figures (the datasheets print "with sparsity" numbers, twice
these, in the headline). MFU = achieved model FLOP/s (rils_scale.train.flops ``total`` per
step / step time) ÷ this peak. On a CPU there is no table entry: pass ``--peak-tflops`` to get
an MFU there.
"""
from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

# (substring of torch.cuda.get_device_name(), {dtype: dense peak TFLOP/s}); the first match
# wins, so more specific names come first ("H100 PCIe" before "H100", "A100" before "A10",
# "L40S" before "L40" before "L4").
_TABLE: List[Tuple[str, Dict[str, float]]] = [
    # NVIDIA H100 datasheet, "H100 PCIe" column: BF16/FP16 Tensor Core 1,513 TFLOPS* (*with
    # sparsity) -> 756 dense; TF32 756* -> 378; FP8 3,026* -> 1,513; FP32 51.
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp8": 1513.0, "fp32": 51.2}),
    # H100 datasheet, "H100 NVL" column: BF16 1,671* -> 835.5; TF32 835* -> 417.5; FP32 60.
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp8": 1670.5, "fp32": 60.0}),
    # H200 datasheet, "H200 NVL" column: BF16 1,671* -> 835.5; FP32 60.
    ("H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp8": 1670.5, "fp32": 60.0}),
    # H200 datasheet, "H200 SXM" column: BF16/FP16 1,979* -> 989.0; TF32 989* -> 494.5;
    # FP8 3,958* -> 1,979; FP32 67. GH200 (Grace Hopper superchip) has the same GPU figures.
    ("GH200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp8": 1979.0, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp8": 1979.0, "fp32": 67.0}),
    # (989 not 989.5: the rounding torchtitan and Megatron use.)
    # H100 datasheet, "H100 SXM" column (device name "NVIDIA H100 80GB HBM3"): BF16/FP16
    # Tensor Core 1,979* -> 989.0; TF32 989* -> 494.5; FP8 3,958* -> 1,979; FP32 67.
    # H800 (export variant) has the same compute figures.
    ("H100", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp8": 1979.0, "fp32": 67.0}),
    ("H800", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp8": 1979.0, "fp32": 67.0}),
    # HGX B200 datasheet: FP16/BF16 Tensor Core 36 PFLOPS* for 8 GPUs -> 2.25 PF dense per GPU;
    # FP8 72 PFLOPS* -> 4.5 PF dense; TF32 18 PF* -> 1.125 PF dense.
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1125.0, "fp8": 4500.0, "fp32": 75.0}),
    # A100 datasheet (SXM and PCIe alike): BF16/FP16 Tensor Core 312 (624*); TF32 156 (312*);
    # FP32 19.5. A800 has the same compute.
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("A800", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    # L40S datasheet: BF16/FP16 Tensor Core 362.05 | 733*; TF32 183 | 366*; FP8 733 | 1,466*;
    # FP32 91.6.
    ("L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp8": 733.0, "fp32": 91.6}),
    # L40 datasheet: BF16/FP16 Tensor Core 362.1* -> 181; TF32 181* -> 90.5; FP32 90.5.
    ("L40", {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp8": 362.0, "fp32": 90.5}),
    # L4 datasheet: BF16/FP16 Tensor Core 242* -> 121; TF32 120* -> 60; FP8 485* -> 242.5; FP32 30.3.
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp8": 242.5, "fp32": 30.3}),
    # A10 datasheet: BF16/FP16 Tensor Core 250* -> 125; TF32 125* -> 62.5; FP32 31.2.
    # (A10G, AWS's variant, is slower and not listed: pass --peak-tflops.)
    ("A10G", {}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    # RTX A6000 datasheet: Tensor 309.7* -> 154.8 (FP16/BF16, FP32 accumulate); FP32 38.7.
    ("A6000", {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7}),
    # V100 datasheet: Tensor Performance 125 (SXM2) / 112 (PCIe) FP16, no BF16 tensor cores;
    # FP32 15.7 / 14.
    ("V100-PCIE", {"fp16": 112.0, "fp32": 14.0}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    # T4 datasheet: Mixed Precision (FP16/FP32) 65; FP32 8.1; no BF16.
    ("T4", {"fp16": 65.0, "fp32": 8.1}),
    # AMD Instinct MI300X: BF16/FP16 1,307.4 dense (2,614.9 with sparsity); FP32 163.4 (matrix).
    ("MI300X", {"bf16": 1307.4, "fp16": 1307.4, "tf32": 653.7, "fp8": 2614.9, "fp32": 163.4}),
    # MI250X: BF16/FP16 383 (matrix); FP32 95.7 (matrix).
    ("MI250X", {"bf16": 383.0, "fp16": 383.0, "fp32": 95.7}),
]

_DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
           "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
           "tf32": "tf32", "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
           "fp8": "fp8"}


def normalize_dtype(dtype) -> str:
    key = str(dtype).lower()
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(set(_DTYPES.values()))}")
    return _DTYPES[key]


def lookup(device_name: str) -> Optional[Tuple[str, Dict[str, float]]]:
    """(table key, per-dtype peaks) of the first entry whose key is in ``device_name``."""
    name = device_name.upper()
    for key, peaks in _TABLE:
        if key.upper() in name:
            return key, peaks
    return None


def peak_tflops(device_name: str, dtype: str = "bf16") -> Optional[float]:
    """Dense peak TFLOP/s of ``device_name`` (e.g. ``torch.cuda.get_device_name()``) for
    ``dtype`` (bf16 / fp16 / tf32 / fp32 / fp8); None if unknown (CPUs, unlisted GPUs, or a
    dtype the device has no tensor cores for, such as bf16 on a V100)."""
    found = lookup(device_name or "")
    if found is None:
        return None
    return found[1].get(normalize_dtype(dtype))


def known_devices() -> List[str]:
    return [key for key, peaks in _TABLE if peaks]


def device_name(device=None) -> str:
    """``torch.cuda.get_device_name()`` on a GPU, else ``"cpu: <model name>"``."""
    import torch
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {model}" if model else "cpu"


# --------------------------------------------------------------------------- throughput
def tflops_per_device(flops_per_step: float, step_seconds: float) -> float:
    """Achieved TFLOP/s of one device (``flops_per_step`` is that device's share)."""
    return flops_per_step / step_seconds / 1e12


def mfu(flops_per_step: float, step_seconds: float, peak_tflops: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation as a fraction (0.45 = 45 %); None without a peak."""
    if not peak_tflops or step_seconds <= 0:
        return None
    return tflops_per_device(flops_per_step, step_seconds) / peak_tflops


@dataclass
class ThroughputMeter:
    """Per-step throughput from a fixed FLOP count (compute ``rils_step_flops`` once per run).

    ``flops_per_step``: this device's model FLOPs per optimizer step (× gradient accumulation);
    ``samples_per_step``: samples per step for this meter's scope (this device or the world).
    """

    flops_per_step: float
    samples_per_step: int
    peak_tflops: Optional[float] = None
    _times: List[float] = field(default_factory=list)

    def update(self, step_seconds: float) -> Dict[str, Optional[float]]:
        self._times.append(step_seconds)
        return self.metrics(step_seconds)

    def metrics(self, step_seconds: Optional[float] = None) -> Dict[str, Optional[float]]:
        if step_seconds is None:
            step_seconds = self.median_step_seconds()
        return {
            "step_s": step_seconds,
            "samples_per_s": self.samples_per_step / step_seconds,
            "tflops_per_device": tflops_per_device(self.flops_per_step, step_seconds),
            "mfu": mfu(self.flops_per_step, step_seconds, self.peak_tflops),
        }

    def median_step_seconds(self) -> float:
        if not self._times:
            raise ValueError("no step timed yet")
        t = sorted(self._times)
        return t[len(t) // 2]


class StepTimer:
    """Wall time of a region; synchronises CUDA first and last so queued kernels count."""

    def __init__(self, device=None):
        self.device = device
        self.seconds = 0.0

    def _sync(self):
        import torch
        if torch.cuda.is_available() and (self.device is None or torch.device(self.device).type == "cuda"):
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self._t0
        return False


# --------------------------------------------------------------------------- memory
def peak_memory_bytes(device=None) -> int:
    """Peak memory of this process: CUDA ``max_memory_allocated`` on a GPU (tensors only,
    not the caching allocator's reserve), else the peak resident set size (whole process:
    Python, libraries and freed-but-kept heap included)."""
    import torch
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def device_memory_bytes(device=None) -> int:
    """Total memory of the device the step runs on: the GPU's (``total_memory``), else the host's
    physical memory (shared by every CPU rank of the machine)."""
    import torch
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        index = torch.device(device).index if device is not None else None
        return int(torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def reset_peak_memory(device=None) -> None:
    """Reset the peak counter (CUDA; on Linux CPU, the RSS high-water mark via clear_refs)."""
    import torch
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS
    except OSError:
        pass


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


def rss_high_water_bytes() -> int:
    """VmHWM (peak RSS since start or the last :func:`reset_peak_memory`); Linux only."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_memory_bytes("cpu")


def measured_matmul_tflops(dtype=None, size: int = 1024, seconds: float = 0.3) -> float:
    """This device's dense matmul rate, measured: the MFU denominator for CPUs (no datasheet
    peak applies to a shared VM). Square ``size`` GEMMs for about ``seconds``; best rate kept."""
    import time

    import torch
    dtype = dtype or torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size ** 3 / (time.perf_counter() - t0) / 1e12)
    return best
