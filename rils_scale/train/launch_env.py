"""The launcher variables DeepSpeed and the trainer read, wherever the ranks came from.

1. ``srun`` started the ranks directly (one task per GPU, no ``deepspeed`` launcher in between):
   DeepSpeed's ``init_distributed`` reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
   and ``MASTER_PORT``; its CPU shared-memory all-reduce and the trainer's thread count read
   ``LOCAL_SIZE`` (ranks on this node). ``srun`` sets ``SLURM_PROCID``, ``SLURM_NTASKS``,
   ``SLURM_LOCALID``, ``SLURM_NODEID`` and ``SLURM_STEP_TASKS_PER_NODE`` instead
   (:func:`adopt_slurm_env`). Variables already set are kept (a launcher that sets them knows
   better); ``MASTER_ADDR`` comes from the batch script (``scontrol show hostnames``: a Slurm node
   list such as ``gpu[001-016]`` is not parsed here).
2. A plain ``python launchers/pretrain.py ...`` is one rank (:func:`ensure_launch_env`):
   ``deepspeed`` and ``torchrun`` export the variables above; without them DeepSpeed's
   ``init_distributed`` falls back to MPI discovery and fails with ``No module named 'mpi4py'``.
   When no launcher (nor ``mpirun`` / ``srun``) left a trace in the environment, the single-rank
   values are set, as OpenCLIP and timm scripts behave when run directly, and a line says so.
"""
from __future__ import annotations

import os
import re
import socket
from typing import Dict, List, MutableMapping, Optional

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Other launchers' own variables: MPI (DeepSpeed discovers those through mpi4py) and Slurm
# (launchers/slurm/pretrain.sbatch maps them). Their presence means "not a plain run".
OTHER_LAUNCHERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_launch_env(environ: Optional[MutableMapping[str, str]] = None) -> Optional[str]:
    """Fill in a single-rank launch environment when there is none; return the line to print
    (None when a launcher set one up). A partial environment is left as it is: that is a
    launcher's (or the user's) business, and DeepSpeed's own error names what is missing."""
    env = os.environ if environ is None else environ
    if any(v in env for v in LAUNCH_VARS + OTHER_LAUNCHERS) or int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return None
    port = _free_port()
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    return (f"[rils_scale] no launcher environment (RANK, WORLD_SIZE, ... unset): running as a single rank "
            f"(127.0.0.1:{port}); for N processes per node use `deepspeed --num_gpus N launchers/pretrain.py ...` "
            "or `torchrun --nproc_per_node N launchers/pretrain.py ...`")


def tasks_per_node(spec: str) -> List[int]:
    """Slurm's compressed task counts, node by node: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts: List[int] = []
    for part in filter(None, spec.split(",")):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise ValueError(f"cannot parse Slurm tasks-per-node {spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def from_slurm(env: MutableMapping[str, str]) -> Dict[str, str]:
    """The DeepSpeed variables ``env`` lacks, derived from Slurm's; {} outside an ``srun`` task."""
    if "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        return {}  # not an srun task (the batch script itself also has SLURM_PROCID=0)
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")),
           "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    spec: Optional[str] = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec:
        counts = tasks_per_node(spec)
        node = int(env.get("SLURM_NODEID", "0"))
        if node < len(counts):
            out["LOCAL_SIZE"] = str(counts[node])
    if "SLURM_JOB_ID" in env:  # one port per job: two jobs on one node must not collide
        out["MASTER_PORT"] = str(20000 + int(env["SLURM_JOB_ID"]) % 20000)
    return {k: v for k, v in out.items() if k not in env}


def adopt_slurm_env(env: Optional[MutableMapping[str, str]] = None) -> Dict[str, str]:
    """Set what :func:`from_slurm` derives in ``env`` (default ``os.environ``); returns it."""
    env = os.environ if env is None else env
    derived = from_slurm(env)
    env.update(derived)
    return derived
