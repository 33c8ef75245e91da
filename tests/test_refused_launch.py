"""Issue 20 item 5 / issue 21 §3-4 through the real launcher (2 CPU ranks, ZeRO-3, tiny model):
a refused launch leaves no DeepSpeed shared-memory buffer in /dev/shm, whether the ranks raise
after the engine is built (``--resume`` refusing the 40 KB ``bytearray(3 GiB)`` model-states file,
named, without a traceback) or stop in the preflight (too few shards)."""
import glob
import os
import subprocess

import pytest
import torch

from distributed_utils import find_free_port
from test_checkpoint_bounds import write_bytearray_bomb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from rils_scale.data import train_tokenizer
    from rils_scale.data.scenes import write_scenes_dataset
    root = tmp_path_factory.mktemp("refused")
    write_scenes_dataset(root / "shapes", num_train=64, num_heldout=8, shard_size=32)
    corpus = ["a red circle", "a blue square", "a green triangle on a grey background"] * 8
    return {"train": str(root / "shapes" / "train"), "tokenizer": str(train_tokenizer(corpus, root / "tok", 64))}


def _launch(data, out, *extra):
    port = find_free_port()
    cmd = ["deepspeed", "--master_port", str(port), "--num_gpus", "2", os.path.join(REPO, "launchers", "pretrain.py"),
           "--ds_config", os.path.join(REPO, "ds_configs", "zero3.json"), "--precision", "fp32", "--model", "tiny",
           "--tokenizer", data["tokenizer"], "--output-dir", str(out), "--micro-batch-size", "4",
           "--num-workers", "1", "--max-steps", "4", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    left = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")
    return proc.returncode, proc.stdout + proc.stderr, left


def test_refused_launches_leave_no_shared_memory(data, tmp_path):
    from rils_scale.checkpoint.integrity import mark_complete, write_latest
    out = tmp_path / "run"
    tag = out / "checkpoints" / "global_step2"
    tag.mkdir(parents=True)
    bombs = [tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(2)]
    for r, bomb in enumerate(bombs):
        write_bytearray_bomb(bomb)
        torch.save({"optimizer_state_dict": {}}, tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    mark_complete(str(tag), {"tag": "global_step2", "step": 2})
    write_latest(str(out / "checkpoints"), "global_step2")

    # 1. --resume: both ranks build the engine, then refuse their model-states file and exit.
    code, log, left = _launch(data, out, "--train-data", data["train"], "--resume")
    assert code != 0, log[-3000:]
    assert "refused" in log and "builtins.bytearray" in log and any(str(b) in log for b in bombs), log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert left == [], left  # each rank unlinked its buffer once every rank had mapped it

    # 2. preflight: one shard cannot feed 2 ranks x 1 worker; refused before the engine.
    one_shard = sorted(glob.glob(os.path.join(data["train"], "*.tar")))[0]
    code, log, left = _launch(data, tmp_path / "fresh", "--train-data", one_shard)
    assert code != 0 and "--train-data" in log and "cannot feed" in log, log[-3000:]
    assert left == [], left
