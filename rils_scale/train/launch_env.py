"""A plain ``python launchers/pretrain.py ...`` is one rank.

``deepspeed`` and ``torchrun`` export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``; without them DeepSpeed's ``init_distributed`` falls back to MPI discovery
and fails with ``No module named 'mpi4py'``. When no launcher (nor ``mpirun`` / ``srun``) left
a trace in the environment, this sets the single-rank values, as OpenCLIP and timm scripts
behave when run directly, and says so.
"""
from __future__ import annotations

import os
import socket
from typing import MutableMapping, Optional

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
