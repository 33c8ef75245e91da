"""Loader for the fused CUDA extension ``rils_scale_kernels`` (sources in ``kernels/``).

Order: (1) the prebuilt module from ``RILS_BUILD_CUDA_EXT=1 pip install -e .``; (2) a JIT build
with ``torch.utils.cpp_extension.load`` into a cache directory (``$RILS_KERNELS_CACHE`` or torch's
default extensions dir), on first use, for the archs in ``$RILS_CUDA_ARCHS`` (default: the current
device's). Failures are remembered (``load_error()``) so callers can fall back and say why.

``compile_only()`` compiles and links the sources without loading them (the CI check on a
machine with nvcc and a CUDA build of torch, but no GPU).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

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
                import rils_scale_kernels as mod  # prebuilt by setup.py
                _module = mod
            except ImportError as e_pre:
                try:
                    _module = _jit_load()
                except Exception as e:  # noqa: BLE001
                    _error = f"no prebuilt {MODULE_NAME} ({e_pre}); JIT build failed: {type(e).__name__}: {e}"
    if _module is None and raise_on_error:
        raise RuntimeError(f"{BUILD_HELP}\nReason: {_error}")
    return _module


def _jit_load():
    import torch
    from torch.utils.cpp_extension import load, CUDA_HOME
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device for a JIT build")
    if CUDA_HOME is None or shutil.which("ninja") is None:
        raise RuntimeError("JIT build needs CUDA_HOME (nvcc) and ninja")
    major, minor = torch.cuda.get_device_capability()
    archs = _archs_from_env([f"{major}{minor}"])
    build_dir = os.environ.get("RILS_KERNELS_CACHE")
    if build_dir:
        os.makedirs(build_dir, exist_ok=True)
    return load(name=MODULE_NAME, sources=[str(KERNELS_DIR / s) for s in SOURCES],
                extra_cflags=["-O3"], extra_cuda_cflags=NVCC_FLAGS + _gencode(archs),
                build_directory=build_dir, verbose=False)


def compile_only(out_dir: str | os.PathLike | None = None, archs: list[str] | None = None,
                 verbose: bool = False) -> dict:
    """Compile both sources with nvcc / the host compiler and link them into a shared object with
    torch's include and library flags, without importing it. Works without a GPU. Returns a dict with
    the ``.so`` path and the seconds spent per step. Raises ``subprocess.CalledProcessError`` with
    the compiler output on failure."""
    import torch
    from torch.utils import cpp_extension as ce
    home = cuda_home()
    if home is None:
        raise RuntimeError("CUDA toolkit not found: set CUDA_HOME=/usr/local/cuda")
    nvcc = os.path.join(home, "bin", "nvcc")
    archs = archs or _archs_from_env(["90"])
    out = Path(out_dir or tempfile.mkdtemp(prefix="rils_kernels_"))
    out.mkdir(parents=True, exist_ok=True)
    inc = ([f"-I{p}" for p in ce.include_paths(device_type="cpu")] + [f"-I{home}/include"]
           + [f"-I{sysconfig.get_paths()['include']}"])
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    defs = [f"-DTORCH_EXTENSION_NAME={MODULE_NAME}", "-DTORCH_API_INCLUDE_EXTENSION_H", abi]
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
