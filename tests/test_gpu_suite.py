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


def test_budget_fits_one_device_command_in_order_of_value(suite):
    names = [p.name for p in suite.PARTS]
    # the build once and first, then the trainer's B/16 samples/s and MFU, then the KL speed table
    assert names == ["env", "build", "trainer", "kl_speed", "step", "kl_check", "attention"]
    total = suite.total_budget_s()
    assert total == sum(p.budget_s for p in suite.PARTS) + suite.REPORT_SLACK_S
    assert total <= suite.COMMAND_LIMIT_S <= 9 * 60
    assert all(p.budget_s >= 20 for p in suite.PARTS)


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


def test_dry_run_plan_per_device(suite, tmp_path, capsys):
    out = tmp_path / "dry"
    rc = suite.main(["--dry-run", "--out", str(out), "--wheels", str(tmp_path)])
    plan = json.loads((out / "gpu_suite_plan.json").read_text())
    assert rc == 1 and "dry run: FAIL" in capsys.readouterr().out  # no wheels in tmp_path: the plan says so
    assert plan["budget_ok"] and plan["budget_total_s"] == suite.total_budget_s()
    assert sorted(plan["wheels"]["missing"]) == sorted(suite.WHEELS)
    assert plan["parts"][-1]["ends_by_s"] + plan["report_slack_s"] <= plan["command_limit_s"]
    assert set(plan["returns"]) == {"gpu_suite.md", "gpu_suite.json", "rows.jsonl", "gpu_suite.log", "parts.tar.gz"}
    parts = {p["part"]: p["commands"] for p in plan["parts"]}
    for device, micro in (("H100 80GB", 1024), ("H200 141GB", 2048)):
        trainer = parts["trainer"][device][-1]
        assert "deepspeed.launcher.runner" in trainer and "--model vit_b16" in trainer and "zero3.json" in trainer
        assert f"--micro-batch-size {micro} " in trainer and "--kl-backend streaming" in trainer
        assert "--no-final-checkpoint" in trainer and "--activation-checkpointing" in trainer
        assert plan["trainer_micro_batch"][device] == micro
        # every KL backend is named: no self-check or timing of all candidates inside a timed part
        for cmds in parts.values():
            assert not any(re.search(r"--kl(-backend)? auto\b", c) for c in cmds[device])
        assert "--backends hybrid,triton,cuda,streaming,reference" in parts["kl_speed"][device][0]
        assert "--kl hybrid,triton " in parts["step"][device][0]
        assert "--kinds selfcheck,large" in parts["kl_check"][device][0]
    assert parts["build"]["H100 80GB"] == ["python -m rils_scale.ops.build_kernels"]
    with pytest.raises(SystemExit):
        suite.parse_args(["--parts", "env,nope"])
    with pytest.raises(SystemExit):
        suite.parse_args(["--dry-run", "--cpu-smoke"])
    assert suite.parse_args(["--parts", "trainer"]).part_names == ["env", "trainer"]  # wheels install there


def test_sizes_follow_the_device_and_the_planner(suite):
    from rils_scale.models import get_config
    from rils_scale.train.capacity import PlanConfig, max_micro_batch
    for gib in suite.DEVICES.values():
        micro = suite.trainer_micro_batch(gib)
        most = max_micro_batch(PlanConfig(model=get_config("vit_b16"), gpus=1, gpus_per_node=1, zero_stage=3,
                                          activation_checkpointing=True, gpu_memory_gb=gib))
        assert 1024 <= micro <= 0.5 * most, (gib, micro, most)  # G = micro: large, with room for the unknown
    assert suite.trainer_micro_batch(None) == 256
    batch = 1024 * 3 * 224 * 224
    assert suite.trainer_workers(None, 1024) == 8 and suite.trainer_workers(64 << 30, 1024) == 8
    assert suite.trainer_workers(8 * batch, 1024) == 2 and suite.trainer_workers(64 << 20, 1024) == 1


def test_trainer_part_arguments_parse_with_the_trainers_own_parser(suite, tmp_path):
    from rils_scale.train.config import parse_args
    for cpu in (True, False):
        launch = suite.trainer_commands(_ctx(suite, tmp_path, cpu=cpu))[-1]
        args = launch[launch.index("launchers/pretrain.py") + 1:]
        cfg = parse_args(args)  # an option the trainer dropped or renamed fails here, not on the GPU
        assert cfg.activation_checkpointing == "auto" and cfg.kl_backend == "streaming"
        assert cfg.no_final_checkpoint


def test_part_runner_imports_repo_and_honours_exit_codes(suite, tmp_path, monkeypatch):
    ctx = _ctx(suite, tmp_path)
    os.makedirs(ctx.out)
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
    res = {p.name: suite.run_part(p, ctx, p.budget_s) for p in (ok, bad, checked, missing, slow)}
    assert res["ok"]["status"] == "PASS"
    assert res["bad"]["status"] == "FAIL" and "exit 3" in res["bad"]["reason"] and "boom" in res["bad"]["reason"]
    assert len(res["bad"]["commands"]) == 1  # stops at the first failing command
    assert res["checked"]["status"] == "FAIL" and res["checked"]["reason"] == "no results file"
    assert res["missing"]["status"] == "FAIL" and "not in this tree" in res["missing"]["reason"]
    assert res["slow"]["status"] == "FAIL" and "killed at the part's time limit" in res["slow"]["reason"]
    assert res["slow"]["seconds"] < 20
    assert "boom" in (tmp_path / "out" / "gpu_suite.log").read_text()  # output streams into OUT as it comes


