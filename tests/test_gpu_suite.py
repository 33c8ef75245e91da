"""benchmarks/gpu_suite.py on the CPU: arguments, wheel list, time budget, and the part runner
(subprocess with PYTHONPATH = repository root, exit codes decide, a missing script FAILs)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", os.path.join(ROOT, "benchmarks", "gpu_suite.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("gpu_suite", None)


def _ctx(suite, tmp_path, cpu=True):
    return suite.Context(out=str(tmp_path / "out"), work=str(tmp_path / "work"), cpu=cpu,
                         wheels_dir=str(tmp_path / "whl"), site=str(tmp_path / "site"))


def test_budget_fits_one_device_command(suite):
    assert [p.name for p in suite.PARTS] == ["env", "kl", "attention", "step", "trainer"]
    total = suite.total_budget_s()
    assert total == sum(p.budget_s for p in suite.PARTS) + suite.REPORT_SLACK_S
    assert total <= suite.COMMAND_LIMIT_S <= 9 * 60
    assert all(p.budget_s >= 30 for p in suite.PARTS)


def test_wheel_list_matches_the_build_script(suite, tmp_path):
    script = open(os.path.join(ROOT, "benchmarks", "gpu_wheels.sh")).read()
    pinned = dict(re.findall(r"([A-Za-z][A-Za-z0-9_-]*)==([0-9][0-9.]*)", script))
    pinned = {re.sub(r"[-.]+", "_", k).lower(): v for k, v in pinned.items()}
    assert pinned == suite.WHEELS
    whl = tmp_path / "whl"
    whl.mkdir()
    for name, version in suite.WHEELS.items():
        tag = "cp312-cp312-manylinux_2_17_x86_64" if name == "pydantic_core" else "py3-none-any"
        (whl / f"{name}-{version}-{tag}.whl").write_bytes(b"")
    assert suite.check_wheels(str(whl))["ok"]
    (whl / "hjson-3.0.0-py3-none-any.whl").write_bytes(b"")  # two versions stop the install
    (whl / "webdataset-1.0.2-py3-none-any.whl").unlink()
    w = suite.check_wheels(str(whl))
    assert not w["ok"] and w["missing"] == ["webdataset"] and w["duplicated"] == ["hjson"]
    assert suite.wheel_name_version("typing_extensions-4.16.0-py3-none-any.whl") == ("typing_extensions", "4.16.0")


def test_dry_run_and_arguments(suite, tmp_path):
    out = tmp_path / "dry"
    rc = suite.main(["--dry-run", "--out", str(out), "--work", str(tmp_path / "w"), "--wheels", str(tmp_path)])
    plan = json.loads((out / "gpu_suite_plan.json").read_text())
    assert rc == 1  # no wheels in tmp_path: the plan says so and fails
    assert plan["budget_ok"] and plan["budget_total_s"] == suite.total_budget_s()
    assert sorted(plan["wheels"]["missing"]) == sorted(suite.WHEELS)
    trainer = next(p for p in plan["parts"] if p["part"] == "trainer")
    assert any("deepspeed.launcher.runner" in c and "--model vit_b16" in c and "zero3.json" in c
               for c in trainer["commands"])
    kl = next(p for p in plan["parts"] if p["part"] == "kl")
    assert "gpu_kl_check.py --out" in kl["commands"][0] and "--time-budget-s" in kl["commands"][0]
    with pytest.raises(SystemExit):
        suite.parse_args(["--parts", "env,nope"])
    with pytest.raises(SystemExit):
        suite.parse_args(["--dry-run", "--cpu-smoke"])


def test_part_runner_imports_repo_and_honours_exit_codes(suite, tmp_path, monkeypatch):
    ctx = _ctx(suite, tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)  # the child must get the repository itself
    script = tmp_path / "imports_repo.py"  # its sys.path[0] is tmp_path: only PYTHONPATH finds the repo
    script.write_text("import rils_scale, sys\nassert rils_scale.__file__.startswith(sys.argv[1])\n")
    ok = suite.Part("ok", 60, "", lambda c: [[sys.executable, str(script), ROOT]])
    bad = suite.Part("bad", 60, "", lambda c: [[sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
                                               [sys.executable, "-c", "open('never', 'w')"]])
    checked = suite.Part("checked", 60, "", lambda c: [[sys.executable, "-c", "pass"]],
                         check=lambda c, r: "no results file")
    missing = suite.Part("missing", 60, "", lambda c: [[sys.executable, "benchmarks/no_such_script.py"]])
    slow = suite.Part("slow", 2, "", lambda c: [[sys.executable, "-c", "import time; time.sleep(30)"]])
    logged = []
    res = {p.name: suite.run_part(p, ctx, logged.append) for p in (ok, bad, checked, missing, slow)}
    assert res["ok"]["status"] == "PASS"
    assert res["bad"]["status"] == "FAIL" and "exit 3" in res["bad"]["reason"] and "boom" in res["bad"]["reason"]
    assert len(res["bad"]["commands"]) == 1  # stops at the first failing command
    assert res["checked"]["status"] == "FAIL" and res["checked"]["reason"] == "no results file"
    assert res["missing"]["status"] == "FAIL" and "not in this tree" in res["missing"]["reason"]
    assert res["slow"]["status"] == "FAIL" and "timed out" in res["slow"]["reason"] and res["slow"]["seconds"] < 20
    assert any("boom" in text for text in logged)


def test_cpu_smoke_writes_report_and_fails_on_a_missing_kl_script(suite, tmp_path, monkeypatch):
    """The suite's own exit status: a failed part makes it non-zero; the report is on disk."""
    monkeypatch.setattr(suite, "KL_SCRIPT", "benchmarks/no_kl_check_here.py")
    out = tmp_path / "out"
    rc = suite.main(["--cpu-smoke", "--out", str(out), "--work", str(tmp_path / "w"), "--parts", "kl,attention"])
    report = json.loads((out / "gpu_suite.json").read_text())
    status = {r["part"]: r["status"] for r in report["parts"]}
    assert rc == 1 and status == {"kl": "FAIL", "attention": "PASS"}
    assert "| kl | FAIL |" in (out / "gpu_suite.md").read_text()
    assert (out / "parts.tar.gz").exists() and (out / "gpu_suite.log").exists()
    assert len(os.listdir(out)) <= 8  # the device returns at most 8 files
