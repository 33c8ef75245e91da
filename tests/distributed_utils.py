"""Helpers for multi-process CPU tests: free ports, spawning gloo ranks, shard gathering.

Workers are module-level functions ``fn(rank, world_size, *args)`` (picklable for spawn).
Each spawned rank joins a gloo group on 127.0.0.1 and uses one intra-op thread, so a
4-rank test on a 2-core machine does not oversubscribe it.
"""
from __future__ import annotations

import os
import socket
from contextlib import closing

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _ephemeral_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, chosen *below* the kernel's ephemeral
    range: a launcher binds it seconds later (tens under load), and an ephemeral port can be
    handed to any other socket meanwhile (gloo's pair listeners, other tests' ``bind(0)``); a
    port outside that range is only taken by someone who names it."""
    import random
    low, _ = _ephemeral_range()
    candidates = random.Random().sample(range(max(1024, low - 12000), low), 64) if low > 2048 else []
    for port in candidates:
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}")
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; re-raises a worker's
    exception (``torch.multiprocessing.ProcessRaisedException`` carries its traceback)."""
    port = find_free_port()
    mp.start_processes(_entry, args=(fn, world_size, port, args), nprocs=world_size, join=True,
                       start_method="spawn")


def zero3_fp32_config(micro_batch: int) -> dict:
    """A DeepSpeed ZeRO-3 config in fp32 (exact comparisons on CPU ranks): AdamW, clipping 1.0,
    no overlap, every parameter partitioned (persistence threshold 0)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 1000000,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-8,
                                                  "weight_decay": 0.05, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_bucket_size": 10000000, "stage3_prefetch_bucket_size": 10000000,
                              "stage3_param_persistence_threshold": 0},
    }
