"""``backend="auto"``: the fastest backend that passed its self-check, per device and shape class.

Shape class: device name, dtype, whether gradients are needed (and for which inputs), and P, M, D
rounded to powers of two. For each new class, every candidate that passed its self-check on this
device (:mod:`.kl_selfcheck`; CUDA backends in a subprocess) is timed on the caller's own inputs
(one warm-up call, then the best of ``_REPEATS``, forward + backward when gradients are needed), and
the fastest is kept: in-process and in a node-local JSON cache (``$RILS_KL_SELECTION_CACHE``,
default ``$TMPDIR/rils_scale_<user>/kl_selection.json``), keyed also by torch version and a hash of
the KL sources, so a changed kernel is re-checked and re-timed. CUDA self-check verdicts are kept
beside it (``kl_selfcheck.json``, keyed by device model, backend, torch, triton and the source hash),
so a new process does not re-run the self-check subprocesses (a time-out is not kept). Candidates: CUDA tensors
``triton``, ``hybrid``, ``cuda``, ``streaming``, ``streaming_chunked``; CPU tensors
``streaming``, ``streaming_chunked``. ``deterministic=True`` keeps every candidate: none of them
uses atomics or a run-dependent reduction order.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import math
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

__all__ = ["select_backend", "candidates", "shape_class", "cache_path", "backend_ok", "clear",
           "verdict_cache_path", "verdict_key"]

CPU_CANDIDATES = ("streaming", "streaming_chunked")
CUDA_CANDIDATES = ("triton", "hybrid", "cuda", "streaming", "streaming_chunked")
_REPEATS = 2

_lock = threading.RLock()
_selected: dict[str, str] = {}              # shape-class key -> backend
_checked: dict[tuple[str, str], tuple[bool, str]] = {}   # (device key, backend) -> (ok, reason)
_warned: set[str] = set()


def clear() -> None:
    """Forget in-process selections and self-check results (tests)."""
    with _lock:
        _selected.clear()
        _checked.clear()


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << math.ceil(math.log2(n))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_name(idx)
    return f"cpu{torch.get_num_threads()}t"


def _source_hash() -> str:
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for p in sorted(here.glob("kl_*.py")) + sorted((here.parents[1] / "kernels").glob("*")):
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


_SRC_HASH = None


def shape_class(student, prototypes, need_s: bool, need_t: bool) -> str:
    global _SRC_HASH
    _SRC_HASH = _SRC_HASH or _source_hash()
    P, D = student.shape
    M = prototypes.shape[0]
    grads = ("s" if need_s else "") + ("t" if need_t else "") or "none"
    return (f"{device_name(student.device)}|{str(student.dtype).removeprefix('torch.')}|grad={grads}|"
            f"P{_pow2(P)}|M{_pow2(M)}|D{_pow2(D)}|torch{torch.__version__}|src{_SRC_HASH}")


def cache_path() -> Path:
    env = os.environ.get("RILS_KL_SELECTION_CACHE")
    if env:
        return Path(env)
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001
        user = str(os.getuid())
    return Path(tempfile.gettempdir()) / f"rils_scale_{user}" / "kl_selection.json"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _read_cache() -> dict:
    return _read_json(cache_path())


def _write_cache(key: str, entry: dict) -> None:
    _write_json_entry(cache_path(), key, entry)


def _write_json_entry(path: Path, key: str, entry: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_json(path)
        data[key] = entry
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)        # atomic: ranks of one node may write concurrently
    except OSError as e:
        warnings.warn(f"patch_sentence_kl: could not write the cache {path}: {e}",
                      RuntimeWarning, stacklevel=3)


def candidates(device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    if device.type == "cuda" and dtype != torch.float64:
        return CUDA_CANDIDATES
    return CPU_CANDIDATES


def _run_check(backend: str, device: torch.device) -> tuple[bool, str]:
    """CUDA: the self-check in a subprocess; CPU: in-process (pure PyTorch cannot poison a context)."""
    from . import kl_selfcheck
    if device.type == "cuda":
        from .kl_backends import backend_available
        ok, why = backend_available(backend, device)
        if not ok:
            return False, why
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return kl_selfcheck.selfcheck_in_subprocess(backend, f"cuda:{idx}")
    return kl_selfcheck.check_backend(backend, device, quick=True)


def verdict_cache_path() -> Path:
    """Node-local file of CUDA self-check verdicts, beside the selection cache."""
    return cache_path().with_name("kl_selfcheck.json")


def verdict_key(backend: str, device: torch.device) -> str:
    """What a self-check verdict depends on: device model, backend, torch, triton and the KL sources
    (the selection cache's key without the shape: the self-check runs its own fixed cases)."""
    global _SRC_HASH
    _SRC_HASH = _SRC_HASH or _source_hash()
    try:
        from importlib.metadata import version
        triton = version("triton")
    except Exception:  # noqa: BLE001 - no triton: the Triton backends fail their check anyway
        triton = "none"
    return f"{device_name(device)}|{backend}|torch{torch.__version__}|triton{triton}|src{_SRC_HASH}"


def _cacheable(reason: str) -> bool:
    """A verdict of the check itself (pass, wrong numbers, a crash), not a circumstance that can
    change without the key changing (not built yet, a time-out while the node was busy)."""
    return not any(w in reason for w in ("timed out", "unavailable", "not importable", "TRITON_INTERPRET",
                                         "need CUDA"))


def backend_ok(backend: str, device: torch.device) -> tuple[bool, str]:
    """``(passed, reason)`` of ``backend``'s self-check on ``device``: run once per process, and for
    CUDA (a subprocess of up to a minute per backend) once per node and :func:`verdict_key`: the
    verdict is kept in :func:`verdict_cache_path` and read back by later processes."""
    key = (device_name(device) + f"#{device.index}", backend)
    with _lock:
        if key in _checked:
            return _checked[key]
        disk_key = verdict_key(backend, device) if device.type == "cuda" else None
        entry = _read_json(verdict_cache_path()).get(disk_key) if disk_key else None
        if isinstance(entry, dict) and isinstance(entry.get("ok"), bool):
            _checked[key] = (entry["ok"], f"{entry.get('reason', '')} (self-check of {entry.get('date', '?')}, "
                                          f"cached in {verdict_cache_path()})")
            return _checked[key]
        ok, why = _run_check(backend, device)
        _checked[key] = (ok, why)
        if disk_key and _cacheable(why):
            _write_json_entry(verdict_cache_path(), disk_key,
                              {"ok": ok, "reason": why, "date": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return _checked[key]


def _time_backend(backend: str, student, teacher, prototypes, need_s, need_t, student_temp, teacher_temp) -> float:
    """Best-of-``_REPEATS`` seconds of one forward (+ backward) of ``backend`` on copies of the inputs."""
    from .kl_backends import backend_function
    fn = backend_function(backend)
    dev = student.device
    s = student.detach().clone().requires_grad_(need_s)
    T = prototypes.detach().clone().requires_grad_(need_t)
    t = teacher.detach()

    def once():
        with torch.enable_grad() if (need_s or need_t) else torch.no_grad():
            loss = fn(s, t, T, student_temp=student_temp, teacher_temp=teacher_temp)
            if need_s or need_t:
                loss.sum().backward()
        s.grad = T.grad = None
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    once()   # warm-up: JIT compilation, autotuning, allocator
    best = math.inf
    for _ in range(_REPEATS):
        t0 = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t0)
    return best


def select_backend(student, teacher, prototypes, *, student_temp: float, teacher_temp: float,
                   need_s: bool, need_t: bool) -> str:
    """Name of the backend ``auto`` uses for these inputs (see the module docstring)."""
    key = shape_class(student, prototypes, need_s, need_t)
    with _lock:
        if key in _selected:
            return _selected[key]
        entry = _read_cache().get(key)
        cands = candidates(student.device, student.dtype)
        if entry and entry.get("backend") in cands:
            _selected[key] = entry["backend"]
            return entry["backend"]
        timings, failed = {}, {}
        for be in cands:
            ok, why = backend_ok(be, student.device)
            if not ok:
                failed[be] = why
                continue
            try:
                with torch.autocast(student.device.type, enabled=False):
                    timings[be] = _time_backend(be, student, teacher, prototypes, need_s, need_t,
                                                student_temp, teacher_temp)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory at this shape
                failed[be] = f"{be} failed at this shape: {type(e).__name__}: {e}"
        if not timings:
            raise RuntimeError(f"patch_sentence_kl: no backend passed its self-check: {failed}")
        best = min(timings, key=timings.get)
        if student.device.type == "cuda" and failed:
            msg = "; ".join(failed.values())
            if msg not in _warned:
                _warned.add(msg)
                warnings.warn(f"patch_sentence_kl auto: not considered: {msg}", RuntimeWarning, stacklevel=3)
        _selected[key] = best
        _write_cache(key, {"backend": best, "seconds": timings, "failed": failed,
                           "date": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return best
