"""The README's first command, shortened: every stage of launchers/demo.py runs and the summary
has the documented keys (the full 300-step run and its numbers are in the README)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_end_to_end_short(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "launchers/demo.py", "--output", str(out), "--steps", "8",
                           "--micro-batch", "16"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["num_classes"] == 30 and summary["num_heldout"] == 600
    assert abs(summary["chance"] - 1 / 30) < 1e-9
    assert 0.0 <= summary["zeroshot_top1"] <= 1.0
    assert os.path.getsize(summary["patch_sentence_maps"]) > 10_000
    assert "zero-shot top-1" in proc.stdout and "x chance" in proc.stdout
    # the default data are the multi-object scenes: localisation is scored and printed
    assert summary["dataset"] == "scenes" and 0.0 <= summary["localization"] <= 1.0
    assert 0.3 < summary["localization_chance"] < 0.5 and "localisation:" in proc.stdout
    assert summary["probe_features"] == "encoder"
    # CPU ranks train in fp32 unless the CPU computes bf16 natively (the start-up line says why)
    from rils_scale.train.precision import cpu_native_bf16
    run_config = json.loads((out / "run" / "config.json").read_text())
    assert run_config["deepspeed"]["bf16"]["enabled"] == cpu_native_bf16()[0]
    assert ("native on this CPU" if cpu_native_bf16()[0] else "fp32 instead of the DeepSpeed config's bf16") \
        in proc.stdout
