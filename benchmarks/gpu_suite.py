#!/usr/bin/env python
"""Everything only a GPU can show, in ONE device command of at most 9 minutes (docs/benchmarks.md).

    bash benchmarks/gpu_wheels.sh                      # here, once: wheels into .whl/
    python3 benchmarks/gpu_suite.py --out "$OUT"       # there (carry .whl)
    python benchmarks/gpu_suite.py --dry-run           # anywhere: plan, wheel list, budget
    python benchmarks/gpu_suite.py --cpu-smoke --out /tmp/suite   # the CPU-checkable pieces

Parts, in order, each a subprocess with ``PYTHONPATH`` = (installed wheels:) repository root,
its own time budget (the whole process group is killed at the budget) and a PASS/FAIL line with
the reason; a part passes only if every command exits 0 and its outputs say what they should:

1. ``env``       install the carried wheels offline (``pip install --no-index --no-deps
                 --target``), then check torch/CUDA/device and that every module the other
                 parts import is there;
2. ``kl``        the KL op's correctness and speed: ``benchmarks/gpu_kl_check.py --out DIR
                 --time-budget-s N`` (its exit status decides; a missing script is a FAIL);
3. ``attention`` ``benchmarks/bench_attention.py``: SDPA kernels vs flash-attn vs math at
                 B/16's shapes, float64-checked;
4. ``step``      ``benchmarks/bench_step.py`` in the trainer's configuration (bf16 weights +
                 fp32 master, G = 32,768, TF32 off), B/16, flash vs math attention;
5. ``trainer``   the real entry point: synthetic shards (launchers/make_shards.py), a tokenizer,
                 then ``deepspeed launchers/pretrain.py --ds_config ds_configs/zero3.json
                 --model vit_b16`` for 20 steps; samples/s and MFU read from metrics.jsonl.

Results are rewritten after every part (so a killed command still returns them), as at most
four files under ``--out`` (the device returns at most 8): ``gpu_suite.json``, ``gpu_suite.md``,
``gpu_suite.log`` (every command's output) and, at the end, ``parts.tar.gz`` (the parts' own
small outputs). Exit status: 0 only if every part run passed.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND_LIMIT_S = 540  # one device command may run 9 minutes (the tool's 10, less start-up slack)
REPORT_SLACK_S = 20    # writing the report and the tarball after the last part
# wheels the device lacks (DESIGN §9), as benchmarks/gpu_wheels.sh makes them: name -> version
WHEELS = {"deepspeed": "0.19.8", "hjson": "3.1.0", "pydantic": "2.13.4", "pydantic_core": "2.46.4",
          "annotated_types": "0.7.0", "typing_inspection": "0.4.2", "typing_extensions": "4.16.0",
          "webdataset": "1.0.2", "braceexpand": "0.1.7"}
# modules the parts import (the device image has the last four)
NEEDED_MODULES = ("deepspeed", "hjson", "pydantic", "webdataset", "braceexpand", "torch", "timm",
                  "sentencepiece", "numpy")
KL_SCRIPT = "benchmarks/gpu_kl_check.py"
TRAINER_STEPS = 20


@dataclass
class Part:
    name: str
    budget_s: int
    what: str
    commands: Callable[["Context"], List[List[str]]]
    check: Optional[Callable[["Context", dict], Optional[str]]] = None  # None = fine, else why not


@dataclass
class Context:
    out: str
    work: str
    cpu: bool
    wheels_dir: str
    site: str
    py: str = sys.executable
    installed: bool = False
    results: List[dict] = field(default_factory=list)

    def path(self, *p) -> str:
        return os.path.join(self.work, *p)


# ----------------------------------------------------------------------------- wheels
def wheel_name_version(filename: str):
    """``pydantic_core-2.46.4-cp312-...whl`` -> ("pydantic_core", "2.46.4")."""
    base = os.path.basename(filename)
    m = re.match(r"^([A-Za-z0-9_.]+?)-([0-9][^-]*)-.*\.whl$", base)
    if not m:
        return None
    return re.sub(r"[-.]+", "_", m.group(1)).lower(), m.group(2)


def check_wheels(wheels_dir: str) -> dict:
    """What the wheel folder holds against :data:`WHEELS`: missing, wrong version, duplicated."""
    found: Dict[str, List[str]] = {}
    for f in sorted(glob.glob(os.path.join(wheels_dir, "*.whl"))):
        nv = wheel_name_version(f)
        if nv:
            found.setdefault(nv[0], []).append(nv[1])
    missing = sorted(n for n in WHEELS if n not in found)
    wrong = sorted(f"{n} {vs} (want {WHEELS[n]})" for n, vs in found.items() if n in WHEELS and vs != [WHEELS[n]])
    dup = sorted(n for n, vs in found.items() if len(vs) > 1)  # two versions stop the whole install
    return {"dir": wheels_dir, "found": {n: vs for n, vs in found.items()}, "missing": missing,
            "wrong_version": wrong, "duplicated": dup, "ok": not (missing or wrong or dup)}


# ----------------------------------------------------------------------------- part commands
ENV_CHECK = r"""
import importlib, json, shutil, sys
import torch
need, cpu = sys.argv[1].split(","), sys.argv[2] == "cpu"
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "nvcc": shutil.which("nvcc")}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                sms=p.multi_processor_count)
missing = []
for name in need:
    try:
        m = importlib.import_module(name)
        info[name] = getattr(m, "__version__", "?")
    except Exception as exc:
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
import rils_scale
info["rils_scale"] = rils_scale.__file__
print(json.dumps(info))
if missing:
    sys.exit("missing modules: " + "; ".join(missing))
