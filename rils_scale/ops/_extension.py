"""Loader and builder of the fused CUDA extension ``rils_scale_kernels`` (sources in ``kernels/``).

Order: (1) the prebuilt module from ``RILS_BUILD_CUDA_EXT=1 pip install -e .``, used only when its
build stamp matches: ``source_hash`` (of the files in ``kernels/``) equal to this tree's, and
``cuda_archs`` containing a binary for the device (same major, minor <= the device's); a stale or
wrong-arch module is refused with the reason. (2) A JIT build with ``torch.utils.cpp_extension.load``
into a node-local cache directory keyed by GPU arch, torch, CUDA, Python and source hash
(``$RILS_KERNELS_CACHE/<key>``, default ``$TMPDIR/rils_scale_<user>/kernels/<key>``), after
:func:`check_toolchain` has confirmed nvcc, the CUDA headers, a host compiler and ninja (a clear
message instead of a minute-long build that fails). Failures are remembered (``load_error()``).
``python -m rils_scale.ops.build_kernels`` runs (2) ahead of time, once per node (Slurm launcher).
A build killed midway cannot block later loads: :mod:`.build_lock` serialises the project's builds
of a directory and removes the lock file such a build leaves (torch <= 2.11 waits on it forever).

``compile_only()`` compiles and links the sources without loading them (the CI check on a
machine with nvcc and a CUDA build of torch, but no GPU).
"""
from __future__ import annotations

import os
import getpass
import hashlib
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

from .build_lock import build_lock

KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"
SOURCES = ("patch_sentence_kl.cpp", "patch_sentence_kl_kernel.cu")
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]
CXX_STD = "-std=c++20"  # torch >= 2.10 headers need C++20 (older ones accept it too)
MODULE_NAME = "rils_scale_kernels"

BUILD_HELP = ("The fused patch_sentence_kl CUDA extension is not available. Build it with\n"
              "    RILS_BUILD_CUDA_EXT=1 CUDA_HOME=/usr/local/cuda RILS_CUDA_ARCHS='80;90' pip install -e .\n"
              "or let it JIT-compile on first use (needs nvcc, ninja and CUDA_HOME; sources in kernels/). "
              "Otherwise use backend='streaming'. See docs/kernels.md.")

_lock = threading.Lock()
_module = None
_error: str | None = None
_tried = False


def _gencode(archs: list[str]) -> list[str]:
    out = []
    for a in archs:
        a = a.replace(".", "").strip()
        if a:
            out += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return out


def _archs_from_env(default: list[str]) -> list[str]:
    env = os.environ.get("RILS_CUDA_ARCHS")
    return [a for a in env.replace(",", ";").split(";") if a.strip()] if env else default


def cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, torch's guess, or /usr/local/cuda -- the first
    that has both bin/nvcc and include/cuda_runtime.h (torch may guess /usr/local from a
    /usr/local/bin/nvcc wrapper script, which has no headers next to it)."""
    from torch.utils import cpp_extension as ce
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), ce.CUDA_HOME, "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and \
                os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def source_hash() -> str:
    """sha256 (16 hex digits) of the kernel sources: the build stamp a prebuilt module must carry."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode())
        h.update((KERNELS_DIR / name).read_bytes())
    return h.hexdigest()[:16]


def stamp_defines(archs: list[str]) -> list[tuple[str, str]]:
    """Preprocessor defines that stamp a build with the source hash and its target archs, as bare
    tokens (``80_90``) that the C++ side stringifies: no quoting through shells or ninja."""
    return [("RILS_SOURCE_HASH", source_hash()),
            ("RILS_CUDA_ARCHS", "_".join(a.replace(".", "").strip() for a in archs if a.strip()))]


