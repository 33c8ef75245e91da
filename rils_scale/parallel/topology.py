"""Which node a rank runs on, as far as the launcher and the machine tell.

A node is identified by the host name plus the launcher's node index when the launcher
exports one (DeepSpeed's ``CROSS_RANK``, torchrun's ``GROUP_RANK``, Slurm's ``SLURM_NODEID``).
The host name alone tells real nodes apart; the index also separates "nodes" that share one
machine (a test, or a hostfile listing ``localhost`` and ``127.0.0.1``), which then get
separate shared-memory segments, caches and TP groups exactly like separate machines would.
"""
from __future__ import annotations

import os
import socket
from typing import List, Mapping, Optional

NODE_INDEX_VARIABLES = ("CROSS_RANK", "GROUP_RANK", "SLURM_NODEID")
"""Launcher variables holding this rank's node index: DeepSpeed, torchrun, Slurm (srun)."""


def node_identity(env: Optional[Mapping[str, str]] = None, hostname: Optional[str] = None) -> str:
    """``host`` or ``host#index``: equal for exactly the ranks that share a node."""
    env = os.environ if env is None else env
    host = hostname if hostname is not None else socket.gethostname()
    for name in NODE_INDEX_VARIABLES:
        value = env.get(name)
        if value not in (None, ""):
            return f"{host}#{value}"
    return host


def gather_node_identities() -> List[str]:
    """Every rank's :func:`node_identity`, indexed by global rank (one all-gather of short strings)."""
    from . import comm
    return comm.all_gather_objects(node_identity(), comm.world_group())


def describe_nodes(nodes: List[str]) -> str:
    """'2 nodes: a#0 ranks 0-1, b#1 ranks 2-3' (for the start-up log)."""
    from .validate import _rank_ranges
    order = list(dict.fromkeys(nodes))
    parts = [f"{n} ranks {_rank_ranges([r for r, x in enumerate(nodes) if x == n])}" for n in order]
    return f"{len(order)} node{'s' if len(order) != 1 else ''}: " + ", ".join(parts)