if not cpu and not torch.cuda.is_available():
    sys.exit("no CUDA device visible")
"""


def env_commands(ctx: Context):
    cmds = []
    wheels = sorted(glob.glob(os.path.join(ctx.wheels_dir, "*.whl")))
    if wheels and not ctx.cpu:  # cp312 wheels for the device; a CPU smoke uses what is installed
        cmds.append([ctx.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                     "--no-cache-dir", "--upgrade", "--target", ctx.site, *wheels])
        ctx.installed = True
    cmds.append([ctx.py, "-c", ENV_CHECK, ",".join(NEEDED_MODULES), "cpu" if ctx.cpu else "cuda"])
    return cmds


def env_check(ctx: Context, result: dict) -> Optional[str]:
    w = check_wheels(ctx.wheels_dir)
    info = next((json.loads(line) for line in result["output"].splitlines()[::-1]
                 if line.startswith("{") and '"torch"' in line), {})
    result["summary"] = {**info, "wheels_ok": w["ok"], "wheels_missing": w["missing"],
                         "wheels_wrong": w["wrong_version"] + w["duplicated"],
                         "installed_to": ctx.site if ctx.installed else None}
    if not w["ok"] and not ctx.cpu:
        return f"wheels: missing {w['missing']}, wrong {w['wrong_version']}, duplicated {w['duplicated']}"
    if not ctx.installed and not ctx.cpu:
        return f"no wheels in {ctx.wheels_dir} (run benchmarks/gpu_wheels.sh here and carry .whl)"
    return None


def kl_commands(ctx: Context):
    if ctx.cpu:  # the CLI the suite relies on; the checks themselves need a GPU
        return [[ctx.py, KL_SCRIPT, "--help"]]
    return [[ctx.py, KL_SCRIPT, "--out", ctx.path("kl"), "--time-budget-s", str(PARTS_BY_NAME["kl"].budget_s - 15)]]


def kl_check(ctx: Context, result: dict) -> Optional[str]:
    result["tables"] = sorted(glob.glob(ctx.path("kl", "*.md")))
    if ctx.cpu and "--time-budget-s" not in result["output"]:
        return f"{KL_SCRIPT} --help does not offer --time-budget-s"
    return None


def attention_commands(ctx: Context):
    out = ctx.path("attention.json")
    if ctx.cpu:
        return [[ctx.py, "benchmarks/bench_attention.py", "--device", "cpu", "--batch", "2", "--seq", "17",
                 "--heads", "2", "--head-dim", "16", "--repeat", "1", "--backends", "math,sdpa", "--out", out]]
    return [[ctx.py, "benchmarks/bench_attention.py", "--repeat", "10", "--out", out]]


def attention_check(ctx: Context, result: dict) -> Optional[str]:
    data = _read_json(ctx.path("attention.json"))
    if data is None:
        return "no attention.json"
    result["tables"] = [ctx.path("attention.md")]
    result["summary"] = [{k: r.get(k) for k in ("seq", "backend", "status", "fwd_bwd_ms", "tflops", "grad_err")}
                         for r in data["rows"]]
    return None


def step_commands(ctx: Context):
    out = ctx.path("bench_step.json")
    if ctx.cpu:
        return [[ctx.py, "benchmarks/bench_step.py", "--model", "tiny", "--device", "cpu", "--steps", "1",
                 "--warmup", "1", "--attn", "sdpa", "--kl", "streaming", "--out", out]]
    return [[ctx.py, "benchmarks/bench_step.py", "--model", "vit_b16", "--attn", "flash,math", "--kl", "auto",
             "--steps", "8", "--warmup", "3", "--out", out]]


def step_check(ctx: Context, result: dict) -> Optional[str]:
    data = _read_json(ctx.path("bench_step.json"))
    if data is None:
        return "no bench_step.json"
    result["tables"] = [ctx.path("bench_step.md")]
    rows = data["rows"]
    result["summary"] = [{k: r.get(k) for k in ("model", "attention", "kl", "status", "samples_per_s", "mfu",
                                               "executed_tflops", "peak_mem_gb")} for r in rows]
    bad = [f"{r['attention']}/{r['kl']}: {r.get('status')} {r.get('error', '')}".strip()
           for r in rows if r.get("status") != "ok"]
    return f"rows not ok: {bad}" if bad else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_commands(ctx: Context):
    shards, run = ctx.path("shapes"), ctx.path("run")
    model, steps, batch = ("tiny", 2, 8) if ctx.cpu else ("vit_b16", TRAINER_STEPS, 256)
    image = "32" if ctx.cpu else "64"  # the pipeline resizes to the model's 224
    return [
        [ctx.py, "launchers/make_shards.py", "--builtin", "shapes", "--output", shards, "--image-size", image],
        [ctx.py, "launchers/train_tokenizer.py", "--input", os.path.join(shards, "train"), "--vocab-size", "256",
         "--output", ctx.path("tok")],
        [ctx.py, "-m", "deepspeed.launcher.runner", "--master_port", str(_free_port()), "--num_gpus", "1",
         "launchers/pretrain.py", "--ds_config", "ds_configs/zero3.json", "--model", model,
         "--train-data", os.path.join(shards, "train"), "--tokenizer", ctx.path("tok.model"),
         "--output-dir", run, "--max-steps", str(steps), "--log-every", "1" if ctx.cpu else "5",
         "--warmup-steps", "2", "--save-every", "1000000", "--micro-batch-size", str(batch),
         "--num-workers", "1" if ctx.cpu else "8", "--resampled"],
    ]


def trainer_check(ctx: Context, result: dict) -> Optional[str]:
    path = ctx.path("run", "metrics.jsonl")
    if not os.path.exists(path):
        return "no metrics.jsonl"
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    recs = [r for r in recs if "samples_per_s" in r]
    if not recs:
        return "metrics.jsonl has no throughput records"
    want = 2 if ctx.cpu else TRAINER_STEPS
    last = recs[-1]
    steady = recs[1:] or recs  # the first window holds start-up (allocator, autotuning)
    sps = sorted(r["samples_per_s"] for r in steady)
    result["summary"] = {"records": len(recs), "last_step": last.get("step"),
                         "samples_per_s_median": sps[len(sps) // 2],
                         "mfu_last": last.get("mfu"), "tflops_per_device_last": last.get("tflops_per_device"),
                         "loss_last": last.get("loss")}
    if (last.get("step") or 0) < want:
        return f"stopped at step {last.get('step')} < {want}"
    return None


PARTS = [
    Part("env", 45, "offline wheel install; torch/CUDA/device; every needed module imports",
         env_commands, env_check),
    Part("kl", 150, f"{KL_SCRIPT}: KL correctness vs float64 and speed (owned by the KL op)",
         kl_commands, kl_check),
    Part("attention", 40, "bench_attention.py: SDPA kernels vs flash-attn vs math, B/16 shapes",
         attention_commands, attention_check),
    Part("step", 120, "bench_step.py: B/16 step, bf16 weights + fp32 master, G = 32,768, TF32 off",
         step_commands, step_check),
    Part("trainer", 150, f"deepspeed launchers/pretrain.py, ZeRO-3, vit_b16, {TRAINER_STEPS} steps, "
         "synthetic shards: samples/s, MFU", trainer_commands, trainer_check),
]
PARTS_BY_NAME = {p.name: p for p in PARTS}


def total_budget_s() -> int:
    return sum(p.budget_s for p in PARTS) + REPORT_SLACK_S


# ----------------------------------------------------------------------------- running
def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def part_env(ctx: Context) -> dict:
    """Children import rils_scale from the repository and the carried wheels from the site dir."""
    paths = ([ctx.site] if ctx.installed else []) + [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


def run_command(cmd: List[str], env: dict, timeout_s: float) -> dict:
    """Run in its own process group; at the budget the whole group is killed (deepspeed's
    launcher leaves children otherwise)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=max(timeout_s, 1))
        rc, timed_out = proc.returncode, False
    except subprocess.TimeoutExpired as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        try:  # a grandchild outside the group could hold the pipe open: do not wait on it for long
            output, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            output = exc.output if isinstance(exc.output, str) else ""
        rc, timed_out = None, True
    return {"cmd": cmd, "rc": rc, "timed_out": timed_out, "seconds": round(time.time() - t0, 1),
            "output": output or ""}


