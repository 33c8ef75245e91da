"""Every shipped DeepSpeed config initialises DeepSpeed 0.19 and takes a training step."""
import json
import os

import pytest
import torch

from distributed_utils import spawn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["zero3.json", "zero2.json", "zero3_offload.json"]


def _step_worker(rank, world, config_name, result_path):
    from rils_scale.models import get_config
    from rils_scale.objectives import LossConfig, RILSLoss
    from rils_scale.parallel import init_parallel_state
    from rils_scale.train.config import TrainConfig, load_ds_config, resolve_batch_sizes
    from rils_scale.train.engine import build_engine, compute_dtype

    cfg = TrainConfig(ds_config=os.path.join(REPO, "ds_configs", config_name), micro_batch_size=4,
                      max_steps=10, warmup_steps=1, lr=1e-4)
    ds = resolve_batch_sizes(load_ds_config(cfg), world)
    state = init_parallel_state(1)
    engine, _ = build_engine(cfg, get_config("tiny"), ds, state)
    import deepspeed
    initial = {}
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            initial[name] = param.detach().float().clone()
    torch.save(initial, f"{result_path}.init")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=g).to(compute_dtype(ds))
    ids = torch.randint(4, 1000, (4, 32), generator=g)
    ids[:, 12:] = 0
    losses = []
    for step in range(3):
        out = engine(images, ids, mask_generator=torch.Generator().manual_seed(0))  # same mask
        # no retrieval filter: a smooth loss, so small steps on one batch must lower it
        loss, _ = RILSLoss(LossConfig(retrieval_filter=False), dp_group=state.dp_group)(out)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    with open(f"{result_path}.{rank}", "w") as f:
        json.dump({"losses": losses, "stage": ds["zero_optimization"]["stage"], "lr": engine.get_lr()[0]}, f)


@pytest.mark.parametrize("config_name", CONFIGS)
def test_shipped_config_trains(config_name, tmp_path):
    spawn(_step_worker, 1, config_name, str(tmp_path / "r"))
    result = json.loads((tmp_path / "r.0").read_text())
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    # the same batch and mask three times: the optimizer must make progress on it
    assert result["losses"][2] < result["losses"][1] < result["losses"][0]
    assert result["lr"] > 0


def test_zero3_bf16_initialisation_draws_the_fp32_weights(tmp_path):
    """Under zero.Init (bf16), every weight is the bf16 rounding of what a plain fp32 model
    draws from the same seed: same numbers, whatever the precision or partitioning."""
    from rils_scale.models import build_model, get_config
    from rils_scale.parallel.random import model_parallel_seed
    spawn(_step_worker, 1, "zero3.json", str(tmp_path / "r"))
    initial = torch.load(f"{tmp_path / 'r'}.init")
    model_parallel_seed(0, 0, 1)  # what build_engine does with TrainConfig's default seed
    plain = dict(build_model(get_config("tiny")).named_parameters())
    assert initial.keys() == plain.keys()
    for name, value in initial.items():
        want = plain[name].detach().to(torch.bfloat16).float()
        torch.testing.assert_close(value, want, rtol=0, atol=0, msg=name)
