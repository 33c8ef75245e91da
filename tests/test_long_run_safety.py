"""Long-run safety on 2 CPU ranks (ZeRO-3, fp32, tiny model): non-finite steps, a full disk during
a save, resume from the newest complete checkpoint, abort after consecutive non-finite steps;
plus crash-consistency and safe-loading units. Faults come from tests/fixtures/faulty_pretrain.py
(a test-only entry point), never from a production switch."""
import json
import os
import pickle
import subprocess

import pytest
import torch

from distributed_utils import find_free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "faulty_pretrain.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from rils_scale.data.scenes import write_scenes_dataset
    root = tmp_path_factory.mktemp("longrun")
    write_scenes_dataset(root / "shapes", num_train=64, num_heldout=8, shard_size=32)
    subprocess.run([os.environ.get("PYTHON", "python"), os.path.join(REPO, "launchers", "train_tokenizer.py"),
                    "--input", str(root / "shapes" / "train"), "--vocab-size", "128", "--output", str(root / "tok")],
                   check=True, capture_output=True)
    return {"train": str(root / "shapes" / "train"), "tokenizer": str(root / "tok.model")}


def _run(data, out, *extra, env=None, ranks=2, timeout=1200):
    cmd = ["deepspeed", "--master_port", str(find_free_port()), "--num_gpus", str(ranks), FIXTURE,
           "--ds_config", os.path.join(REPO, "ds_configs", "zero3.json"), "--precision", "fp32",
           "--model", "tiny", "--train-data", data["train"], "--tokenizer", data["tokenizer"], "--output-dir", str(out),
           "--micro-batch-size", "4", "--num-workers", "0", "--shuffle-buffer", "8", "--warmup-steps", "2",
           "--log-every", "1", "--seed", "5", "--save-every", "2", "--keep-checkpoints", "1",
           *extra]  # the default --collective-timeout-s (600 s): only a hang guard, as the subprocess timeout
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    return proc.returncode, proc.stdout + proc.stderr


def _rows(out, name="metrics.jsonl"):
    with open(os.path.join(out, name)) as f:
        return [json.loads(line) for line in f]


def _latest(out):
    return (out / "checkpoints" / "latest").read_text().strip()


@pytest.mark.slow
def test_nonfinite_steps_full_disk_resume_abort_and_payload(data, tmp_path):
    from rils_scale.checkpoint.integrity import is_complete, list_tags
    from rils_scale.checkpoint.safe_load import safe_torch_load
    from rils_scale.train.schedule import warmup_cosine_factor
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    nan = {"RILS_TEST_NAN_BATCHES": "1,3"}  # micro-batches 1 and 3 (0-based) give a NaN loss

    # 1. NaN on two steps, and rank 1's disk "full" while writing global_step4.
    code, log = _run(data, out, "--max-steps", "6", env={**nan, "RILS_TEST_ENOSPC": "1:global_step4"})
    assert code != 0, log[-3000:]
    assert "CheckpointWriteError" in log and "the disk is full (ENOSPC)" in log, log[-3000:]
    # rank 0 only saw its peer drop out: if it got to say so, it says that, never "disk full"
    assert not any("rank 0" in line and "disk is full" in line for line in log.splitlines()), log[-3000:]
    assert "step 2: non-finite loss, update skipped" in log and "step 3: non-finite loss, update skipped" in log
    rows = _rows(out)
    # 6 batches consumed, 2 skipped: 4 steps, each step number logged once.
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["nonfinite_steps"] for r in rows] == [0, 1, 2, 2]
    assert all(r["loss"] == r["loss"] for r in rows)  # no NaN reached the log of an applied step
    # The schedule did not advance on skipped steps: the lr after step s is the closed form at s.
    base, min_factor = 5e-4, 1e-6 / 5e-4
    for r in rows:
        assert r["lr"] == pytest.approx(base * warmup_cosine_factor(r["step"], 2, 6, min_factor), rel=1e-9)
    assert "mfu" not in rows[-1] and rows[-1]["model_tflop_per_step"] > 0  # CPU: no peak, no MFU
    assert _latest(out) == "global_step2" and is_complete(str(ckpts / "global_step2"))
    assert not is_complete(str(ckpts / "global_step4"))

    # 2. Resume with the same NaN batches plus NaN on every batch from 8 on: from the newest
    #    complete tag, same data position, same losses; batches 8 and 9 (after step 6) are two
    #    non-finite steps in a row: exit 3, no checkpoint of the bad state.
    code, log = _run(data, out, "--max-steps", "10", "--resume", "--max-nonfinite-steps", "2",
                     env={"RILS_TEST_NAN_BATCHES": "1,3,8-"})
    assert code == 3, log[-3000:]
    assert f"resumed from {ckpts / 'global_step2'} at step 2" in log
    assert "2 consecutive non-finite steps (--max-nonfinite-steps 2) at step 7" in log
    # Rows of steps 3, 4 (after the resumed checkpoint) were moved to metrics.discarded.jsonl.
    assert _rows(out)[:2] == rows[:2] and _rows(out, "metrics.discarded.jsonl") == rows[2:]
    resumed = _rows(out)[2:]
    assert [r["step"] for r in resumed] == [3, 4, 5, 6] and resumed[-1]["nonfinite_steps"] == 2
    for a, b in zip(rows[2:], resumed[:2]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), (a, b)
    assert list_tags(str(ckpts)) == ["global_step6"] and _latest(out) == "global_step6"
    model_states = safe_torch_load(str(ckpts / "global_step6" / "zero_pp_rank_0_mp_rank_00_model_states.pt"))
    # DeepSpeed's step, the scheduler's position and the trainer's step agree across skips + resume.
    assert model_states["global_steps"] == 6 and model_states["lr_scheduler"]["last_epoch"] == 6
    assert model_states["step"] == 6 and model_states["nonfinite_steps"] == 2

    # 3. A planted pickle payload in a DeepSpeed file: --resume refuses, nothing runs.
    optim = ckpts / "global_step6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    marker = tmp_path / "payload_ran"
    torch.save({"x": _Payload(str(marker))}, optim)
    code, log = _run(data, out, "--max-steps", "8", "--resume")
    assert code != 0 and "refused" in log and "--trust-pickle" in log, log[-3000:]
    assert not marker.exists()