def run_part(part: Part, ctx: Context, log) -> dict:
    t0 = time.time()
    result = {"part": part.name, "budget_s": part.budget_s, "status": "PASS", "reason": "", "commands": []}
    try:
        commands = part.commands(ctx)
    except Exception as exc:  # noqa: BLE001
        commands, result["status"], result["reason"] = [], "FAIL", f"could not build commands: {exc}"
    outputs = []
    for cmd in commands:
        missing = [c for c in cmd[1:2] if c.endswith(".py") and not os.path.exists(os.path.join(REPO, c))]
        if missing:
            result.update(status="FAIL", reason=f"{missing[0]} is not in this tree")
            break
        left = part.budget_s - (time.time() - t0)
        if left <= 1:
            result.update(status="FAIL", reason=f"budget {part.budget_s}s spent before {_short(cmd)}")
            break
        r = run_command(cmd, part_env(ctx), left)
        log(f"\n===== {part.name}: {_short(cmd)}  (rc {r['rc']}, {r['seconds']} s)\n{r['output']}")
        outputs.append(r["output"])
        result["commands"].append({"cmd": _short(cmd), "rc": r["rc"], "seconds": r["seconds"]})
        if r["timed_out"]:
            result.update(status="FAIL", reason=f"timed out at the part's budget {part.budget_s}s: {_short(cmd)}")
            break
        if r["rc"] != 0:
            tail = r["output"].strip().splitlines()[-1:] or [""]
            result.update(status="FAIL", reason=f"exit {r['rc']}: {_short(cmd)}: {tail[0][:300]}")
            break
    result["output"] = "\n".join(outputs)
    if result["status"] == "PASS" and part.check is not None:
        try:
            why = part.check(ctx, result)
        except Exception as exc:  # noqa: BLE001 - a broken output is a failed part
            why = f"could not read its outputs: {type(exc).__name__}: {exc}"
        if why:
            result.update(status="FAIL", reason=why)
    result.pop("output")
    result["seconds"] = round(time.time() - t0, 1)
    return result


