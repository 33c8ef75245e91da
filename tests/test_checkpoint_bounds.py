"""Issue 21 §3-4: every reader of DeepSpeed files (the converter, ``load_model``, ``--resume``'s
checkpoint engine) refuses what a DeepSpeed checkpoint never holds, within bounded memory, and
names the file when one is malformed (no raw tracebacks). The ``--resume`` refusal through a
real 2-rank launch is in tests/test_refused_launch.py."""
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOMB_BYTES = 3 * 2 ** 30


class _ByteArrayBomb:
    """Unpickles as ``bytearray(3 GiB)`` (torch's weights-only unpickler allows ``bytearray``);
    pickling it allocates nothing."""

    def __reduce__(self):
        return (bytearray, (BOMB_BYTES,))


def model_states(num_params: int = 40) -> dict:
    """What a ZeRO-3 ``*_model_states.pt`` of the tiny model holds (names and shapes only)."""
    names = [f"visual.transformer.blocks.{i // 12}.{n}" for i, n in
             enumerate(["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias",
                        "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
                        "mlp.fc1.bias", "mlp.fc2.weight"] * (num_params // 12 + 1))][:num_params]
    return {"module": None, "buffer_names": [], "optimizer": None, "param_shapes": [
        OrderedDict((n, torch.Size([64, 64])) for n in names)], "frozen_param_shapes": None,
        "shared_params": {}, "lr_scheduler": {"last_epoch": 2, "_step_count": 3, "base_lrs": [5e-4]},
        "sparse_tensor_module_names": set(), "skipped_steps": 0, "global_steps": 2, "global_samples": 16,
        "dp_world_size": 1, "mp_world_size": 1, "ds_config": {"train_micro_batch_size_per_gpu": 4},
        "ds_version": "0.19.8", "step": 2, "batches_consumed": 2, "skipped": {}, "tensor_parallel": 1,
        "model_config": {"name": "tiny"}}


def write_bytearray_bomb(path) -> None:
    """The issue's file: a ~40 KB model_states.pt whose unpickling allocates bytearray(3 GiB)."""
    state = model_states(240)
    state["ds_config"] = {"payload": _ByteArrayBomb()}
    torch.save(state, path)


def _bomb_run(root):
    """A run directory whose only tag holds the bomb as TP 0 / DP 0's model-states file."""
    tag = root / "run" / "checkpoints" / "global_step2"
    tag.mkdir(parents=True)
    write_bytearray_bomb(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"fp32_flat_groups": [torch.zeros(8)]}},
               tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (root / "run" / "checkpoints" / "latest").write_text("global_step2")
    return root / "run", tag / "zero_pp_rank_0_mp_rank_00_model_states.pt"


_READERS_CHILD = textwrap.dedent("""
    import contextlib, io, json, sys
    def status(field):
        return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) << 10
    run, bomb, out = sys.argv[1:4]
    sys.path.insert(0, "launchers")
    import convert_checkpoint
    from rils_scale.checkpoint import CheckpointError, load_model
    from rils_scale.checkpoint.safe_load import UnsafeCheckpointError, install_safe_checkpoint_engine
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    class Engine:
        checkpoint_engine = TorchCheckpointEngine()
    engine = Engine()
    install_safe_checkpoint_engine(engine)
    # what the readers import on first use, and a first torch.load: not part of the file's cost
    import rils_scale.checkpoint.export, rils_scale.data.tokenizer, rils_scale.data.transforms, torch
    from rils_scale.checkpoint.serialization import load_ds_file
    load_ds_file(sys.argv[4])
    engine.checkpoint_engine.load(sys.argv[4], map_location="cpu")
    base = status("VmRSS:")
    result = {}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        result["convert_rc"] = convert_checkpoint.main(["--checkpoint", run, "--format", "rils", "--output", out])
    result["convert_stderr"] = err.getvalue()
    try:
        load_model(run)
    except CheckpointError as e:
        result["load_model"] = str(e)
    try:
        engine.checkpoint_engine.load(bomb, map_location="cpu")
    except UnsafeCheckpointError as e:
        result["resume"] = str(e)
    result["grew"] = status("VmHWM:") - base
    print(json.dumps(result))
""")


def test_bytearray_bomb_is_refused_by_every_reader_in_bounded_memory(tmp_path):
    """converter, load_model and --resume's reader: refused, named, and the process grows by
    less than 64 MiB (reading it used to take 3.7 GB)."""
    run, bomb = _bomb_run(tmp_path)
    assert bomb.stat().st_size < 64 << 10  # the 40 KB file
    warm = tmp_path / "warm_model_states.pt"
    torch.save(model_states(240), warm)
    out = subprocess.run([sys.executable, "-c", _READERS_CHILD, str(run), str(bomb), str(tmp_path / "out"), str(warm)],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["convert_rc"] == 1 and "Traceback" not in result["convert_stderr"]
    for message in (result["convert_stderr"], result["load_model"], result["resume"]):
        assert str(bomb) in message and "builtins.bytearray" in message and "refused" in message, message
    assert result["grew"] < 64 << 20, result["grew"] / 2 ** 20


def _expect_refused(path, match):
    from rils_scale.checkpoint.safe_load import UnsafeCheckpointError, safe_torch_load
    from rils_scale.checkpoint.serialization import load_ds_file
    for read in (load_ds_file, lambda p: safe_torch_load(p, map_location="cpu")):
        with pytest.raises(UnsafeCheckpointError, match=match) as info:
            read(str(path))
        assert str(path) in str(info.value)


class _Rebuild:
    """Pickles as ``fn(*args)``: the weights-only unpickler's allowlist with hostile arguments."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def test_what_deepspeed_never_writes_is_refused_and_what_it_writes_is_read(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from rils_scale.checkpoint.safe_load import safe_torch_load
    from rils_scale.checkpoint.serialization import load_ds_file

    # What DeepSpeed writes (ZeRO-3 optimizer file, bf16 and fp32 storages, its classes) is read.
    good = tmp_path / "good_optim_states.pt"
    flat = torch.arange(12, dtype=torch.float32)
    torch.save({"optimizer_state_dict": {"fp32_flat_groups": [flat], "loss_scaler": LossScaler(1.0),
                                         "zero_stage": ZeroStageEnum(3), "state": {0: {"step": torch.tensor(3.0)}},
                                         "bf16": flat.bfloat16()[2:8], "shapes": [torch.Size([3, 4])],
                                         "names": {"a", "b"}, "raw": b"\x00\x01"}}, good)
    for state in (load_ds_file(str(good)), safe_torch_load(str(good), map_location="cpu")):
        assert torch.equal(state["optimizer_state_dict"]["fp32_flat_groups"][0], flat)
        assert state["optimizer_state_dict"]["raw"] == b"\x00\x01"

    # A tensor from torch.Tensor(n): storage the archive does not hold (12 GiB, never touched).
    big = tmp_path / "tensor_ctor.pt"
    torch.save({"x": _Rebuild(torch.Tensor, 3 * 2 ** 30)}, big)
    _expect_refused(big, "storage")
    # A stride-0 view of 4 stored bytes claiming 2**33 elements (a clone would be 32 GiB).
    expanded = tmp_path / "expanded.pt"
    torch.save({"x": torch.ones(1).expand(2 ** 33)}, expanded)
    _expect_refused(expanded, "viewing a 4-byte storage")
    # A meta tensor ("Tensor on device meta" deep inside the converter before).
    meta = tmp_path / "meta.pt"
    torch.save({"x": torch.empty(4, 4, device="meta")}, meta)
    _expect_refused(meta, "_rebuild_meta_tensor_no_storage")
    # A 2 MiB string.
    long = tmp_path / "long.pt"
    torch.save({"ds_version": "x" * (2 << 20)}, long)
    _expect_refused(long, "literal")
    # Compressed archive members (torch writes none; a zip bomb would hide in one).
    zipped = tmp_path / "zipped.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            dst.writestr(item.filename, src.read(item))
    _expect_refused(zipped, "compressed")


def test_malformed_files_are_named_without_a_traceback(tmp_path, capsys):
    """load_model and the converter on a damaged rils export, a truncated DeepSpeed file and a
    model-states file without its fields: CheckpointError / exit 1 naming the file."""
    from rils_scale.checkpoint import CheckpointError, load_model
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"format": "rils", "model": {"name": "tiny"}}))
    (export / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage}")
    with pytest.raises(CheckpointError, match="model.safetensors: not a valid safetensors file"):
        load_model(str(export))

    run, bomb = _bomb_run(tmp_path / "cut")
    torch.save(model_states(), bomb)
    bomb.write_bytes(bomb.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match=f"{bomb}: not a readable torch file"):
        load_model(str(run))
    torch.save({"module": None, "step": 2, "model_config": {"name": "tiny"}}, bomb)  # no param_shapes
    with pytest.raises(CheckpointError, match=f"{bomb}: malformed checkpoint.*param_shapes"):
        load_model(str(run))
    sys.path.insert(0, os.path.join(REPO, "launchers"))
    import convert_checkpoint  # the CLI's main(): an exception escaping it is the traceback users saw
    for path, named in ((export, str(export / "model.safetensors")), (run, str(bomb))):
        assert convert_checkpoint.main(["--checkpoint", str(path), "--format", "timm",
                                        "--output", str(tmp_path / "o")]) == 1
        assert named in capsys.readouterr().err
