"""The README's launcher-free commands, as printed: ``python launchers/pretrain.py ...`` runs as
one rank (no ``mpi4py`` error) and ``torchrun --nproc_per_node 2 launchers/pretrain.py ...`` as
two, each saying how it was launched and which precision it chose (fp32 on a CPU without native
bf16, which is what this machine is, unless the CPU has it).

The commands are read from README.md and run in a scratch directory that holds what they name
(``launchers/``, ``ds_configs/`` and a small ``runs/demo/data`` with a tokenizer); only
``--max-steps 3 --log-every 1`` is appended to bound the test's time.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from distributed_utils import find_free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

pytestmark = pytest.mark.slow


def readme_commands(prefix: str):
    """Shell commands of README.md's code blocks that start with ``prefix`` (continuations joined)."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split(" #")[0].strip()
            if cmd.startswith(prefix):
                commands.append(shlex.split(cmd))
    return commands


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from rils_scale.data.multi_scenes import write_multi_scenes_dataset
    root = tmp_path_factory.mktemp("launch")
    for name in ("launchers", "ds_configs"):
        os.symlink(os.path.join(REPO, name), root / name)
    data = root / "runs" / "demo" / "data"
    write_multi_scenes_dataset(data, num_train=256, num_heldout=16, shard_size=64)  # 4 shards: 2 ranks x 2 workers
    subprocess.run([sys.executable, os.path.join(REPO, "launchers", "train_tokenizer.py"), "--input",
                    str(data / "train"), "--vocab-size", "128", "--output", str(data / "tokenizer")],
                   check=True, capture_output=True, timeout=300)
    return root


def _run(cmd, cwd, env):
    proc = subprocess.run(cmd + ["--max-steps", "3", "--log-every", "1"], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def test_plain_python_and_torchrun_as_the_readme_prints_them(workdir):
    from rils_scale.train.precision import cpu_native_bf16
    native, _ = cpu_native_bf16()
    precision = "bf16, native on this CPU" if native else "torch.float32 (fp32 instead of the DeepSpeed config's bf16"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(PYTHONPATH=REPO, PYTHONUNBUFFERED="1", PET_MASTER_PORT=str(find_free_port()))  # torchrun's --master-port

    plain = [c for c in readme_commands("python launchers/pretrain.py") if "--ds_config" in c]
    assert len(plain) == 1, plain
    log = _run([sys.executable] + plain[0][1:], workdir, env)
    assert "running as a single rank" in log and "torchrun --nproc_per_node N" in log
    assert "world 1 = DP 1 x TP 1" in log and precision in log and "stopped at step 3: finished" in log
    assert "mpi4py" not in log

    runs = readme_commands("torchrun --nproc_per_node 2 launchers/pretrain.py")
    assert len(runs) == 1, runs
    log = _run(runs[0], workdir, env)
    assert "running as a single rank" not in log
    assert "world 2 = DP 2 x TP 1" in log and precision in log and "stopped at step 3: finished" in log


def test_launch_environment_is_filled_only_without_a_launcher():
    from rils_scale.train.launch_env import ensure_launch_env
    env = {"PATH": "/bin"}
    line = ensure_launch_env(env)
    assert "single rank" in line and env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["LOCAL_RANK"] == "0"
    assert env["MASTER_ADDR"] == "127.0.0.1" and 0 < int(env["MASTER_PORT"]) < 65536
    for launched in ({"RANK": "1", "WORLD_SIZE": "2"}, {"OMPI_COMM_WORLD_SIZE": "4"}, {"SLURM_NTASKS": "8"}):
        env = dict(launched)
        assert ensure_launch_env(env) is None and env == launched
    env = {"SLURM_NTASKS": "1"}  # a one-task allocation is a plain run
    assert ensure_launch_env(env) is not None and env["WORLD_SIZE"] == "1"