def _short(cmd: List[str]) -> str:
    parts = ["python" if c == sys.executable else ("-c <script>" if "\n" in c else c) for c in cmd]
    return " ".join(parts)[:300]


def write_report(ctx: Context, header: dict) -> None:
    os.makedirs(ctx.out, exist_ok=True)
    with open(os.path.join(ctx.out, "gpu_suite.json"), "w") as f:
        json.dump({**header, "parts": ctx.results}, f, indent=2, default=str)
    lines = [f"# GPU suite {header['date']}", "", f"mode: {header['mode']}; {header.get('device', '')}", "",
             "| part | status | seconds | budget s | reason |", "|---|---|---:|---:|---|"]
    for r in ctx.results:
        lines.append(f"| {r['part']} | {r['status']} | {r.get('seconds', '')} | {r['budget_s']} | "
                     f"{r['reason'].replace('|', '/')} |")
    for r in ctx.results:
        tables = [open(t).read().strip() for t in r.get("tables", []) if os.path.exists(t)]
        if tables:  # the part's own markdown (benchmark tables), else its summary
            lines += ["", f"## {r['part']}", ""] + [t + "\n" for t in tables]
        elif r.get("summary"):
            lines += ["", f"## {r['part']}", "", "```", json.dumps(r["summary"], indent=1, default=str), "```"]
    with open(os.path.join(ctx.out, "gpu_suite.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def bundle_outputs(ctx: Context, max_bytes: int = 2 << 20) -> None:
    """The parts' own small outputs (JSON, markdown, logs, metrics) as one tarball."""
    path = os.path.join(ctx.out, "parts.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for root, dirs, files in os.walk(ctx.work):
            dirs[:] = [d for d in dirs if d not in ("shapes", "checkpoints")]
            for f in files:
                full = os.path.join(root, f)
                if f.endswith((".json", ".jsonl", ".md", ".log", ".txt", ".csv")) and os.path.getsize(full) <= max_bytes:
                    tar.add(full, arcname=os.path.relpath(full, ctx.work))


def plan(ctx: Context, names: List[str]) -> dict:
    wheels = check_wheels(ctx.wheels_dir)
    total = total_budget_s()
    parts = []
    for p in PARTS:
        try:
            cmds = [_short(c) for c in p.commands(ctx)]
        except Exception as exc:  # noqa: BLE001
            cmds = [f"cannot build: {exc}"]
        parts.append({"part": p.name, "budget_s": p.budget_s, "what": p.what, "selected": p.name in names,
                      "commands": cmds})
    ctx.installed = False  # planning only
    return {"wheels": wheels, "budget_total_s": total, "command_limit_s": COMMAND_LIMIT_S,
            "budget_ok": total <= COMMAND_LIMIT_S, "parts": parts}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_suite_out"), help="results (default: $OUT)")
    p.add_argument("--work", default="", help="scratch for the parts (default: a temporary folder)")
    p.add_argument("--wheels", default=os.path.join(REPO, ".whl"), help="carried wheels (benchmarks/gpu_wheels.sh)")
    p.add_argument("--site", default="", help="where the wheels are installed (default: WORK/site)")
    p.add_argument("--parts", default=",".join(x.name for x in PARTS), help="comma-separated subset, in suite order")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="plan, wheel list and budget only; run nothing")
    mode.add_argument("--cpu-smoke", action="store_true", help="run the parts' CPU-checkable pieces on the CPU")
    args = p.parse_args(argv)
    names = [n for n in args.parts.split(",") if n]
    unknown = [n for n in names if n not in PARTS_BY_NAME]
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {[x.name for x in PARTS]}")
    args.part_names = names
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="gpu_suite_")
    os.makedirs(work, exist_ok=True)
    ctx = Context(out=args.out, work=work, cpu=args.cpu_smoke or args.dry_run, wheels_dir=args.wheels,
                  site=args.site or os.path.join(work, "site"))
    mode = "dry-run" if args.dry_run else ("cpu-smoke" if args.cpu_smoke else "gpu")
    header = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "mode": mode,
              "budget_total_s": total_budget_s(), "command_limit_s": COMMAND_LIMIT_S}
    if args.dry_run:
        info = plan(Context(out=args.out, work=work, cpu=False, wheels_dir=args.wheels, site=ctx.site), args.part_names)
        print(json.dumps(info, indent=2))
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_suite_plan.json"), "w") as f:
            json.dump({**header, **info}, f, indent=2)
        problems = ([] if info["budget_ok"] else [f"budgets sum to {info['budget_total_s']}s > {COMMAND_LIMIT_S}s"])
        problems += [] if info["wheels"]["ok"] else [f"wheels: missing {info['wheels']['missing']}, wrong "
                                                     f"{info['wheels']['wrong_version']}, duplicated "
                                                     f"{info['wheels']['duplicated']} in {args.wheels}"]
        for why in problems:
            print("FAIL", why)
        print("dry run:", "FAIL" if problems else "PASS")
        return 1 if problems else 0

    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "gpu_suite.log")
    open(log_path, "w").close()

    def log(text):
        with open(log_path, "a") as f:
            f.write(text)

    print(f"gpu_suite ({mode}): parts {args.part_names}, budget {total_budget_s()} s of {COMMAND_LIMIT_S} s; "
          f"work {work}", flush=True)
    for part in PARTS:
        if part.name not in args.part_names:
            continue
        result = run_part(part, ctx, log)
        ctx.results.append(result)
        if part.name == "env" and result["status"] == "PASS":
            header["device"] = _device_line(log_path)
        print(f"{result['status']} {part.name} ({result['seconds']} s of {part.budget_s}){': ' + result['reason'] if result['reason'] else ''}",
              flush=True)
        write_report(ctx, header)
    write_report(ctx, header)
    bundle_outputs(ctx)
    failed = [r["part"] for r in ctx.results if r["status"] != "PASS"]
    with open(os.path.join(args.out, "gpu_suite.md")) as f:  # the device reply carries the output's end
        print("\n" + f.read())
    print(f"suite: {'FAIL ' + ','.join(failed) if failed else 'PASS'}; report {os.path.join(args.out, 'gpu_suite.md')}")
    return 1 if failed else 0


def _device_line(log_path: str) -> str:
    with open(log_path) as f:
        for line in f.read().splitlines()[::-1]:
            if line.startswith("{") and '"torch"' in line:
                info = json.loads(line)
                return (f"device {info.get('device', 'none')} (sm {info.get('capability', '-')}), torch {info['torch']}, "
                        f"CUDA {info['cuda']}, Python {info['python']}, deepspeed {info.get('deepspeed', '-')}")
    return ""


if __name__ == "__main__":
    sys.exit(main())