class _Payload:
    """Unpickling this creates a file: the side effect the safe readers must never allow."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _complete(directory, tag):
    from rils_scale.checkpoint.integrity import mark_complete
    os.makedirs(os.path.join(directory, tag), exist_ok=True)
    with open(os.path.join(directory, tag, "f.pt"), "wb") as f:
        f.write(b"x")
    mark_complete(os.path.join(directory, tag), {"tag": tag})


def test_pruning_keeps_latest_and_newest_complete(tmp_path):
    from rils_scale.checkpoint import integrity as it
    d = str(tmp_path)
    _complete(d, "global_step1")
    _complete(d, "global_step3")
    os.makedirs(os.path.join(d, "global_step4"))  # a crash during this save: no marker
    it.write_latest(d, "global_step3")
    # keep=1 once deleted global_step3 (sorted by step, the partial step 4 was "newest").
    assert it.prune(d, 1) == ["global_step1"]
    assert it.list_tags(d) == ["global_step3", "global_step4"]
    assert it.newest_complete_tag(d) == "global_step3"
    _complete(d, "global_step5")
    it.write_latest(d, "global_step5")
    assert sorted(it.prune(d, 1)) == ["global_step3", "global_step4"]  # debris older than step 5 goes
    # latest naming an older complete tag (a rollback by hand) protects it too.
    _complete(d, "global_step7")
    assert it.prune(d, 1) == [] and it.list_tags(d) == ["global_step5", "global_step7"]


def test_every_checkpoint_reader_refuses_a_payload(tmp_path):
    """model_states / optim_states through the resume reader and the converter's reader; the
    weights-only format is safetensors (no pickle), so a planted pickle is just an invalid file."""
    from rils_scale.checkpoint.safe_load import UnsafeCheckpointError, install_safe_checkpoint_engine
    from rils_scale.checkpoint.serialization import load_ds_file
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    class _Engine:
        checkpoint_engine = TorchCheckpointEngine()
    engine = _Engine()
    install_safe_checkpoint_engine(engine)
    good = tmp_path / "good_optim_states.pt"
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(3), "w": torch.ones(2)}, good)
    loaded = engine.checkpoint_engine.load(str(good), map_location="cpu")
    assert isinstance(loaded["loss_scaler"], LossScaler) and loaded["zero_stage"] == 3
    marker = tmp_path / "ran"
    for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        bad = tmp_path / name
        torch.save({"module": None, "x": _Payload(str(marker))}, bad)
        with pytest.raises(UnsafeCheckpointError, match="refused.*--trust-pickle"):
            engine.checkpoint_engine.load(str(bad), map_location="cpu")
        with pytest.raises(RuntimeError, match="refused by the restricted unpickler"):
            load_ds_file(str(bad))
    with open(tmp_path / "tp_rank_00.safetensors", "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    from safetensors import safe_open
    with pytest.raises(Exception):
        safe_open(str(tmp_path / "tp_rank_00.safetensors"), framework="pt")
    assert not marker.exists()


def test_preflight_reports_bad_inputs_before_the_engine(tmp_path):
    from rils_scale.train.preflight import PreflightError, check_resume_vocabulary, check_shards
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(PreflightError, match="every shard is empty"):
        check_shards(str(tmp_path / "empty.tar"))
    import tarfile
    with tarfile.open(tmp_path / "empty-img2dataset.tar", "w"):
        pass  # img2dataset's shard when every row failed: allowed beside others, counted by the loader
    from rils_scale.data import ShardWriter
    from PIL import Image
    with ShardWriter(tmp_path / "ok", 4) as writer:
        for i in range(8):
            writer.write(Image.new("RGB", (8, 8), (i, 0, 0)), f"caption {i}", ext="png")
    urls = [str(tmp_path / "empty-img2dataset.tar")] + writer.shard_paths
    assert check_shards(urls, dp_size=1, num_workers=2, announce=False) == urls
    with pytest.raises(PreflightError, match="--train-data"):  # 2 samples-bearing shards cannot feed 4 streams
        check_shards(urls, dp_size=2, num_workers=2, announce=False)
    with pytest.raises(PreflightError, match="not found"):
        check_shards(str(tmp_path / "missing-{000..001}.tar"))
    (tmp_path / "config.json").write_text(json.dumps({"model": {"text": {"vocab_size": 128}}}))
    check_resume_vocabulary(str(tmp_path), 128, "tok.model")
    with pytest.raises(PreflightError, match="vocabulary of 256 tokens.*trained with 128"):
        check_resume_vocabulary(str(tmp_path), 256, "tok.model")


@pytest.mark.slow
def test_elastic_resume_keeps_masters_and_both_adam_moments(data, tmp_path):
    """TP2 x DP2 ZeRO-3 -> converter (moments included) -> resumed on TP1 x DP2 and on TP2 x DP1:
    the fp32 masters and both Adam moments the new engines hold are bit-identical to the source's,
    Adam's step is kept, and both runs train on."""
    from rils_scale.checkpoint.consolidate import OPTIMIZER_KINDS, open_checkpoint
    from rils_scale.checkpoint.export import export
    src = tmp_path / "src"
    code, log = _run(data, src, "--max-steps", "2", "--tensor-parallel", "2", ranks=4)
    assert code == 0, log[-3000:]
    source = open_checkpoint(str(src))
    assert (source.tp_size, source.dp_size) == (2, 2) and source.has_optimizer_state()
    reference = {kind: dict(source.iter_full_tensors(kind=kind)) for kind in ("fp32",) + OPTIMIZER_KINDS}
    assert all(t.abs().sum() > 0 for t in reference["exp_avg_sq"].values() if t.numel() > 1)
    adam_step = source.optimizer_step()
    assert adam_step is not None and adam_step >= 2

    for tp in (1, 2):  # DP = 2 / TP, on 2 ranks
        out, dump = tmp_path / f"tp{tp}", tmp_path / f"dump{tp}"
        export(source, "deepspeed", str(out), tensor_parallel=tp, tokenizer=data["tokenizer"])
        code, log = _run(data, out, "--max-steps", "3", "--tensor-parallel", str(tp), "--resume",
                         env={"RILS_TEST_DUMP_AFTER_RESUME": str(dump)})
        assert code == 0, log[-3000:]
        assert "resumed from" in log and "at step 2" in log
        loaded = open_checkpoint(str(dump), tag="resumed")
        assert (loaded.tp_size, loaded.dp_size) == (tp, 2 // tp)
        assert loaded.optimizer_step() == adam_step
        for kind, tensors in reference.items():
            for name, value in loaded.iter_full_tensors(kind=kind):
                assert torch.equal(value, tensors[name]), (tp, kind, name)
        rows = _rows(out)
        assert [r["step"] for r in rows] == [3] and rows[0]["loss"] == rows[0]["loss"]
        assert _latest(out) == "global_step3"


_WATCHED_RANK = r"""
import sys, time
from rils_scale.train.signals import LauncherWatch, StopRequest
stop = StopRequest()
watch = LauncherWatch(stop, interval=0.2)
print("watching", len(watch.pids), flush=True)
deadline = time.time() + 60
while not stop.requested and time.time() < deadline:
    time.sleep(0.05)
open(sys.argv[1], "w").write(f"{stop.requested} {stop.signal_name}")
"""

_FAKE_LAUNCHER = r"""
import subprocess, sys, time
# argv carries "deepspeed": this process looks like a launcher to the watch.
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
print(child.stdout.readline().strip(), flush=True)
time.sleep(600)
"""


def test_ranks_stop_when_their_launcher_dies(tmp_path):
    """The orphaned-ranks case: the launcher is SIGKILLed, its rank requests a stop (the loop
    then checkpoints and exits at the next step boundary)."""
    import signal
    import sys
    import time
    result = tmp_path / "result"
    launcher = subprocess.Popen([sys.executable, "-c", _FAKE_LAUNCHER, _WATCHED_RANK, str(result), "deepspeed"],
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO})
    try:
        assert launcher.stdout.readline().strip() == "watching 1"
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 30
        while not result.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert result.read_text() == "True launcher exited"
    finally:
        if launcher.poll() is None:
            launcher.kill()
