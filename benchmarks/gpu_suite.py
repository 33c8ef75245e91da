#!/usr/bin/env python
"""Everything only a GPU can show, in ONE device command of at most 9 minutes (docs/benchmarks.md).

    bash benchmarks/gpu_wheels.sh                      # here, once: wheels into .whl/
    python3 benchmarks/gpu_suite.py --out "$OUT"       # there (carry .whl)
    python benchmarks/gpu_suite.py --dry-run           # anywhere: plan per device, wheel list, budget
    python benchmarks/gpu_suite.py --cpu-smoke --out /tmp/suite   # the CPU-checkable pieces
    python benchmarks/gpu_suite.py --report-only --out DIR        # rebuild DIR/gpu_suite.md from its rows

Parts, ordered by value (a cut run still answers the main questions), each a subprocess group with
``PYTHONPATH`` = (installed wheels:) repository root, killed whole at its time limit:

1. ``env``       install the carried wheels offline, check torch/CUDA/device/memory and every module;
2. ``build``     the fused CUDA extension's JIT build, once, first, bounded (a build killed at its
                 limit leaves torch's lock file: rils_scale/ops/build_lock.py removes it at the next
                 load); later parts use ``cuda`` only if this part built it;
3. ``trainer``   the real entry point: ``deepspeed launchers/pretrain.py --ds_config
                 ds_configs/zero3.json --model vit_b16``, micro-batch (= G, the prototypes of one GPU)
                 sized from the device's memory, KL backend named, activation checkpointing
                 ``auto`` (the trainer's default), no checkpoint at the last step;
4. ``kl_speed``  the KL speed table at P = 37,632, M = 32,768, D = 512, bf16, backends named (no
                 self-check inside the timed budget);
5. ``step``      ``bench_step.py`` B/16, G = 32,768, with the two fastest KL backends of ``kl_speed``;
6. ``kl_check``  ``gpu_kl_check.py --kinds selfcheck,large``: correctness against float64;
7. ``attention`` ``bench_attention.py`` at B/16's shapes.

A part may run longer than its budget by what earlier parts left unused; the command never runs
past ``COMMAND_LIMIT_S``. Every measured number reaches ``--out`` the moment it exists: the rows each
part's commands write (JSONL / JSON in the scratch folder) are copied into ``OUT/rows.jsonl`` while
the part runs (every 0.5 s, and once more when it ends, fails or is killed), tagged with the part;
every command's output streams into ``OUT/gpu_suite.log``; ``OUT/gpu_suite.md`` is rebuilt from
``rows.jsonl`` and ``OUT/gpu_suite.json`` (the parts' status) whenever either changes. At the end
``OUT/parts.tar.gz`` holds the parts' own small files. Five files (the device returns at most eight).
Exit status: 0 only if every part run passed.
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
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND_LIMIT_S = 540  # one device command may run 9 minutes (the tool's 10, less start-up slack)
REPORT_SLACK_S = 15    # the report and the tarball after the last part
MIN_PART_S = 5         # a part with less time left than this is skipped, and says so
# wheels the device lacks (DESIGN §9), as benchmarks/gpu_wheels.sh makes them: name -> version
WHEELS = {"deepspeed": "0.19.8", "hjson": "3.1.0", "pydantic": "2.13.4", "pydantic_core": "2.46.4",
          "annotated_types": "0.7.0", "typing_inspection": "0.4.2", "typing_extensions": "4.16.0",
          "webdataset": "1.0.2", "braceexpand": "0.1.7"}
# modules the parts import (the device image has the last four)
NEEDED_MODULES = ("deepspeed", "hjson", "pydantic", "webdataset", "braceexpand", "torch", "timm",
                  "sentencepiece", "numpy")
KL_SCRIPT = "benchmarks/gpu_kl_check.py"
KL_BENCH = "benchmarks/bench_patch_sentence_kl.py"
KL_SPEED_SHAPE = (37_632, 32_768, 512)           # B/16: 256 images x 147 masked patches, 32k captions
KL_SPEED_BACKENDS = ("hybrid", "triton", "cuda", "streaming", "reference")  # most informative first
STEP_KL_DEFAULT = ("streaming", "hybrid")        # when kl_speed ranked nothing
TRAINER_STEPS, TRAINER_LOG_EVERY = 15, 5
TRAINER_KL = "streaming"  # pure PyTorch bf16 GEMMs: the one backend that cannot fail to build or compile
TRAINER_CHECKPOINTING = "auto"  # the trainer's default: the planner picks none/selective/every for the memory
# Memory as torch reports it (GiB) of the two cards this suite is sized for (dry-run plans)
DEVICES = {"H100 80GB": 79.2, "H200 141GB": 139.8}
# trainer micro-batch (= G on one GPU) by device memory: the largest power of two <= 45 % of the
# capacity planner's largest B/16 micro-batch with checkpointing (2,877 at 80 GB, 4,698 at 141 GB)
MICRO_BATCH_BY_MEMORY = ((120.0, 2048), (70.0, 1024), (35.0, 512))

# what one command leaves under --out (five files: the device returns at most eight)
REPORT_MD, REPORT_JSON, ROWS, LOG = "gpu_suite.md", "gpu_suite.json", "rows.jsonl", "gpu_suite.log"
BUNDLE, PLAN_JSON = "parts.tar.gz", "gpu_suite_plan.json"


@dataclass
class RowSource:
    """A file a part's commands write measured rows to: ``jsonl`` (one object a line, appended) or
    ``json`` (a list rewritten as it grows; under ``key`` when the file is an object)."""
    path: str
    fmt: str = "jsonl"
    key: Optional[str] = None
    keep: Optional[Callable[[dict], bool]] = None  # mirror a row once this holds (e.g. no longer "planned")


@dataclass
class Part:
    name: str
    budget_s: int
    what: str
    commands: Callable[["Context"], List[List[str]]]
    check: Optional[Callable[["Context", dict], Optional[str]]] = None  # always runs; None = fine, else why not
    rows: Optional[Callable[["Context"], List[RowSource]]] = None
    columns: Sequence[str] = ()  # row fields the report's table shows (default: every scalar field)


@dataclass
class Context:
    out: str
    work: str
    cpu: bool
    wheels_dir: str
    site: str
    py: str = sys.executable
    installed: bool = False
    env_info: dict = field(default_factory=dict)   # the env part's findings (device, memory_gib, shm)
    cuda_built: bool = False                       # the build part built the extension
    kl_ranking: List[str] = field(default_factory=list)  # kl_speed: backends, fastest first
    part_limit_s: float = 0.0                      # the running part's time limit
    results: List[dict] = field(default_factory=list)

    def path(self, *p) -> str:
        return os.path.join(self.work, *p)

    def emit(self, part: str, row: dict) -> None:
        """A row the suite itself measured (device facts, build time): straight into OUT/rows.jsonl."""
        append_rows(os.path.join(self.out, ROWS), [{"part": part, "source": "suite", **row}])


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


# ----------------------------------------------------------------------------- sizes from the device
def trainer_micro_batch(memory_gib: Optional[float]) -> int:
    """Samples per step of the trainer part (= its prototypes G: one GPU's global batch)."""
    for gib, micro in MICRO_BATCH_BY_MEMORY:
        if memory_gib is not None and memory_gib >= gib:
            return micro
    return 256


def trainer_workers(shm_free_bytes: Optional[int], micro: int, most: int = 8) -> int:
    """DataLoader workers whose in-flight batches (2 per worker, uint8 224 x 224) fit in half of
    the free /dev/shm (a container's can be small)."""
    if not shm_free_bytes:
        return most
    batch = micro * 3 * 224 * 224
    return max(1, min(most, int(shm_free_bytes * 0.5 // (2 * batch))))


# ----------------------------------------------------------------------------- part: env
ENV_CHECK = r"""
import importlib, json, os, shutil, sys
import torch
need, cpu = sys.argv[1].split(","), sys.argv[2] == "cpu"
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "nvcc": shutil.which("nvcc"), "cpus": os.cpu_count()}
try:
    st = os.statvfs("/dev/shm")
    info["shm_free_bytes"] = st.f_bavail * st.f_frsize
except OSError:
    pass
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
    ctx.env_info = info
    if info:
        ctx.emit("env", {"kind": "env", **info, "wheels_ok": w["ok"]})
    result["summary"] = {**info, "wheels_ok": w["ok"], "wheels_missing": w["missing"],
                         "wheels_wrong": w["wrong_version"] + w["duplicated"],
                         "installed_to": ctx.site if ctx.installed else None}
    if not w["ok"] and not ctx.cpu:
        return f"wheels: missing {w['missing']}, wrong {w['wrong_version']}, duplicated {w['duplicated']}"
    if not ctx.installed and not ctx.cpu:
        return f"no wheels in {ctx.wheels_dir} (run benchmarks/gpu_wheels.sh here and carry .whl)"
    return None


# ----------------------------------------------------------------------------- part: build
def build_commands(ctx: Context):
    if ctx.cpu:  # the toolchain check only: a full build takes minutes on a small CPU (test_kernel_build)
        return [[ctx.py, "-m", "rils_scale.ops.build_kernels", "--check-only"]]
    return [[ctx.py, "-m", "rils_scale.ops.build_kernels"]]  # the device's arch, node-local JIT cache


def build_check(ctx: Context, result: dict) -> Optional[str]:
    m = re.search(r"build_kernels: (\S+) \(sources (\w+), archs (\w+)\) in ([0-9.]+) s", result["output"])
    ok = result["status"] == "PASS"
    ctx.cuda_built = ok and not ctx.cpu and m is not None
    ctx.emit("build", {"kind": "build", "built": ctx.cuda_built, "seconds": result.get("seconds_so_far"),
                       "build_s": float(m.group(4)) if m else None, "archs": m.group(3) if m else None,
                       "timed_out": "killed at the part's time limit" in result["reason"]})
    if ok and not ctx.cpu and m is None:
        return "build_kernels printed no module line"
    return None


# ----------------------------------------------------------------------------- part: trainer
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_sizes(ctx: Context) -> dict:
    if ctx.cpu:
        return {"model": "tiny", "steps": 2, "log_every": 1, "micro": 8, "workers": 1, "image": "32"}
    micro = trainer_micro_batch(ctx.env_info.get("memory_gib"))
    return {"model": "vit_b16", "steps": TRAINER_STEPS, "log_every": TRAINER_LOG_EVERY, "micro": micro,
            "workers": trainer_workers(ctx.env_info.get("shm_free_bytes"), micro), "image": "64"}


def trainer_commands(ctx: Context):
    shards, run, z = ctx.path("shapes"), ctx.path("run"), trainer_sizes(ctx)
    return [
        [ctx.py, "launchers/make_shards.py", "--builtin", "shapes", "--output", shards, "--image-size", z["image"]],
        [ctx.py, "launchers/train_tokenizer.py", "--input", os.path.join(shards, "train"), "--vocab-size", "256",
         "--output", ctx.path("tok")],
        [ctx.py, "-m", "deepspeed.launcher.runner", "--master_port", str(_free_port()), "--num_gpus", "1",
         "launchers/pretrain.py", "--ds_config", "ds_configs/zero3.json", "--model", z["model"],
         "--train-data", os.path.join(shards, "train"), "--tokenizer", ctx.path("tok.model"),
         "--output-dir", run, "--max-steps", str(z["steps"]), "--log-every", str(z["log_every"]),
         "--warmup-steps", "2", "--save-every", "1000000", "--no-final-checkpoint",
         "--micro-batch-size", str(z["micro"]), "--num-workers", str(z["workers"]), "--resampled",
         "--kl-backend", TRAINER_KL, "--activation-checkpointing", TRAINER_CHECKPOINTING],
    ]


def trainer_rows(ctx: Context):
    return [RowSource(ctx.path("run", "metrics.jsonl"))]


def trainer_check(ctx: Context, result: dict) -> Optional[str]:
    recs = [r for r in read_jsonl(ctx.path("run", "metrics.jsonl")) if "samples_per_s" in r]
    if not recs:
        return "metrics.jsonl has no throughput records"
    z = trainer_sizes(ctx)
    last = recs[-1]
    steady = recs[1:] or recs  # the first window holds start-up (allocator, autotuning, loader fill)
    sps = sorted(r["samples_per_s"] for r in steady)
    result["summary"] = {"model": z["model"], "micro_batch": z["micro"], "prototypes": z["micro"],
                         "kl_backend": TRAINER_KL, "checkpointing": TRAINER_CHECKPOINTING,
                         "records": len(recs), "last_step": last.get("step"),
                         "samples_per_s_median": sps[len(sps) // 2], "mfu_last": last.get("mfu"),
                         "tflops_per_device_last": last.get("tflops_per_device"), "loss_last": last.get("loss")}
    if (last.get("step") or 0) < z["steps"]:
        return f"stopped at step {last.get('step')} < {z['steps']}"
    return None


# ----------------------------------------------------------------------------- part: kl_speed
def kl_speed_backends(ctx: Context) -> List[str]:
    if ctx.cpu:
        return ["streaming", "reference"]
    return [b for b in KL_SPEED_BACKENDS if b != "cuda" or ctx.cuda_built]


def kl_speed_commands(ctx: Context):
    out = ctx.path("kl_speed.json")
    if ctx.cpu:
        return [[ctx.py, KL_BENCH, "--device", "cpu", "--threads", "1", "--grid", "64,128,16", "--backends",
                 ",".join(kl_speed_backends(ctx)), "--repeat", "1", "--json", out, "--case-timeout-s", "300"]]
    P, M, D = KL_SPEED_SHAPE
    return [[ctx.py, KL_BENCH, "--device", "cuda", "--dtype", "bfloat16", "--grid", f"{P},{M},{D}",
             "--backends", ",".join(kl_speed_backends(ctx)), "--repeat", "5", "--json", out,
             "--case-timeout-s", "45"]]


def kl_speed_rows(ctx: Context):
    return [RowSource(ctx.path("kl_speed.json"), fmt="json")]


def kl_speed_check(ctx: Context, result: dict) -> Optional[str]:
    rows = read_json_rows(ctx.path("kl_speed.json"))
    ok = [r for r in rows if "time_s" in r and "error" not in r and not r.get("oom")]
    ctx.kl_ranking = [r["backend"] for r in sorted(ok, key=lambda r: r["time_s"]) if r["backend"] != "reference"]
    result["summary"] = {r["backend"]: r.get("time_s", r.get("error", "OOM")) for r in rows}
    bad = [f"{r['backend']}: {r.get('error', 'OOM')}" for r in rows if r not in ok]
    if not ok:
        return "no backend measured"
    return f"not measured: {bad}" if bad else None


# ----------------------------------------------------------------------------- part: step
def step_kl(ctx: Context) -> List[str]:
    if ctx.cpu:
        return ["streaming"]
    ranked = [b for b in ctx.kl_ranking if b != "cuda" or ctx.cuda_built]
    return ranked[:2] or [b for b in STEP_KL_DEFAULT]


def step_commands(ctx: Context):
    out, rows = ctx.path("bench_step.json"), ctx.path("bench_step.jsonl")
    if ctx.cpu:
        return [[ctx.py, "benchmarks/bench_step.py", "--model", "tiny", "--device", "cpu", "--steps", "1",
                 "--warmup", "1", "--attn", "sdpa", "--kl", ",".join(step_kl(ctx)), "--rows", rows, "--out", out]]
    return [[ctx.py, "benchmarks/bench_step.py", "--model", "vit_b16", "--attn", "flash", "--kl",
             ",".join(step_kl(ctx)), "--steps", "8", "--warmup", "3", "--rows", rows, "--out", out]]


def step_rows(ctx: Context):
    return [RowSource(ctx.path("bench_step.jsonl"))]


def step_check(ctx: Context, result: dict) -> Optional[str]:
    rows = read_jsonl(ctx.path("bench_step.jsonl"))
    if not rows:
        return "no bench_step rows"
    bad = [f"{r.get('attention')}/{r.get('kl')}: {r.get('status')} {r.get('error', '')}".strip()
           for r in rows if r.get("status") != "ok"]
    return f"rows not ok: {bad}" if bad else None


# ----------------------------------------------------------------------------- part: kl_check
def kl_check_backends(ctx: Context) -> List[str]:
    return ["triton", "hybrid"] + (["cuda"] if ctx.cuda_built else []) + ["streaming", "streaming_chunked"]


def kl_check_commands(ctx: Context):
    if ctx.cpu:  # the CLI the suite relies on; the checks themselves need a GPU
        return [[ctx.py, KL_SCRIPT, "--out", ctx.path("kl_check"), "--dry-run", "--kinds", "selfcheck,large",
                 "--backends", ",".join(kl_check_backends(ctx))]]
    return [[ctx.py, KL_SCRIPT, "--out", ctx.path("kl_check"), "--kinds", "selfcheck,large", "--backends",
             ",".join(kl_check_backends(ctx)), "--time-budget-s", str(int(max(ctx.part_limit_s - 10, 1)))]]


def kl_check_rows(ctx: Context):
    return [RowSource(ctx.path("kl_check", "gpu_kl_check.json"), fmt="json", key="parts",
                      keep=lambda r: r.get("status") != "planned")]


# ----------------------------------------------------------------------------- part: attention
def attention_commands(ctx: Context):
    out = ctx.path("attention.json")
    if ctx.cpu:
        return [[ctx.py, "benchmarks/bench_attention.py", "--device", "cpu", "--batch", "2", "--seq", "17",
                 "--heads", "2", "--head-dim", "16", "--repeat", "1", "--backends", "math,sdpa", "--out", out]]
    return [[ctx.py, "benchmarks/bench_attention.py", "--repeat", "10", "--out", out]]


def attention_rows(ctx: Context):
    return [RowSource(ctx.path("attention.json"), fmt="json", key="rows")]


def attention_check(ctx: Context, result: dict) -> Optional[str]:
    return None if read_json_rows(ctx.path("attention.json"), "rows") else "no attention.json"


PARTS = [
    Part("env", 35, "offline wheel install; torch/CUDA/device/memory; every needed module imports",
         env_commands, env_check, columns=("device", "memory_gib", "capability", "torch", "cuda", "deepspeed",
                                           "shm_free_bytes", "wheels_ok")),
    Part("build", 110, "the fused CUDA extension's JIT build (python -m rils_scale.ops.build_kernels), once",
         build_commands, build_check, columns=("built", "build_s", "archs", "timed_out")),
    Part("trainer", 150, f"deepspeed launchers/pretrain.py, ZeRO-3, vit_b16, {TRAINER_STEPS} steps, micro-batch = G "
         f"from the device's memory, KL {TRAINER_KL}: samples/s, MFU", trainer_commands, trainer_check, trainer_rows,
         columns=("step", "samples_per_s", "step_time_s", "mfu", "tflops_per_device", "peak_mem_gb", "data_wait_s",
                  "loss")),
    Part("kl_speed", 90, f"{KL_BENCH} at P, M, D = {KL_SPEED_SHAPE}, bf16, both gradients, backends named",
         kl_speed_commands, kl_speed_check, kl_speed_rows,
         columns=("backend", "P", "M", "D", "time_s", "executed_tflops", "model_tflops", "mm_tflops", "peak_bytes",
                  "error")),
    Part("step", 75, "bench_step.py: B/16 step, bf16 weights + fp32 master, G = 32,768, the two fastest KL backends",
         step_commands, step_check, step_rows,
         columns=("model", "attention", "kl", "micro_batch", "prototypes", "status", "step_s", "samples_per_s", "mfu",
                  "tflops", "executed_tflops", "peak_mem_gb", "error")),
    Part("kl_check", 40, f"{KL_SCRIPT} --kinds selfcheck,large: KL correctness vs float64 (what time is left)",
         kl_check_commands, None, kl_check_rows, columns=("kind", "backend", "status", "seconds", "detail")),
    Part("attention", 25, "bench_attention.py: SDPA kernels vs flash-attn vs math, B/16 shapes",
         attention_commands, attention_check, attention_rows,
         columns=("seq", "backend", "status", "fwd_ms", "fwd_bwd_ms", "tflops", "grad_err")),
]
PARTS_BY_NAME = {p.name: p for p in PARTS}


def total_budget_s(parts: Sequence[Part] = PARTS) -> int:
    return sum(p.budget_s for p in parts) + REPORT_SLACK_S


# ----------------------------------------------------------------------------- rows: files -> OUT/rows.jsonl
def append_rows(path: str, rows: List[dict]) -> None:
    """Append JSON lines in one write, flushed and synced (a killed suite keeps every line written)."""
    if not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(json.dumps(r, default=str) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str) -> List[dict]:
    rows = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                if isinstance(r, dict):
                    rows.append(r)
    except OSError:
        pass
    return rows


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_json_rows(path: str, key: Optional[str] = None) -> List[dict]:
    data = _read_json(path)
    if isinstance(data, dict):
        data = data.get(key) if key else None
    return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []


class RowMirror:
    """Copies the rows of a part's :class:`RowSource` files into ``OUT/rows.jsonl`` while the part runs
    (a thread, every ``interval_s``) and once more at the end, each row once, tagged with the part."""

    def __init__(self, rows_path: str, part: str, sources: List[RowSource], on_new=None, interval_s: float = 0.5):
        self.rows_path, self.part, self.sources = rows_path, part, sources
        self.on_new, self.interval_s = on_new, interval_s
        self.offsets: Dict[str, int] = {}
        self.done: Dict[str, set] = {}
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._lock = threading.Lock()

    def _new_rows(self, src: RowSource) -> List[dict]:
        if src.fmt == "jsonl":
            try:
                with open(src.path, "rb") as f:
                    f.seek(self.offsets.get(src.path, 0))
                    data = f.read()
            except OSError:
                return []
            complete = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
            self.offsets[src.path] = self.offsets.get(src.path, 0) + len(complete)
            rows = []
            for line in complete.decode(errors="replace").splitlines():
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                rows.append(r if isinstance(r, dict) else {"value": r})
            return rows
        done = self.done.setdefault(src.path, set())
        rows = []
        for i, r in enumerate(read_json_rows(src.path, src.key)):
            if i not in done and (src.keep is None or src.keep(r)):
                done.add(i)
                rows.append(r)
        return rows

    def poll(self) -> int:
        with self._lock:
            new = []
            for src in self.sources:
                new += [{"part": self.part, "source": os.path.basename(src.path), **r} for r in self._new_rows(src)]
            append_rows(self.rows_path, new)
            self.count += len(new)
        if new and self.on_new:
            self.on_new()
        return len(new)

    def _loop(self):
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - the mirror must not die; the final poll retries
                print(f"gpu_suite: row mirror: {type(exc).__name__}: {exc}", file=sys.stderr)

    def __enter__(self):
        if self.sources:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.poll()
        return False


# ----------------------------------------------------------------------------- running
def part_env(ctx: Context) -> dict:
    """Children import rils_scale from the repository and the carried wheels from the site dir."""
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    paths = ([ctx.site] if ctx.installed else []) + [REPO] + inherited
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


def run_command(cmd: List[str], env: dict, timeout_s: float, log_path: str) -> dict:
    """Run in its own process group with its output streaming into ``log_path``; at the limit the
    whole group is killed (deepspeed's launcher leaves children otherwise)."""
    t0 = time.time()
    start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=max(timeout_s, 1)), False
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            rc, timed_out = None, True
    with open(log_path, "rb") as f:
        f.seek(max(start, os.path.getsize(log_path) - (256 << 10)))
        output = f.read().decode(errors="replace")
    return {"cmd": cmd, "rc": rc, "timed_out": timed_out, "seconds": round(time.time() - t0, 1), "output": output}


def run_part(part: Part, ctx: Context, limit_s: float, on_rows=None) -> dict:
    t0 = time.time()
    log_path = os.path.join(ctx.out, LOG)
    ctx.part_limit_s = limit_s
    result = {"part": part.name, "budget_s": part.budget_s, "limit_s": round(limit_s, 1), "status": "PASS",
              "reason": "", "commands": []}
    try:
        commands = part.commands(ctx)
        sources = part.rows(ctx) if part.rows else []
    except Exception as exc:  # noqa: BLE001
        commands, sources = [], []
        result["status"], result["reason"] = "FAIL", f"could not build commands: {type(exc).__name__}: {exc}"
    outputs = []
    with RowMirror(os.path.join(ctx.out, ROWS), part.name, sources, on_new=on_rows) as mirror:
        for cmd in commands:
            missing = [c for c in cmd[1:2] if c.endswith(".py") and not os.path.exists(os.path.join(REPO, c))]
            if missing:
                result.update(status="FAIL", reason=f"{missing[0]} is not in this tree")
                break
            left = limit_s - (time.time() - t0)
            if left <= 1:
                result.update(status="FAIL", reason=f"time limit {limit_s:.0f}s spent before {_short(cmd)}")
                break
            with open(log_path, "a") as f:
                f.write(f"\n===== {part.name}: {_short(cmd)}  (limit {left:.0f} s)\n")
            r = run_command(cmd, part_env(ctx), left, log_path)
            with open(log_path, "a") as f:
                f.write(f"\n===== {part.name}: rc {r['rc']}{' (killed at the limit)' if r['timed_out'] else ''}, "
                        f"{r['seconds']} s\n")
            outputs.append(r["output"])
            result["commands"].append({"cmd": _short(cmd), "rc": r["rc"], "seconds": r["seconds"]})
            if r["timed_out"]:
                result.update(status="FAIL", reason=f"killed at the part's time limit {limit_s:.0f}s: {_short(cmd)}")
                break
            if r["rc"] != 0:
                tail = r["output"].strip().splitlines()[-1:] or [""]
                result.update(status="FAIL", reason=f"exit {r['rc']}: {_short(cmd)}: {tail[0][:300]}")
                break
    result["rows"] = mirror.count
    result["output"] = "\n".join(outputs)
    result["seconds_so_far"] = round(time.time() - t0, 1)
    if part.check is not None:  # also after a failure: the check records what was measured
        try:
            why = part.check(ctx, result)
        except Exception as exc:  # noqa: BLE001 - a broken output is a failed part
            why = f"could not read its outputs: {type(exc).__name__}: {exc}"
        if why and result["status"] == "PASS":
            result.update(status="FAIL", reason=why)
    for k in ("output", "seconds_so_far"):
        result.pop(k)
    result["seconds"] = round(time.time() - t0, 1)
    return result


def _short(cmd: List[str], limit: Optional[int] = 300) -> str:
    parts = ["python" if c == sys.executable else ("<script>" if "\n" in c else c) for c in cmd]
    return " ".join(parts)[:limit]


def run_suite(ctx: Context, parts: Sequence[Part], header: dict, limit_s: float = COMMAND_LIMIT_S) -> List[dict]:
    """Run ``parts`` in order inside ``limit_s`` (less the report's slack): each gets its budget plus
    what earlier parts left unused, capped by the time left; the report follows every change."""
    deadline = time.monotonic() + limit_s - REPORT_SLACK_S
    state = {**header, "planned": [{"part": p.name, "budget_s": p.budget_s} for p in parts], "parts": ctx.results}
    lock = threading.Lock()

    def save(running: Optional[str] = None):
        with lock:
            state["running"] = running
            write_json_atomic(os.path.join(ctx.out, REPORT_JSON), state)
            write_report(ctx.out)

    bank = 0.0
    for part in parts:
        left = deadline - time.monotonic()
        limit = min(part.budget_s + bank, left)
        if limit < MIN_PART_S:
            result = {"part": part.name, "budget_s": part.budget_s, "limit_s": round(max(limit, 0), 1),
                      "status": "SKIPPED", "reason": f"{max(left, 0):.0f} s left of the command's {limit_s:.0f} s",
                      "commands": [], "seconds": 0.0, "rows": 0}
        else:
            save(running=part.name)
            result = run_part(part, ctx, limit, on_rows=lambda: save(running=part.name))
            bank = max(0.0, limit - result["seconds"])
        ctx.results.append(result)
        ctx.emit(part.name, {"kind": "part_result",
                             **{k: result[k] for k in ("status", "seconds", "limit_s", "reason")}})
        if part.name == "env" and ctx.env_info:
            state["device"] = device_line(ctx.env_info)
        print(f"{result['status']} {part.name} ({result['seconds']} s of {result['limit_s']}, {result['rows']} rows)"
              f"{': ' + result['reason'] if result['reason'] else ''}", flush=True)
        save()
    return ctx.results


def device_line(info: dict) -> str:
    return (f"device {info.get('device', 'none')} (sm {info.get('capability', '-')}, {info.get('memory_gib', '-')} "
            f"GiB), torch {info.get('torch')}, CUDA {info.get('cuda')}, Python {info.get('python')}, "
            f"deepspeed {info.get('deepspeed', '-')}")


# ----------------------------------------------------------------------------- the report
def write_json_atomic(path: str, data) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        v = json.dumps(v, default=str)
    return str(v).replace("|", "/").replace("\n", " ")[:200]


def _table(rows: List[dict], columns: Sequence[str]) -> List[str]:
    cols = [c for c in columns if any(c in r for r in rows)]
    if not cols:  # no known column: every scalar field, in first-seen order
        for r in rows:
            cols += [k for k, v in r.items() if k not in cols and k not in ("part", "source")
                     and not isinstance(v, (dict, list))]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return lines


def headline(rows_by_part: Dict[str, List[dict]], state: dict) -> List[str]:
    lines = []
    tr = [r for r in rows_by_part.get("trainer", []) if "samples_per_s" in r]
    summary = next((p.get("summary") for p in state.get("parts", []) if p.get("part") == "trainer"), None) or {}
    if tr:
        steady = tr[1:] or tr
        sps = sorted(r["samples_per_s"] for r in steady)
        last = tr[-1]
        lines.append(f"- **trainer** ({summary.get('model', '?')}, micro-batch = G = "
                     f"{summary.get('micro_batch', '?')}, "
                     f"KL {summary.get('kl_backend', '?')}, checkpointing {summary.get('checkpointing', '?')}): "
                     f"{_fmt(sps[len(sps) // 2])} samples/s (median of {len(steady)} windows after the first), "
                     f"MFU {_fmt(last.get('mfu'))}, {_fmt(last.get('tflops_per_device'))} TFLOP/s per device, "
                     f"peak {_fmt(last.get('peak_mem_gb'))} GiB, step {last.get('step')}")
    kl = [r for r in rows_by_part.get("kl_speed", []) if "time_s" in r]
    if kl:
        lines.append("- **KL speed** (P, M, D = " + ", ".join(str(kl[0].get(k)) for k in "PMD") + "): " + "; ".join(
            f"{r['backend']} {_fmt(r['time_s'])} s" + (f" ({_fmt(100 * r['executed_tflops'] / r['mm_tflops'])} % of "
                                                        "the bf16 mm rate)" if r.get("mm_tflops") else "")
            for r in sorted(kl, key=lambda r: r["time_s"])))
    st = [r for r in rows_by_part.get("step", []) if r.get("status") == "ok"]
    if st:
        best = max(st, key=lambda r: r.get("samples_per_s") or 0)
        lines.append(f"- **step** (bench_step {best.get('model')}, B {best.get('micro_batch')}, "
                     f"G {best.get('prototypes')}): "
                     f"best {best.get('attention')}/{best.get('kl')} {_fmt(best.get('samples_per_s'))} samples/s, "
                     f"MFU {_fmt(best.get('mfu'))}")
    return lines


def render_report(state: dict, rows: List[dict], parts_meta: Dict[str, Part] = None) -> str:
    parts_meta = PARTS_BY_NAME if parts_meta is None else parts_meta
    measured = [r for r in rows if r.get("kind") != "part_result"]
    by_part: Dict[str, List[dict]] = {}
    for r in measured:
        by_part.setdefault(r.get("part", "?"), []).append(r)
    lines = [f"# GPU suite {state.get('date', '')}", "",
             f"mode: {state.get('mode', '?')}; {state.get('device', 'device not reported')}", "",
             f"Every row below is also in `{ROWS}` (full precision, one JSON object a line, tagged with its part).", ""]
    head = headline(by_part, state)
    if head:
        lines += ["## Headline", ""] + head + [""]
    lines += ["## Parts", "", "| part | status | seconds | limit s | budget s | rows | reason |",
              "|---|---|---:|---:|---:|---:|---|"]
    done = {p["part"]: p for p in state.get("parts", [])}
    for plan in state.get("planned", [{"part": p} for p in by_part]):
        name = plan["part"]
        p = done.get(name)
        if p is None:
            status = "RUNNING (or killed)" if state.get("running") == name else "not reached"
            lines.append(f"| {name} | {status} | | | {plan.get('budget_s', '')} | {len(by_part.get(name, []))} | |")
        else:
            lines.append(f"| {name} | {p['status']} | {p.get('seconds', '')} | {p.get('limit_s', '')} "
                         f"| {p['budget_s']} "
                         f"| {len(by_part.get(name, []))} | {_fmt(p.get('reason', ''))} |")
    planned = [p["part"] for p in state.get("planned", [])]
    order = planned + sorted(set(by_part) - set(planned))
    for name in order:
        if by_part.get(name):
            meta = parts_meta.get(name)
            lines += ["", f"## {name} ({len(by_part[name])} rows)", ""]
            lines += _table(by_part[name], meta.columns if meta else ())
    return "\n".join(lines) + "\n"


def write_report(out: str, parts_meta: Dict[str, Part] = None) -> str:
    """``OUT/gpu_suite.md`` from whatever ``OUT/gpu_suite.json`` and ``OUT/rows.jsonl`` hold."""
    state = _read_json(os.path.join(out, REPORT_JSON)) or {}
    text = render_report(state, read_jsonl(os.path.join(out, ROWS)), parts_meta)
    path = os.path.join(out, REPORT_MD)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


def bundle_outputs(ctx: Context, max_bytes: int = 2 << 20) -> None:
    """The parts' own small outputs (JSON, markdown, logs, metrics) as one tarball."""
    path = os.path.join(ctx.out, BUNDLE)
    with tarfile.open(path, "w:gz") as tar:
        for root, dirs, files in os.walk(ctx.work):
            dirs[:] = [d for d in dirs if d not in ("shapes", "checkpoints", "site")]
            for f in files:
                full = os.path.join(root, f)
                small = os.path.getsize(full) <= max_bytes
                if f.endswith((".json", ".jsonl", ".md", ".log", ".txt", ".csv")) and small:
                    tar.add(full, arcname=os.path.relpath(full, ctx.work))


# ----------------------------------------------------------------------------- plan (dry run)
def plan(ctx: Context, names: List[str]) -> dict:
    """Budgets with their latest start and end, and each part's commands on each supported card."""
    wheels = check_wheels(ctx.wheels_dir)
    parts, t = [], 0
    for p in PARTS:
        commands = {}
        for dev, gib in DEVICES.items():
            c = Context(out=ctx.out, work=ctx.work, cpu=False, wheels_dir=ctx.wheels_dir, site=ctx.site,
                        env_info={"memory_gib": gib}, cuda_built=True, kl_ranking=["hybrid", "triton"],
                        part_limit_s=p.budget_s)
            try:
                commands[dev] = [re.sub(r"--master_port \d+", "--master_port PORT", _short(x, None))
                                 for x in p.commands(c)]
            except Exception as exc:  # noqa: BLE001
                commands[dev] = [f"cannot build: {exc}"]
        selected = p.name in names
        parts.append({"part": p.name, "budget_s": p.budget_s, "starts_by_s": t if selected else None,
                      "ends_by_s": t + p.budget_s if selected else None, "what": p.what, "selected": selected,
                      "commands": commands})
        t += p.budget_s if selected else 0
    total = total_budget_s()
    return {"wheels": wheels, "budget_total_s": total, "command_limit_s": COMMAND_LIMIT_S,
            "budget_ok": total <= COMMAND_LIMIT_S, "report_slack_s": REPORT_SLACK_S,
            "returns": [REPORT_MD, REPORT_JSON, ROWS, LOG, BUNDLE],
            "trainer_micro_batch": {dev: trainer_micro_batch(gib) for dev, gib in DEVICES.items()},
            "parts": parts}


def format_plan(info: dict) -> str:
    lines = [f"{'part':<10} {'budget':>7} {'by':>11}  commands (H100 80GB; H200 141GB where they differ)"]
    for p in info["parts"]:
        when = f"{p['starts_by_s']}-{p['ends_by_s']} s" if p["selected"] else "not run"
        cmds = p["commands"]
        h100, h200 = list(cmds.values())
        lines.append(f"{p['part']:<10} {p['budget_s']:>5} s {when:>11}  " + "\n".join(
            (" " * 33 if i else "") + c for i, c in enumerate(h100)))
        lines += [" " * 27 + "H200: " + c for c, d in zip(h200, h100) if c != d]
    lines.append(f"total {info['budget_total_s']} s (with {info['report_slack_s']} s for the report) of the "
                 f"{info['command_limit_s']} s one command may take: {'fits' if info['budget_ok'] else 'DOES NOT FIT'}")
    lines.append(f"trainer micro-batch (= G): {info['trainer_micro_batch']}")
    lines.append(f"returns under --out: {', '.join(info['returns'])}")
    lines.append(f"wheels in {info['wheels']['dir']}: {'ok' if info['wheels']['ok'] else 'NOT ok'}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_suite_out"), help="results (default: $OUT)")
    p.add_argument("--work", default="", help="scratch for the parts (default: a temporary folder)")
    p.add_argument("--wheels", default=os.path.join(REPO, ".whl"), help="carried wheels (benchmarks/gpu_wheels.sh)")
    p.add_argument("--site", default="", help="where the wheels are installed (default: WORK/site)")
    p.add_argument("--parts", default=",".join(x.name for x in PARTS),
                   help="comma-separated subset, run in suite order (on a GPU, env always runs first)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="plan per device, wheel list and budget only; run nothing")
    mode.add_argument("--cpu-smoke", action="store_true", help="run the parts' CPU-checkable pieces on the CPU")
    mode.add_argument("--report-only", action="store_true",
                      help=f"rebuild OUT/{REPORT_MD} from OUT/{REPORT_JSON} and OUT/{ROWS} (e.g. after a killed run)")
    args = p.parse_args(argv)
    names = [n for n in args.parts.split(",") if n]
    unknown = [n for n in names if n not in PARTS_BY_NAME]
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {[x.name for x in PARTS]}")
    if not (args.cpu_smoke or args.dry_run) and "env" not in names:
        names = ["env"] + names  # the carried wheels are installed there
    args.part_names = names
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_only:
        print(open(write_report(args.out)).read())
        return 0
    work = args.work or ("WORK" if args.dry_run else tempfile.mkdtemp(prefix="gpu_suite_"))
    if not args.dry_run:
        os.makedirs(work, exist_ok=True)
    ctx = Context(out=args.out, work=work, cpu=args.cpu_smoke or args.dry_run, wheels_dir=args.wheels,
                  site=args.site or os.path.join(work, "site"))
    mode = "dry-run" if args.dry_run else ("cpu-smoke" if args.cpu_smoke else "gpu")
    header = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "mode": mode,
              "budget_total_s": total_budget_s(), "command_limit_s": COMMAND_LIMIT_S}
    os.makedirs(args.out, exist_ok=True)
    if args.dry_run:
        info = plan(ctx, args.part_names)
        print(format_plan(info))
        write_json_atomic(os.path.join(args.out, PLAN_JSON), {**header, **info})
        problems = ([] if info["budget_ok"] else [f"budgets sum to {info['budget_total_s']}s > {COMMAND_LIMIT_S}s"])
        problems += [] if info["wheels"]["ok"] else [f"wheels: missing {info['wheels']['missing']}, wrong "
                                                     f"{info['wheels']['wrong_version']}, duplicated "
                                                     f"{info['wheels']['duplicated']} in {args.wheels}"]
        for why in problems:
            print("FAIL", why)
        print("dry run:", "FAIL" if problems else "PASS")
        return 1 if problems else 0

    if any(os.path.exists(os.path.join(args.out, n)) for n in (ROWS, REPORT_JSON)):
        print(f"gpu_suite: {args.out} already holds a suite's results; give an empty --out ($OUT starts empty "
              "on the device)", file=sys.stderr)
        return 2
    parts = [p for p in PARTS if p.name in args.part_names]
    print(f"gpu_suite ({mode}): parts {[p.name for p in parts]}, budget {total_budget_s(parts)} s of "
          f"{COMMAND_LIMIT_S} s; work {work}", flush=True)
    run_suite(ctx, parts, header)
    bundle_outputs(ctx)
    failed = [r["part"] for r in ctx.results if r["status"] != "PASS"]
    with open(os.path.join(args.out, REPORT_MD)) as f:  # the device reply carries the output's end
        print("\n" + f.read())
    print(f"suite: {'FAIL ' + ','.join(failed) if failed else 'PASS'}; report {os.path.join(args.out, REPORT_MD)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