def check_toolchain(jit: bool = True) -> str | None:
    """None when a build can start, else what is missing (checked before any compiler runs)."""
    import torch
    if torch.version.cuda is None:
        return "torch is a CPU-only build (torch.version.cuda is None)"
    home = cuda_home()
    if home is None:
        return ("no CUDA toolkit: nvcc and cuda_runtime.h not found under $CUDA_HOME, $CUDA_PATH or "
                "/usr/local/cuda (install the CUDA toolkit matching torch's CUDA "
                f"{torch.version.cuda}, or set CUDA_HOME)")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return f"no host C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH"
    if jit and shutil.which("ninja") is None:
        return "ninja not found on PATH (pip install ninja): torch's JIT build needs it"
    return None


def arch_ok(stamped: str, major: int, minor: int) -> bool:
    """Whether a module built for ``stamped`` ("80_90") has SASS that runs on sm_<major><minor>."""
    for a in stamped.replace(";", "_").split("_"):
        a = a.strip().rstrip("a")
        if a.isdigit() and int(a) // 10 == major and int(a) % 10 <= minor:
            return True
    return False


def stamp_problem(mod, capability: tuple[int, int] | None) -> str | None:
    """Why a prebuilt module must not be used (None: it may)."""
    got = getattr(mod, "source_hash", None)
    if got != source_hash():
        return f"prebuilt {MODULE_NAME} is stale (source hash {got!r}, tree {source_hash()!r}): rebuild it"
    archs = getattr(mod, "cuda_archs", "")
    if capability is not None and not arch_ok(archs, *capability):
        return f"prebuilt {MODULE_NAME} has no binary for sm_{capability[0]}{capability[1]} (built for {archs!r})"
    return None


def jit_cache_dir(archs: list[str]) -> Path:
    """Node-local JIT build directory, one per (archs, torch, CUDA, Python, sources)."""
    import torch
    key = "-".join(["sm" + "_".join(a.replace(".", "") for a in archs), f"torch{torch.__version__}",
                    f"cu{torch.version.cuda}", f"py{sys.version_info.major}{sys.version_info.minor}", source_hash()])
    key = key.replace("+", "_").replace("/", "_")
    root = os.environ.get("RILS_KERNELS_CACHE")
    if not root:
        try:
            user = getpass.getuser()
        except Exception:  # noqa: BLE001
            user = str(os.getuid())
        root = os.path.join(tempfile.gettempdir(), f"rils_scale_{user}", "kernels")
    return Path(root) / key


def load_error() -> str | None:
    """Why the extension could not be loaded (None if it loaded or was not tried)."""
    return _error


def load_extension(raise_on_error: bool = False):
    """Return the extension module, or None (``raise_on_error``: raise RuntimeError with build help)."""
    global _module, _error, _tried
    with _lock:
        if not _tried:
            _tried = True
            try:
                _module = _load()
            except Exception as e:  # noqa: BLE001
                _error = f"{type(e).__name__}: {e}"
    if _module is None and raise_on_error:
        raise RuntimeError(f"{BUILD_HELP}\nReason: {_error}")
    return _module


def _load():
    import torch
    cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    try:
        import rils_scale_kernels as mod  # prebuilt by setup.py
    except ImportError as e:
        why_prebuilt = f"no prebuilt {MODULE_NAME} ({e})"
    else:
        why_prebuilt = stamp_problem(mod, cap)
        if why_prebuilt is None:
            return mod
    try:
        return jit_build()
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"{why_prebuilt}; JIT build failed: {type(e).__name__}: {e}") from e


def jit_build(archs: list[str] | None = None, verbose: bool = False):
    """JIT-compile (or load from the node-local cache) and import the extension for ``archs``
    (default ``$RILS_CUDA_ARCHS`` or the current device's)."""
    import torch
    from torch.utils.cpp_extension import load
    problem = check_toolchain(jit=True)
    if problem:
        raise RuntimeError(f"cannot build the fused kernel: {problem}")
    if archs is None:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device to take the arch from: set RILS_CUDA_ARCHS (e.g. '90')")
        major, minor = torch.cuda.get_device_capability()
        archs = _archs_from_env([f"{major}{minor}"])
    build_dir = jit_cache_dir(archs)
    build_dir.mkdir(parents=True, exist_ok=True)
    defs = [f"-D{k}={v}" for k, v in stamp_defines(archs)]
    from torch.utils import cpp_extension as ce
    ce.CUDA_HOME = cuda_home()     # torch fixed its guess at import; use the toolkit check_toolchain found
    os.environ.setdefault("CUDA_HOME", ce.CUDA_HOME)
    # torch <= 2.11 waits forever on a `lock` file left by a killed build: build_lock removes it
    with build_lock(build_dir):
        return load(name=MODULE_NAME, sources=[str(KERNELS_DIR / s) for s in SOURCES],
                    extra_cflags=["-O3", CXX_STD, *defs], extra_cuda_cflags=NVCC_FLAGS + [CXX_STD] + _gencode(archs),
                    build_directory=str(build_dir), verbose=verbose)


