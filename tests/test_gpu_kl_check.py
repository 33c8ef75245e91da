"""benchmarks/gpu_kl_check.py: the CPU-checkable parts (plan, JSON written first, time budget)."""
from __future__ import annotations

import importlib.util
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("gpu_kl_check", os.path.join(REPO, "benchmarks", "gpu_kl_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_plan_and_budget(tmp_path, capsys):
    mod = _load()
    assert mod.main(["--out", str(tmp_path / "a"), "--dry-run"]) == 0
    res = json.loads((tmp_path / "a" / "gpu_kl_check.json").read_text())
    kinds = [(p["kind"], p["backend"]) for p in res["parts"]]
    assert kinds[:5] == [("selfcheck", "triton"), ("selfcheck", "hybrid"), ("selfcheck", "cuda"),
                         ("selfcheck", "streaming"), ("speed", "all")]
    assert {p["status"] for p in res["parts"]} == {"planned"}
    speed = res["parts"][4]["command"]
    assert "37632,32768,512" in speed and "bfloat16" in speed
    # a budget too small for any part: everything recorded as skipped, exit status 2 (not success)
    assert mod.main(["--out", str(tmp_path / "b"), "--device", "cpu", "--time-budget-s", "10"]) == 2
    res = json.loads((tmp_path / "b" / "gpu_kl_check.json").read_text())
    assert all(p["status"] == "skipped: time budget" for p in res["parts"]) and res["exit_status"] == 2


def test_kinds_subset(tmp_path):
    """gpu_suite.py times the speed table in its own part: --kinds leaves it out, order unchanged."""
    mod = _load()
    assert mod.main(["--out", str(tmp_path), "--dry-run", "--kinds", "selfcheck,large"]) == 0
    kinds = [(p["kind"], p["backend"]) for p in json.loads((tmp_path / "gpu_kl_check.json").read_text())["parts"]]
    assert kinds == [(k, b) for k, b in mod.plan("cuda") if k != "speed"] and len(kinds) == 10
    assert mod.main(["--out", str(tmp_path), "--dry-run", "--kinds", "selfcheck", "--backends", "triton,hybrid"]) == 0
    kinds = [(p["kind"], p["backend"]) for p in json.loads((tmp_path / "gpu_kl_check.json").read_text())["parts"]]
    assert kinds == [("selfcheck", "triton"), ("selfcheck", "hybrid")]
    import pytest
    for bad in (["--kinds", "speed,nope"], ["--backends", "cuda,nope"]):
        with pytest.raises(SystemExit):
            mod.main(["--out", str(tmp_path), "--dry-run", *bad])