# A fake JIT build through the project's own loader (rils_scale/ops/_extension.py), around a
# ``load`` that behaves like torch 2.11's: FileBaton try_acquire, else wait while the lock exists.
FAKE_BUILD = r'''
import json, os, signal, sys, types
import torch
from torch.utils import cpp_extension
from torch.utils.file_baton import FileBaton
from rils_scale.ops import _extension
mode, rows = sys.argv[1], sys.argv[2]

def row(**r):
    with open(rows, "a") as f:
        f.write(json.dumps(r) + "\n")

_extension.check_toolchain = lambda jit=True: None
_extension.cuda_home = lambda: "/usr/local/cuda"
torch.cuda.is_available = lambda: True
torch.cuda.get_device_capability = lambda *a: (9, 0)

def load(name, sources, build_directory, **kw):
    baton = FileBaton(os.path.join(build_directory, "lock"))
    if not baton.try_acquire():
        row(waiting=True)
        baton.wait()  # torch 2.11: for ever, while the file exists
    if mode == "die":  # killed midway through the build: the lock file stays
        row(lock_left=os.path.exists(os.path.join(build_directory, "lock")), build_s=12.5)
        os.kill(os.getpid(), signal.SIGKILL)
    baton.release()
    return types.SimpleNamespace(source_hash="fake")

cpp_extension.load = load
mod = _extension.load_extension()
row(loaded=mod is not None, error=_extension.load_error())
sys.exit(0 if mod is not None else 1)
'''


def _writer(path, rows, then=""):
    code = ("import json, sys\nwith open(sys.argv[1], 'a') as f:\n"
            "    f.write(''.join(json.dumps(r) + '\\n' for r in json.loads(sys.argv[2])))\n") + then
    return [sys.executable, "-c", code, str(path), json.dumps(rows)]


def test_fault_rehearsal_report_keeps_every_number(suite, tmp_path, monkeypatch):
    """Issue 17: a part that hangs (killed at its limit), a build killed midway leaving its lock, a part
    that crashes after writing half its rows. The report still holds every row every part produced, the
    load after the killed build does not wait on its lock, and the parts after the faults run."""
    monkeypatch.setenv("RILS_KERNELS_CACHE", str(tmp_path / "kernels"))
    monkeypatch.delenv("RILS_CUDA_ARCHS", raising=False)
    ctx = _ctx(suite, tmp_path, cpu=True)
    os.makedirs(ctx.out)
    os.makedirs(ctx.work)
    build = tmp_path / "fake_build.py"
    build.write_text(FAKE_BUILD)
    w = tmp_path / "work"
    src = lambda name, fmt="jsonl": (lambda c: [suite.RowSource(str(w / name), fmt=fmt)])  # noqa: E731
    parts = [  # the hang first: a part may use what earlier parts left unused, and this one would
        suite.Part("hang", 6, "", lambda c: [_writer(w / "hang.jsonl", [{"y": 7.25}], "import time; time.sleep(3600)")],
                   rows=src("hang.jsonl")),
        suite.Part("first", 60, "", lambda c: [_writer(w / "first.jsonl", [{"x": 1.5}, {"x": 2.5}])],
                   rows=src("first.jsonl")),
        suite.Part("fake_build", 120, "", lambda c: [[sys.executable, str(build), "die", str(w / "build.jsonl")]],
                   rows=src("build.jsonl")),
        suite.Part("crash", 60, "", lambda c: [_writer(w / "crash.jsonl", [{"z": 0.125}, {"z": 0.375}],
                                                        "raise SystemExit('crashed after half its rows')")],
                   rows=src("crash.jsonl")),
        suite.Part("fake_load", 120, "", lambda c: [[sys.executable, str(build), "load", str(w / "load.jsonl")]],
                   rows=src("load.jsonl")),
        suite.Part("json", 60, "", lambda c: [[sys.executable, "-c", "import json, sys; json.dump([{'v': 3.75}, "
                                               "{'v': 4.5}], open(sys.argv[1], 'w'))", str(w / "list.json")]],
                   rows=src("list.json", "json")),
    ]
    header = {"date": "rehearsal", "mode": "cpu-smoke"}
    results = {r["part"]: r for r in suite.run_suite(ctx, parts, header, limit_s=600)}
    status = {k: (r["status"], r["reason"]) for k, r in results.items()}
    assert [s for s, _ in status.values()] == ["FAIL", "PASS", "FAIL", "FAIL", "PASS", "PASS"], status
    assert status["fake_build"][1].startswith("exit -9")
    assert "killed at the part's time limit" in status["hang"][1]
    assert "crashed after half its rows" in status["crash"][1]

    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    measured = {}
    for r in rows:
        if r.get("kind") != "part_result":
            measured.setdefault(r["part"], []).append({k: v for k, v in r.items() if k not in ("part", "source")})
    assert measured["first"] == [{"x": 1.5}, {"x": 2.5}]
    assert measured["fake_build"] == [{"lock_left": True, "build_s": 12.5}]
    assert measured["hang"] == [{"y": 7.25}] and measured["crash"] == [{"z": 0.125}, {"z": 0.375}]
    assert measured["fake_load"] == [{"loaded": True, "error": None}]  # no "waiting": the stale lock was removed
    assert measured["json"] == [{"v": 3.75}, {"v": 4.5}]
    assert [r["part"] for r in rows if r.get("kind") == "part_result"] == [p.name for p in parts]
    log = (out / "gpu_suite.log").read_text()
    assert "removed a stale JIT build lock" in log
    assert not list((tmp_path / "kernels").glob("*/lock"))

    report = (out / "gpu_suite.md").read_text()
    for needle in ("| 1.5 |", "| 2.5 |", "| True | 12.5 |", "| 7.25 |", "| 0.125 |", "| 0.375 |", "| 3.75 |",
                   "| 4.5 |", "| hang | FAIL |", "| crash | FAIL |", "| fake_load | PASS |",
                   "crashed after half its rows"):
        assert needle in report, needle
    state = json.loads((out / "gpu_suite.json").read_text())
    assert [p["status"] for p in state["parts"]] == [s for s, _ in status.values()] and state["running"] is None

    # the report is rebuilt from the rows alone (e.g. after the whole command was killed)
    (out / "gpu_suite.md").unlink()
    assert suite.main(["--report-only", "--out", str(out)]) == 0
    assert (out / "gpu_suite.md").read_text() == report
    # a second run never mixes its rows into an earlier run's files
    assert suite.main(["--cpu-smoke", "--out", str(out), "--parts", "attention"]) == 2


