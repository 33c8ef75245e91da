"""Trainer pieces that need no process group: optimizer groups, schedule, batch sizes, CLI."""
import math

import pytest
import torch

from rils_scale.models import build_model, get_config
from rils_scale.train.config import TrainConfig, parse_args, resolve_batch_sizes
from rils_scale.models.param_groups import optimizer_groups
from rils_scale.train.schedule import warmup_cosine, warmup_cosine_factor


def test_weight_decay_exempts_norms_biases_embeddings_tokens_and_logit_scale():
    model = build_model(get_config("tiny"))
    decay, no_decay = optimizer_groups(model, 0.5)
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    for name in exempt:
        assert any(k in name for k in ("norm", "ln_final", "bias", "token", "embedding", "logit_scale")), name
    for name in ("visual.cls_token", "decoder.mask_token", "text.token_embedding.weight",
                 "text.positional_embedding", "logit_scale.value", "visual.norm.weight",
                 "visual.transformer.blocks.0.attn.q_bias", "visual.transformer.blocks.0.mlp.fc1.bias"):
        assert name in exempt, name
    for name in ("visual.patch_embed.weight", "visual.transformer.blocks.0.attn.qkv.weight",
                 "image_projection.weight", "text_projection.weight", "decoder.embed.weight"):
        assert name in decayed, name


def test_groups_do_not_depend_on_shapes():
    """Under ZeRO-3 partitions report shape (0,): grouping must not look at ndim."""
    model = build_model(get_config("tiny"))
    before = [len(g["params"]) for g in optimizer_groups(model, 0.1)]
    for p in model.parameters():
        p.data = torch.empty(0)
    assert [len(g["params"]) for g in optimizer_groups(model, 0.1)] == before


def test_warmup_cosine_schedule():
    assert warmup_cosine_factor(0, 10, 100, 0.0) == pytest.approx(0.1)
    assert warmup_cosine_factor(9, 10, 100, 0.0) == pytest.approx(1.0)
    assert warmup_cosine_factor(55, 10, 100, 0.0) == pytest.approx(0.5)
    assert warmup_cosine_factor(100, 10, 100, 0.01) == pytest.approx(0.01)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = warmup_cosine(opt, 2, 10, 1e-5)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_batch_sizes_checked_before_compute():
    assert resolve_batch_sizes({"train_micro_batch_size_per_gpu": 8}, 4)["train_batch_size"] == 32
    assert resolve_batch_sizes({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8}, 2)[
        "gradient_accumulation_steps"] == 4
    with pytest.raises(SystemExit, match="not divisible"):
        resolve_batch_sizes({"train_batch_size": 60, "train_micro_batch_size_per_gpu": 8}, 2)
    with pytest.raises(SystemExit, match="!="):
        resolve_batch_sizes({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8,
                             "gradient_accumulation_steps": 2}, 2)


def test_cli_parses_every_field():
    cfg = parse_args(["--ds_config", "x.json", "--model", "vit_b16", "--tensor-parallel", "2",
                      "--mask-strategy", "text-guided", "--prototype-grad", "--lr", "1e-4"])
    assert isinstance(cfg, TrainConfig)
    assert (cfg.model, cfg.tensor_parallel, cfg.mask_strategy, cfg.prototype_grad, cfg.lr) == \
        ("vit_b16", 2, "text-guided", True, 1e-4)
    with pytest.raises(SystemExit):
        parse_args(["--mask-strategy", "everything"])
    assert math.isclose(parse_args([]).recon_weight, 0.5)


def test_data_wait_watchdog_reports_a_stall(capsys):
    import time
    from rils_scale.train.loop import DataWaitWatchdog
    with DataWaitWatchdog(rank=3, interval=0.05):
        time.sleep(0.35)
    out = capsys.readouterr().out
    assert "rank 3: still waiting for data" in out and out.count("still waiting") >= 2
    with DataWaitWatchdog(rank=0, interval=0.5):
        pass
    time.sleep(0.6)
    assert "still waiting" not in capsys.readouterr().out
