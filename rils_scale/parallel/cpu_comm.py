"""DeepSpeed's CPU communication op (``deepspeed_shm_comm``): where it is built, and its buffers.

On a CPU machine ``deepspeed.init_distributed`` JIT-compiles ``deepspeed_shm_comm`` (a shared
memory all-reduce for ranks on one host) and then every rank creates a 66 MB
``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` and maps every
other rank's. Two problems, handled here:

- **The build** took 43 s to 4 min 48 s between two log lines, on every launch when two Python
  environments shared torch's extension cache (``~/.cache/torch_extensions/py311_cu130``: same
  Python and CUDA, another torch or DeepSpeed, so each one's build replaced the other's).
  :func:`prepare_cpu_comm_build` points ``TORCH_EXTENSIONS_DIR`` (read by torch at build time) at
  a directory keyed by the environment (``sys.prefix``, torch and DeepSpeed versions), so each
  environment builds once; and local rank 0 says what is being built before it starts. An
  explicit ``TORCH_EXTENSIONS_DIR`` wins. (torch 2.14 guards the build with an OS-level
  ``filelock``, which a killed build does not leave held.)
- **The buffers** were never unlinked by DeepSpeed, and a failed launch (a preflight refusal, an
  exception, a signal) kept them: 2 x 66 MB of RAM-backed ``/dev/shm`` per launch.
  ``shm_initialize`` (``deepspeed/ops/csrc/cpu/comm/shm.cpp``) creates this rank's file and then
  opens every peer's by name, once per process; after that only the mappings are used. So
  :func:`release_shm_buffer_once_mapped` waits until every rank has returned from that set-up (a
  barrier) and unlinks this rank's name: the memory lives while some rank maps it and is freed by
  the kernel when the last one exits, on every exit path, SIGKILL included.
"""
from __future__ import annotations

import hashlib
import os
import sys
from typing import Optional

OP_NAME = "deepspeed_shm_comm"


def extensions_dir() -> str:
    """``TORCH_EXTENSIONS_DIR`` for this environment: the user's, else a directory keyed by the
    interpreter prefix and the torch / DeepSpeed versions under torch's default build root."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return explicit
    import deepspeed
    import torch
    from torch.utils.cpp_extension import get_default_build_root
    device = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    prefix = hashlib.sha1(os.path.realpath(sys.prefix).encode()).hexdigest()[:10]
    key = (f"py{sys.version_info.major}{sys.version_info.minor}_{device}_torch{torch.__version__}"
           f"_deepspeed{deepspeed.__version__}_{prefix}").replace("+", "-")
    return os.path.join(get_default_build_root(), "rils_scale", key)


def prepare_cpu_comm_build(announce: bool) -> str:
    """Before ``deepspeed.init_distributed`` on a CPU run: choose the keyed build directory and,
    if ``announce`` (local rank 0), say so when the op must be built first. Returns the
    directory of the op's build."""
    root = extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = root
    build = os.path.join(root, OP_NAME)
    if announce:
        if not os.path.isfile(os.path.join(build, f"{OP_NAME}.so")):
            print(f"[rils_scale] building DeepSpeed's CPU communication op ({OP_NAME}) for this environment in "
                  f"{build}: once per environment, typically 1-5 min; later launches load it", flush=True)
    return build


def shm_buffer_path(rank: Optional[int] = None) -> str:
    """This rank's (or ``rank``'s) DeepSpeed all-reduce buffer, named as ``shm.cpp`` names it."""
    return os.path.join("/dev/shm", "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
        os.environ.get("RANK", "0") if rank is None else rank))


def uses_shm_buffers() -> bool:
    """Whether DeepSpeed's CPU backend set up shared-memory buffers in this process (the same
    answer on every rank: it depends on the build and on LOCAL_SIZE == WORLD_SIZE)."""
    try:  # the module itself: ``deepspeed.comm`` re-exports ``cdb`` as it was at import (None)
        import deepspeed.comm.comm as ds_comm
    except ImportError:
        return False
    backend = getattr(ds_comm, "cdb", None)
    if getattr(backend, "shm_comm_op", None) is None:
        return False
    return os.environ.get("LOCAL_SIZE") is not None and os.environ.get("LOCAL_SIZE") == os.environ.get("WORLD_SIZE")


def release_shm_buffer_once_mapped() -> Optional[str]:
    """After ``deepspeed.init_distributed``: once every rank has mapped every buffer (a barrier over
    the world), unlink this rank's; the path, or None when there is none. Collective when
    :func:`uses_shm_buffers` (all ranks call it)."""
    if not uses_shm_buffers():
        return None
    from . import comm
    try:
        comm.barrier()
    finally:  # a rank that fails here exits; its name must not outlive it either
        removed = release_cpu_shm_buffer()
    return removed


def release_cpu_shm_buffer() -> Optional[str]:
    """Unlink this rank's DeepSpeed CPU shared-memory all-reduce buffer; the path, or None.

    DeepSpeed's CPU backend (``deepspeed/ops/csrc/cpu/comm/shm.cpp``, all ranks on one machine)
    creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``
    (66 MB) per rank and never unlinks it (seen here: 21 GB after a day of test runs, and the
    machine swapping). A mapping outlives the unlink; peers open the name only while DeepSpeed
    sets up, so :func:`release_shm_buffer_once_mapped` calls this
    right after every rank has done so.
    """
    path = shm_buffer_path()
    try:
        os.unlink(path)
    except (FileNotFoundError, PermissionError, NotADirectoryError):
        return None
    return path