def compile_only(out_dir: str | os.PathLike | None = None, archs: list[str] | None = None,
                 verbose: bool = False) -> dict:
    """Compile both sources with nvcc / the host compiler and link them into a shared object with
    torch's include and library flags, without importing it. Works without a GPU. Returns a dict with
    the ``.so`` path and the seconds spent per step. Raises ``subprocess.CalledProcessError`` with
    the compiler output on failure."""
    import torch
    from torch.utils import cpp_extension as ce
    problem = check_toolchain(jit=False)
    if problem:
        raise RuntimeError(f"cannot build the fused kernel: {problem}")
    home = cuda_home()
    nvcc = os.path.join(home, "bin", "nvcc")
    archs = archs or _archs_from_env(["90"])
    out = Path(out_dir or tempfile.mkdtemp(prefix="rils_kernels_"))
    out.mkdir(parents=True, exist_ok=True)
    inc = ([f"-I{p}" for p in ce.include_paths(device_type="cpu")] + [f"-I{home}/include"]
           + [f"-I{sysconfig.get_paths()['include']}"])
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    defs = [f"-DTORCH_EXTENSION_NAME={MODULE_NAME}", "-DTORCH_API_INCLUDE_EXTENSION_H", abi] + [
        f"-D{k}={v}" for k, v in stamp_defines(archs)]
    cxx = os.environ.get("CXX", "c++")
    timings = {}

    def start(cmd):
        return cmd, time.perf_counter(), subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(job, step):
        cmd, t0, proc = job
        log, _ = proc.communicate()
        timings[step] = time.perf_counter() - t0
        if verbose or proc.returncode:
            sys.stderr.write(" ".join(cmd) + "\n" + (log if verbose else log[-8000:]))
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, cmd, log, "")

    cpp_o, cu_o = out / "patch_sentence_kl.o", out / "patch_sentence_kl_kernel.cuda.o"
    # The host-side bindings and the device code compile in parallel (each takes ~1 min on one core).
    jobs = [(start([cxx, "-c", str(KERNELS_DIR / SOURCES[0]), "-o", str(cpp_o), "-fPIC", "-O2", CXX_STD,
                    *inc, *defs]), "cxx"),
            (start([nvcc, "-c", str(KERNELS_DIR / SOURCES[1]), "-o", str(cu_o), "-Xcompiler", "-fPIC",
                    "--expt-relaxed-constexpr", CXX_STD, *NVCC_FLAGS, *_gencode(archs), *inc, *defs,
                    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]), "nvcc")]
    try:
        for job, step in jobs:
            finish(job, step)
    finally:
        for (_, _, proc), _ in jobs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    t_link = time.perf_counter()

    def run(cmd, step):
        finish(start(cmd), step)

    so = out / f"{MODULE_NAME}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    libs = [f"-L{p}" for p in ce.library_paths(device_type="cpu")] + [f"-L{home}/lib64", f"-L{home}/lib"]
    run([cxx, "-shared", str(cpp_o), str(cu_o), "-o", str(so), *libs,
         "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python", "-lc10_cuda", "-ltorch_cuda", "-lcudart",
         "-Wl,-O1"], "link")
    timings["total"] = timings["link"] + (t_link - min(j[0][1] for j in jobs))
    return {"so": str(so), "seconds": timings, "archs": archs}
