"""--activation-checkpointing none | selective | every | auto: the planner's choice as numbers,
selective checkpointing's gradients against none, and the option's parsing."""
from __future__ import annotations

import pytest
import torch

from rils_scale.models import ParallelSpec, build_model, get_config
from rils_scale.models.transformer import checkpointed_blocks
from rils_scale.objectives import LossConfig, RILSLoss
from rils_scale.train.capacity import GiB, PlanConfig, choose_activation_checkpointing, memory_per_gpu


def _choice(model, micro_batch, gpus, memory_gb, requested="auto"):
    pc = PlanConfig(model=get_config(model), gpus=gpus, zero_stage=3, micro_batch=micro_batch,
                    precision="bf16", gpu_memory_gb=memory_gb)
    return pc, choose_activation_checkpointing(pc, requested)


@pytest.mark.parametrize("model,micro_batch,gpus,memory_gb,policy,blocks,peak_gib", [
    # B/16 at the scale (256 per GPU, 128 GPUs: G = 32,768): 28.5 GiB without recompute
    ("vit_b16", 256, 128, 80, "none", 0, 28.5),
    ("vit_b16", 1024, 128, 80, "selective", 7, 66.4),      # 115 GiB without: 7 of 12 blocks
    ("vit_g14", 64, 256, 80, "none", 0, 45.5),
    ("vit_g14", 256, 256, 80, "selective", 29, 65.6),      # 181 GiB without: 29 of 40 blocks
    ("vit_g14", 256, 256, 141, "selective", 16, 117.5),    # an H200 needs fewer
    ("vit_g14", 700, 256, 80, "every", 40, 61.4),          # 39 of 40 blocks: 71.3 GiB, above the budget
    ("vit_g14", 1024, 256, 80, "every", 40, 91.2),         # nothing fits: every, with a warning
])
def test_planner_choice(model, micro_batch, gpus, memory_gb, policy, blocks, peak_gib):
    pc, choice = _choice(model, micro_batch, gpus, memory_gb)
    depth = get_config(model).vision.depth
    assert (choice.policy, round(choice.fraction * depth)) == (policy, blocks), choice.line()
    peak = memory_per_gpu(pc.replace(activation_checkpointing=choice.fraction))["peak"]
    assert peak / GiB == pytest.approx(peak_gib, abs=0.05)
    if policy == "selective":  # the fewest blocks: one fewer is above the budget
        assert peak <= choice.budget
        assert memory_per_gpu(pc.replace(activation_checkpointing=(blocks - 1) / depth))["peak"] > choice.budget
    assert ("above the budget" in choice.reason) == (peak > choice.budget)
    line = choice.line()
    assert line.startswith(f"activation checkpointing: {policy}") and "estimated peak per device: none" in line


def test_explicit_policies_and_the_budget():
    _, choice = _choice("vit_b16", 256, 128, 80, "every")
    assert (choice.policy, choice.fraction, choice.reason) == ("every", 1.0, "as requested")
    _, choice = _choice("vit_b16", 1024, 128, 80, "none")
    assert choice.fraction == 0 and "above the budget" in choice.reason
    _, choice = _choice("vit_b16", 256, 128, 80, "selective")  # fits without: selective is 1 block
    assert (choice.policy, round(choice.fraction * 12)) == ("selective", 1)
    _, choice = _choice("vit_b16", 1024, 128, 80, "selective")
    assert round(choice.fraction * 12) == 7
    _, choice = _choice("vit_b16", 256, 128, 80)
    assert choice.budget == pytest.approx(0.9 * choice.usable) and choice.usable == pytest.approx(
        (80 - 2) * 0.95 * GiB)
    with pytest.raises(ValueError):
        _choice("vit_b16", 256, 128, 80, "sometimes")


def test_selective_blocks_per_stack():
    assert [checkpointed_blocks(12, k / 40) for k in (0, 1, 13, 29, 39, 40)] == [0, 1, 4, 9, 12, 12]
    assert checkpointed_blocks(1, 0.01) == 1 and checkpointed_blocks(24, 29 / 40) == 18
    with pytest.raises(ValueError):
        checkpointed_blocks(12, 1.5)


def test_selective_checkpointing_gradients_equal_none():
    """fp32, tiny (2 blocks per tower, 1 decoder block): recomputing the first block of every
    stack (selective) or all of them gives the same loss and gradients as storing everything."""
    cfg = get_config("tiny")
    g = torch.Generator().manual_seed(5)
    images = torch.randn(4, 3, 32, 32, generator=g)
    ids = torch.randint(4, cfg.text.vocab_size, (4, cfg.text.context_length), generator=g)
    ids[:, 12:] = 0
    results = []
    for fraction in (0.0, 0.5, 1.0):
        torch.manual_seed(0)
        model = build_model(cfg, ParallelSpec(activation_checkpointing=fraction), attn_backend="math").train()
        out = model(images, ids, mask_generator=torch.Generator().manual_seed(1))
        loss, _ = RILSLoss(LossConfig(retrieval_filter=False, kl_backend="streaming"))(out)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss0, grads0), rest = results[0], results[1:]
    assert len(grads0) == len(list(model.parameters()))
    for loss, grads in rest:
        assert torch.equal(loss, loss0)
        assert grads.keys() == grads0.keys()
        for name in grads0:
            torch.testing.assert_close(grads[name], grads0[name], rtol=1e-6, atol=1e-7, msg=name)


def test_option_parsing():
    from rils_scale.train.config import parse_args
    from rils_scale.train.recompute import normalize_policy
    base = ["--ds_config", "x.json"]
    assert parse_args(base).activation_checkpointing == "auto"
    assert parse_args(base + ["--activation-checkpointing"]).activation_checkpointing == "every"  # old flag
    assert parse_args(base + ["--activation-checkpointing", "--seed", "3"]).activation_checkpointing == "every"
    assert parse_args(base + ["--activation-checkpointing", "selective"]).activation_checkpointing == "selective"
    with pytest.raises(SystemExit):
        parse_args(base + ["--activation-checkpointing", "sometimes"])
    assert [normalize_policy(v) for v in (True, False, "auto")] == ["every", "none", "auto"]
