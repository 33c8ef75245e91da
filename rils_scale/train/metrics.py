"""Where metrics go: metrics.jsonl, TensorBoard and a progress line (rank 0 only)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Dict, Optional


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsLogger:
    """Appends one JSON object per logged step; mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: str, enabled: bool, max_steps: int, resume: bool = False):
        self.enabled, self.max_steps = enabled, max_steps
        self.writer = None
        self.jsonl = None
        self.start = time.time()
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "metrics.jsonl")
        self.jsonl = open(path, "a" if resume else "w", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        except Exception as exc:  # tensorboard is a dependency, but never lose a run over it
            print(f"[rils_scale] TensorBoard disabled: {exc}", file=sys.stderr)

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, step)

    def progress(self, step: int, m: Dict[str, float], steps_this_run: int) -> None:
        if not self.enabled:
            return
        elapsed = time.time() - self.start
        eta = elapsed / max(1, steps_this_run) * (self.max_steps - step)
        parts = [f"step {step}/{self.max_steps}", f"loss {m['loss']:.4f}", f"clip {m['clip_loss']:.4f}",
                 f"recon {m['recon_loss']:.4f}", f"acc {m['clip_acc']:.3f}", f"keep {m['recon_keep_frac']:.2f}",
                 f"lr {m['lr']:.2e}", f"{m['samples_per_s']:.1f} samples/s", f"data wait {m['data_wait_s']:.3f}s"]
        if m.get("mfu") is not None:
            parts.append(f"MFU {100 * m['mfu']:.1f}%")
        if m.get("nonfinite_steps"):
            parts.append(f"non-finite steps {int(m['nonfinite_steps'])}")
        if m.get("skipped_samples"):
            parts.append(f"skipped {int(m['skipped_samples'])}")
        parts.append(f"eta {_fmt_duration(eta)}")
        print(" | ".join(parts), flush=True)

    def add_image(self, tag: str, image, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def merge_skips(total: Dict[str, int], new: Optional[Dict[str, int]]) -> Dict[str, int]:
    for k, v in (new or {}).items():
        total[k] = total.get(k, 0) + int(v)
    return total
