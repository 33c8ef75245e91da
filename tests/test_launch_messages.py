"""Issue 21 §4 / issue 20 item 4: clear messages at launch: option ranges before any process
group, the real cause of a failed save, and DeepSpeed's CPU op built once per environment."""
import errno
import os
import shutil
import sys

import pytest
import torch.distributed as dist

from rils_scale.parallel import cpu_comm
from rils_scale.train import checkpointing
from rils_scale.train.config import parse_args
from rils_scale.train.options import option_errors


def test_out_of_range_options_fail_in_parse_args_all_at_once():
    with pytest.raises(SystemExit) as info:
        parse_args(["--seed", "-1", "--log-every", "0", "--max-steps", "-5", "--mask-ratio", "1.0",
                    "--collective-timeout-s", "0", "--num-workers", "-1", "--lr", "nan", "--tensor-parallel", "0"])
    message = str(info.value.code)
    for flag in ("--seed -1", "--log-every 0", "--max-steps -5", "--mask-ratio 1.0", "--collective-timeout-s 0.0",
                 "--num-workers -1", "--lr nan", "--tensor-parallel 0"):
        assert flag in message, (flag, message)
    assert option_errors(parse_args([])) == []  # the defaults are valid
    assert parse_args(["--seed", str(2 ** 32 - 1), "--lr", "0", "--recon-weight", "0"]).seed == 2 ** 32 - 1
    # launchers/pretrain.py calls parse_args before train(): no rank, process group or engine exists yet


def test_a_broken_collective_is_a_peer_failure_even_on_a_full_disk(monkeypatch, tmp_path):
    """Only an error that says so is a full disk; the free-space rule applies to torch's
    errno-less writer error alone."""
    full = shutil._ntuple_diskusage(100 << 20, 100 << 20, 1 << 20)
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda d: full)  # 1 MiB free
    peer = dist.DistBackendError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500")
    assert checkpointing.failure_cause(peer, str(tmp_path)).startswith("a peer rank failed")
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out "
                                     "waiting 60000ms for recv operation to complete")
    assert checkpointing.failure_cause(wrapped, str(tmp_path)).startswith("a peer rank failed")
    assert checkpointing.failure_cause(OSError(errno.ENOSPC, "No space left on device"), str(tmp_path)) == \
        "the disk is full (ENOSPC)"
    torch_writer = RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
                                "file data/3: file write failed")
    assert checkpointing.failure_cause(torch_writer, str(tmp_path)) == "the disk is full (1 MiB free)"
    assert checkpointing.failure_cause(PermissionError(errno.EACCES, "denied"), str(tmp_path)) == "a write failed"
    roomy = shutil._ntuple_diskusage(100 << 30, 1 << 30, 99 << 30)
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda d: roomy)
    assert checkpointing.failure_cause(torch_writer, str(tmp_path)) == "a write failed"


def test_shm_comm_build_directory_is_keyed_by_environment(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # torch's default build root follows it
    here = cpu_comm.extensions_dir()
    import deepspeed
    import torch
    assert torch.__version__.replace("+", "-") in here and deepspeed.__version__ in here
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    assert cpu_comm.extensions_dir() != here  # another environment: another build, no eviction
    monkeypatch.setattr(sys, "prefix", sys.base_prefix)

    build = cpu_comm.prepare_cpu_comm_build(announce=True)
    assert os.environ["TORCH_EXTENSIONS_DIR"] == os.path.dirname(build)
    assert "building DeepSpeed's CPU communication op" in capsys.readouterr().out
    os.makedirs(build)
    open(os.path.join(build, "deepspeed_shm_comm.so"), "wb").close()
    cpu_comm.prepare_cpu_comm_build(announce=True)
    assert "building" not in capsys.readouterr().out  # built: loaded silently

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert cpu_comm.extensions_dir() == str(tmp_path / "mine")  # the user's choice wins
