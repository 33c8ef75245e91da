"""Collectives live in rils_scale/parallel/ and put their tensors on the communication device.

gloo accepts CPU tensors, NCCL does not: a CPU run cannot show a host tensor reaching an NCCL
collective. So (1) a source scan fails when any module outside ``parallel/`` calls a
``torch.distributed`` collective, and (2) the callers that run every step are exercised with the
communication device replaced by ``meta``, and a spy on the collectives checks that every tensor
it is handed lives there (a CPU tensor = what NCCL would refuse).
"""
import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from rils_scale.parallel import comm

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor",
               "all_to_all", "all_to_all_single", "gather", "gather_object", "scatter", "send", "recv",
               "isend", "irecv", "monitored_barrier"}


def _collective_calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            base = node.func.value
            name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
            if name in ("dist", "distributed", "torch_dist"):
                yield node.lineno, node.func.attr


def test_no_collective_outside_parallel_package():
    offenders = []
    for path in list((ROOT / "rils_scale").rglob("*.py")) + list((ROOT / "launchers").rglob("*.py")) \
            + list((ROOT / "benchmarks").rglob("*.py")):
        if "parallel" in path.relative_to(ROOT).parts[:2]:
            continue
        offenders += [f"{path.relative_to(ROOT)}:{line} dist.{fn}" for line, fn in _collective_calls(path)]
    assert not offenders, "collectives outside rils_scale/parallel/ (use rils_scale.parallel.comm):\n" \
        + "\n".join(offenders)


def test_scan_sees_a_direct_collective(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch.distributed as dist\ndef f(x):\n    dist.all_reduce(x)\n")
    assert list(_collective_calls(bad)) == [(3, "all_reduce")]


def test_device_for_backend():
    assert comm.device_for_backend("gloo") == torch.device("cpu")
    assert comm.device_for_backend("cpu:gloo,cuda:nccl") == torch.device("cpu")
    if torch.cuda.is_available():
        assert comm.device_for_backend("nccl").type == "cuda"


@pytest.fixture
def nccl_like(monkeypatch):
    """Pretend to be rank 0 of 2 under a backend whose device is ``meta``; record the devices."""
    seen = []

    def spy(name):
        def collective(tensor_or_list, *args, **kwargs):
            tensors = tensor_or_list if isinstance(tensor_or_list, list) else [tensor_or_list]
            tensors += [a for a in args if torch.is_tensor(a)]
            seen.extend((name, t.device.type) for t in tensors if torch.is_tensor(t))
        return collective

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(comm, "device_for_backend", lambda backend: torch.device("meta"))
    for name in ("all_reduce", "all_gather", "broadcast"):
        monkeypatch.setattr(dist, name, spy(name))
    return seen


def _run(fn):
    try:
        fn()
    except (NotImplementedError, RuntimeError):  # a meta result cannot be read back: expected
        pass


def test_every_step_collectives_use_the_communication_device(nccl_like):
    from rils_scale.objectives.reconstruction import PatchSentenceReconstructionLoss
    from rils_scale.parallel.deepspeed_utils import tensor_parallel_grad_norm
    from rils_scale.parallel.sharding import gather_full_tensor, ShardSpec
    from rils_scale.parallel.state import ParallelDims, ParallelState
    from rils_scale.train.signals import StopRequest

    group = object()  # any non-None group: the spies ignore it
    _run(lambda: StopRequest().agreed())
    _run(lambda: comm.all_reduce_values([1.0, 2.0], group))
    loss = PatchSentenceReconstructionLoss(dp_group=group, backend="reference")
    _run(lambda: loss(torch.randn(1, 4, 8), torch.randn(1, 4, 8), torch.ones(1, 4), torch.ones(1, dtype=torch.bool),
                      torch.randn(3, 8)))
    state = ParallelState(ParallelDims(4, 2), 0, group, group)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    _run(lambda: tensor_parallel_grad_norm([p], state, grads_partitioned_over_dp=True))
    _run(lambda: gather_full_tensor(torch.ones(2, 2), group, ShardSpec(0, 1, None)))
    _run(lambda: comm.broadcast_values([1.0], 0, group))
    kinds = {name for name, _ in nccl_like}
    assert {"all_reduce", "all_gather", "broadcast"} <= kinds, nccl_like
    off_device = [entry for entry in nccl_like if entry[1] != "meta"]
    assert not off_device, f"host tensors handed to an NCCL-like collective: {off_device}"


def test_release_cpu_shm_buffer_unlinks_only_this_ranks_file(monkeypatch, tmp_path):
    import os
    from rils_scale.parallel.cpu_comm import release_cpu_shm_buffer
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "65001")
    monkeypatch.setenv("RANK", "1")
    mine = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_65001_1"
    peer = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_65001_0"
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    for path in (mine, peer):
        open(path, "wb").close()
    try:
        assert release_cpu_shm_buffer() == mine
        assert not os.path.exists(mine) and os.path.exists(peer)
        assert release_cpu_shm_buffer() is None  # already gone: nothing to do
    finally:
        for path in (mine, peer):
            if os.path.exists(path):
                os.unlink(path)