def test_no_time_left_skips_and_says_so(suite, tmp_path):
    ctx = _ctx(suite, tmp_path)
    os.makedirs(ctx.out)
    never = suite.Part("never", 30, "", lambda c: [[sys.executable, "-c", "open('ran', 'w')"]])
    (r,) = suite.run_suite(ctx, [never], {"date": "", "mode": "test"}, limit_s=suite.REPORT_SLACK_S + 1)
    assert r["status"] == "SKIPPED" and "left of the command" in r["reason"]
    assert "| never | SKIPPED |" in (tmp_path / "out" / "gpu_suite.md").read_text()


def test_row_mirror_copies_complete_rows_once(suite, tmp_path):
    jsonl, listed, dest = tmp_path / "a.jsonl", tmp_path / "b.json", tmp_path / "rows.jsonl"
    m = suite.RowMirror(str(dest), "p", [suite.RowSource(str(jsonl)), suite.RowSource(
        str(listed), fmt="json", key="parts", keep=lambda r: r["status"] != "planned")])
    jsonl.write_text('{"a": 1}\n{"a": 2')  # the second line is still being written
    listed.write_text(json.dumps({"parts": [{"status": "ok", "t": 1}, {"status": "planned"}]}))
    assert m.poll() == 2
    with open(jsonl, "a") as f:
        f.write('}\nnot json\n')
    listed.write_text(json.dumps({"parts": [{"status": "ok", "t": 1}, {"status": "FAILED", "t": 2}]}))
    assert m.poll() == 2 and m.poll() == 0
    got = [json.loads(x) for x in dest.read_text().splitlines()]
    a, b = {"part": "p", "source": "a.jsonl"}, {"part": "p", "source": "b.json"}
    assert got == [{**a, "a": 1}, {**b, "status": "ok", "t": 1}, {**a, "a": 2}, {**b, "status": "FAILED", "t": 2}]


def test_cpu_smoke_writes_report_and_fails_on_a_missing_kl_script(suite, tmp_path, monkeypatch):
    """The suite's own exit status: a failed part makes it non-zero; the report is on disk."""
    monkeypatch.setattr(suite, "KL_SCRIPT", "benchmarks/no_kl_check_here.py")
    out = tmp_path / "out"
    rc = suite.main(["--cpu-smoke", "--out", str(out), "--work", str(tmp_path / "w"), "--parts", "kl_check,attention"])
    report = json.loads((out / "gpu_suite.json").read_text())
    status = {r["part"]: r["status"] for r in report["parts"]}
    assert rc == 1 and status == {"kl_check": "FAIL", "attention": "PASS"}
    md = (out / "gpu_suite.md").read_text()
    assert "| kl_check | FAIL |" in md and "## attention (2 rows)" in md
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert {r["backend"] for r in rows if r["part"] == "attention" and "backend" in r} == {"math", "sdpa"}
    assert (out / "parts.tar.gz").exists() and (out / "gpu_suite.log").exists()
    assert len(os.listdir(out)) <= 8  # the device returns at most 8 files
