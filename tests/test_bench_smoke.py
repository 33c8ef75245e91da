"""benchmarks/bench_step.py runs end to end on the CPU with the tiny preset and writes its summary."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_step_tiny_cpu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "benchmarks/bench_step.py", "--model", "tiny", "--device", "cpu", "--steps", "3",
           "--threads", "1", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "| model | attention | KL |" in res.stdout
    summary = json.loads(out.read_text())
    rows = summary["rows"]
    # flash,math x fused,reference; on CPU "flash" is SDPA and "fused" the streaming KL
    assert {(r["attention"], r["kl"]) for r in rows} == {("sdpa", "streaming"), ("sdpa", "reference"),
                                                         ("math", "streaming"), ("math", "reference")}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["step_s"] > 0 and r["samples_per_s"] == 8 / r["step_s"]
        assert r["model_tflop_per_step"] > 0 and r["tflops"] > 0 and r["mfu"] is None  # no CPU peak
        assert r["peak_mem_gb"] > 0
    # the same model and batch: every configuration starts from the same loss
    losses = [r["loss"] for r in rows]
    assert max(losses) - min(losses) < 1e-3
    assert (tmp_path / "bench.md").read_text().count("| tiny |") == 4


def test_bench_step_oom_row_and_mfu(tmp_path):
    # --peak-tflops gives an MFU on the CPU; a failing configuration becomes a row, not a crash
    cmd = [sys.executable, "benchmarks/bench_step.py", "--model", "tiny,nonexistent", "--device", "cpu",
           "--steps", "1", "--warmup", "1", "--threads", "1", "--attn", "sdpa", "--kl", "reference",
           "--peak-tflops", "1.0", "--out", str(tmp_path / "b.json")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert rows[0]["status"] == "ok" and 0 < rows[0]["mfu"] < 1
    assert rows[1]["status"] == "error" and "unknown model preset" in rows[1]["error"]
