"""Where metrics go: metrics.jsonl, TensorBoard and a progress line (rank 0 only)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Dict, Optional

from ..checkpoint.integrity import fsync_path


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


METRICS = "metrics.jsonl"
DISCARDED = "metrics.discarded.jsonl"


def trim_metrics(output_dir: str, step: int) -> int:
    """Before a run (re)starts at ``step``: move the rows of later steps to ``metrics.discarded.jsonl``.

    ``metrics.jsonl`` is only ever appended to, except here: after a kill (or a roll back) the
    rows past the resumed step describe steps that will be trained again, and a step must not
    be listed twice. They are appended to ``metrics.discarded.jsonl`` (fsynced) first, then the
    kept rows replace ``metrics.jsonl`` atomically; a kill in between leaves a row in both files,
    never in neither. A line that is not JSON (a row cut by the kill) goes to the discarded file
    as ``{"unparseable": "<text>"}``. Event rows (``"event"``) follow the same rule by their
    ``step``. Returns the number of rows moved.
    """
    path = os.path.join(output_dir, METRICS)
    if not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:
        raw = f.read()
    kept, dropped = [], []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            later = isinstance(row, dict) and int(row.get("step", 0)) > step
        except (ValueError, TypeError):
            dropped.append(json.dumps({"unparseable": line}))
            continue
        (dropped if later else kept).append(line)
    if not dropped and (not raw or raw.endswith(b"\n")):
        return 0
    if dropped:
        with open(os.path.join(output_dir, DISCARDED), "a") as f:
            f.write("".join(line + "\n" for line in dropped))
            f.flush()
            os.fsync(f.fileno())
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(output_dir)
    return len(dropped)


class MetricsLogger:
    """Appends one JSON object per logged step (never truncates); mirrors scalars to TensorBoard.

    ``start_step``: the step the run (re)starts from. Rows of later steps are moved aside first
    (:func:`trim_metrics`), and TensorBoard is told to hide its events of steps after it
    (``SummaryWriter(purge_step=start_step + 1)``: the old event files stay on disk, TensorBoard
    drops their values from ``start_step + 1`` on when it reads the new file).
    """

    def __init__(self, output_dir: str, enabled: bool, max_steps: int, start_step: int = 0):
        self.enabled, self.max_steps = enabled, max_steps
        self.writer = None
        self.jsonl = None
        self.start = time.time()
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        moved = trim_metrics(output_dir, start_step)
        if moved:
            print(f"[rils_scale] {moved} row(s) of {METRICS} after step {start_step} moved to {DISCARDED}", flush=True)
        self.jsonl = open(os.path.join(output_dir, METRICS), "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start_step + 1)
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

    def event(self, name: str, step: int, **fields) -> None:
        """An event row (``{"event": name, "step": step, ...}``), in metrics.jsonl only."""
        if self.enabled:
            self.jsonl.write(json.dumps({"event": name, "step": step, **fields}) + "\n")

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
