"""The SemMIM recipe: model wiring, objective against float64 formulas, the EMA, FLOPs, TP = 2 against
TP = 1, and the fp32 per-partition EMA under ZeRO-3 x TP 2 x DP 2 (bf16) against a plain EMA of the
consolidated online weights. The launcher-level run (training, exact resume, exports, code usage)
is ``test_semmim_launcher.py``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distributed_utils import spawn
from rils_scale.models import build_model, get_config
from rils_scale.models.transformer import ParallelSpec
from rils_scale.objectives.semmim_loss import SemMIMLoss, SemMIMLossConfig, perplexity
from rils_scale.ops.code_cross_entropy import code_cross_entropy_reference
from rils_scale.parallel import init_parallel_state, model_parallel_seed
from rils_scale.parallel.sharding import gather_full_tensors, merge_shards, shard_spec

SEED, MASK_SEED, BATCH = 1234, 7, 4
K = 256  # the tiny preset's codes


def semmim_tiny(**overrides):
    cfg = get_config("tiny", recipe="semmim", decoder_text_conditioning=True)
    cfg.text.vocab_size = 1000
    for key, value in overrides.items():
        setattr(cfg.semmim, key, value)
    return cfg


def _inputs(cfg, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(BATCH, 3, 32, 32, generator=g).to(dtype)
    ids = torch.randint(4, cfg.text.vocab_size, (BATCH, cfg.text.context_length), generator=g)
    lengths = torch.randint(3, cfg.text.context_length + 1, (BATCH,), generator=g)
    ids[torch.arange(cfg.text.context_length)[None] >= lengths[:, None]] = 0
    return images, ids


def _forward(model, cfg, dtype, seed=0):
    images, ids = _inputs(cfg, dtype, seed)
    return model(images, ids, mask_generator=torch.Generator().manual_seed(MASK_SEED), mask_strategy="text-guided")


# ------------------------------------------------------------------------------ single process
def test_model_wiring_initialisation_and_gradients():
    cfg = semmim_tiny()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    torch.manual_seed(0)
    rils_cfg = get_config("tiny", decoder_text_conditioning=True)
    rils_cfg.text.vocab_size = 1000
    rils = build_model(rils_cfg)
    params = dict(model.named_parameters())
    # the online towers are drawn exactly as RILS's (the momentum branch consumes no random numbers)
    for name, p in rils.named_parameters():
        assert torch.equal(params[name], p), name
    pairs = model.momentum_pairs()
    assert {m for _, m in pairs} == {n for n in params if n.startswith("momentum.")}
    assert {o.split(".")[0] for o, _ in pairs} == {"visual", "fusion", "code_head"}
    for online, momentum in pairs:  # momentum := online at construction, frozen, never in train mode
        assert torch.equal(params[online], params[momentum]) and not params[momentum].requires_grad
    assert not model.momentum.training
    out = _forward(model, cfg, torch.float32)
    assert out["student_patches"].shape == (BATCH, 48, 64) and out["teacher_patches_all"].shape == (BATCH, 64, 64)
    assert not any(out[k].requires_grad for k in ("teacher_global", "teacher_patches", "teacher_codes"))
    loss, metrics = SemMIMLoss(SemMIMLossConfig(), K)(out)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("momentum."))
    assert metrics["recon_keep_frac"] == 1.0 and 1.0 <= metrics["code_ppl_patch"] <= K
    # no text injection in the targets: no fusion block anywhere
    plain = build_model(semmim_tiny(target_text_injection=False))
    assert plain.fusion is None and plain.momentum.fusion is None


def test_objective_and_centres_against_float64_formulas():
    cfg = semmim_tiny()
    torch.manual_seed(0)
    model = build_model(cfg, attn_backend="math").double()
    out = _forward(model, cfg, torch.float64)
    loss_fn = SemMIMLoss(SemMIMLossConfig(mim_weight=0.7, agreement_weight=0.3, center_momentum=0.8), K)
    loss_fn.center_patch.copy_(0.05 * torch.randn(K))  # a non-zero centre enters the teacher logits
    c_patch = loss_fn.center_patch.clone().double()
    loss, metrics = loss_fn(out)

    img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
    labels = torch.arange(BATCH)
    clip = 0.5 * (F.cross_entropy(scale * img @ txt.T, labels) + F.cross_entropy(scale * txt @ img.T, labels))
    e = img.shape[-1]
    sc, tc = out["student_codes"], out["teacher_codes"]
    ce_g, use_g, ent_g = code_cross_entropy_reference(out["student_global"], out["teacher_global"], sc, tc,
                                                      torch.zeros(K, dtype=torch.float64), student_temp=0.1,
                                                      teacher_temp=0.04)
    ce_p, use_p, ent_p = code_cross_entropy_reference(out["student_patches"].reshape(-1, e),
                                                      out["teacher_patches"].reshape(-1, e), sc, tc, c_patch,
                                                      student_temp=0.1, teacher_temp=0.04)
    expected = clip + 0.7 * ce_p.mean() + 0.3 * ce_g.mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)  # the loss sums in float32
    torch.testing.assert_close(metrics["agreement_loss"].double(), ce_g.mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(metrics["recon_loss_share"].double(), ce_p.mean(), rtol=1e-6, atol=0)
    # DINO's centre: m c + (1 - m) * mean of the uncentred teacher cosine logits over the batch
    mean_logits_g = (out["teacher_global"] @ tc.T).mean(dim=0)
    mean_logits_p = (out["teacher_patches_all"].reshape(-1, e) @ tc.T).mean(dim=0)
    torch.testing.assert_close(loss_fn.center_global.double(), 0.2 * mean_logits_g, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss_fn.center_patch.double(), 0.8 * c_patch + 0.2 * mean_logits_p, rtol=1e-5,
                               atol=1e-7)
    # collapse statistics: perplexity of the mean teacher distribution, exp of the mean row entropy
    torch.testing.assert_close(metrics["code_ppl_patch"].double(), perplexity(use_p), rtol=1e-5, atol=0)
    torch.testing.assert_close(metrics["code_row_ppl_global"].double(), ent_g.mean().exp(), rtol=1e-5, atol=0)
    q = torch.softmax((out["teacher_patches"].reshape(-1, e) @ tc.T - c_patch) / 0.04, dim=-1).mean(dim=0)
    torch.testing.assert_close(perplexity(use_p), torch.exp(-(q * q.log()).sum()), rtol=1e-10, atol=0)


def test_momentum_schedule_and_plain_ema():
    from rils_scale.train.ema import MomentumEMA, momentum_at
    assert momentum_at(0, 100, 0.996) == 0.996 and momentum_at(100, 100, 0.996) == 1.0
    assert momentum_at(50, 100, 0.996) == pytest.approx(0.998)
    cfg = semmim_tiny()
    torch.manual_seed(0)
    model = build_model(cfg)
    ema = MomentumEMA(model, 0.9, total_steps=4)
    params = dict(model.named_parameters())
    before = {m: params[m].detach().clone() for _, m in model.momentum_pairs()}
    with torch.no_grad():  # stands in for an optimizer step of the online weights
        for online, _ in model.momentum_pairs():
            params[online].add_(torch.randn_like(params[online]))
    m = ema.update(1)
    assert m == pytest.approx(momentum_at(1, 4, 0.9))
    for online, momentum in model.momentum_pairs():
        torch.testing.assert_close(params[momentum], m * before[momentum] + (1 - m) * params[online],
                                   rtol=1e-6, atol=1e-7)


def test_flops_and_parameter_counts_match_the_module():
    from torch.utils.flop_counter import FlopCounterMode
    from test_flops import stand_in_loss
    from rils_scale.train.flops import model_params, rils_step_flops
    for decoder_text, injection in ((True, True), (False, False)):
        cfg = semmim_tiny(target_text_injection=injection)
        cfg.decoder_text_conditioning = decoder_text
        torch.manual_seed(0)
        model = build_model(cfg, attn_backend="math")
        counts = model_params(cfg)
        assert sum(p.numel() for p in model.parameters()) == counts["total"]
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == counts["trainable"]
        assert sum(p.numel() for n, p in model.named_parameters() if n.startswith("momentum.")) == counts["momentum"]
        with FlopCounterMode(display=False) as counter:
            out = _forward(model, cfg, torch.float32)
            img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
            labels = torch.arange(BATCH)
            clip = 0.5 * (F.cross_entropy(scale * img @ txt.T, labels) + F.cross_entropy(scale * txt @ img.T, labels))
            e = img.shape[-1]
            rows = [torch.cat([out[f"{w}_global"], out[f"{w}_patches"].reshape(-1, e)]) for w in ("student", "teacher")]
            ce, _, _ = code_cross_entropy_reference(*rows, out["student_codes"], out["teacher_codes"], torch.zeros(K),
                                                    student_temp=0.1, teacher_temp=0.04)
            (clip + ce.mean()).backward()
        analytic = rils_step_flops(cfg, BATCH, BATCH)
        assert analytic["total"] == counter.get_total_flops(), (decoder_text, injection)
    # RILS with a text-conditioned decoder: the cross-attention is counted too (a detached context)
    cfg = get_config("tiny", decoder_text_conditioning=True)
    model = build_model(cfg, attn_backend="math")
    assert sum(p.numel() for p in model.parameters()) == model_params(cfg)["total"]
    with FlopCounterMode(display=False) as counter:
        images, ids = _inputs(cfg, torch.float32)
        stand_in_loss(model(images, ids)).backward()
    assert rils_step_flops(cfg, BATCH, BATCH, recon_backend="reference")["total"] == counter.get_total_flops()


def test_planner_counts_the_momentum_branch():
    from rils_scale.train.capacity import PlanConfig, communication_bytes, memory_per_gpu
    from rils_scale.train.flops import model_params
    rils_cfg = get_config("vit_b16", decoder_text_conditioning=True)
    semmim_cfg = get_config("vit_b16", recipe="semmim", decoder_text_conditioning=True)
    kw = dict(gpus=16, tensor_parallel=2, zero_stage=3, micro_batch=64)
    rils, semmim = memory_per_gpu(PlanConfig(rils_cfg, **kw)), memory_per_gpu(PlanConfig(semmim_cfg, **kw))
    p = model_params(semmim_cfg)
    per_rank = p["momentum_sharded"] / 2 + (p["momentum"] - p["momentum_sharded"])
    assert rils["momentum"] == 0
    assert semmim["momentum"] == pytest.approx((2 + 4) * per_rank / 8)  # bf16 weights + fp32 EMA, over DP
    assert semmim["activations_by_tower"]["fusion"] > 0 and semmim["peak"] > rils["peak"]
    zero2 = memory_per_gpu(PlanConfig(semmim_cfg, **dict(kw, zero_stage=2)))
    assert zero2["momentum"] == pytest.approx(6 * per_rank)  # replicated over DP below stage 3
    comm = communication_bytes(PlanConfig(semmim_cfg, **kw))["zero3_param_allgather"]
    assert comm > communication_bytes(PlanConfig(rils_cfg, **kw))["zero3_param_allgather"]


def test_recipe_defaults_and_checks():
    from rils_scale.train.config import parse_args
    base = ["--ds_config", "x.json"]
    rils = parse_args(base)
    assert rils.recipe == "rils" and rils.mask_strategy == "random" and not rils.decoder_text_conditioning
    semmim = parse_args(base + ["--recipe", "semmim"])
    assert semmim.mask_strategy == "text-guided" and semmim.decoder_text_conditioning
    assert parse_args(base + ["--recipe=semmim", "--mask-strategy", "random"]).mask_strategy == "random"
    with pytest.raises(SystemExit):
        parse_args(base + ["--recipe", "semmim", "--recon-target", "pixel"])
    with pytest.raises(SystemExit):
        parse_args(base + ["--recipe", "dino"])


# ------------------------------------------------------------------------------ TP = 2 vs TP = 1
TOL64 = dict(rtol=1e-9, atol=1e-11)


def _tp_step(cfg, spec, tp_rank, tp_size):
    model_parallel_seed(SEED, tp_rank, tp_size)
    model = build_model(cfg, spec, attn_backend="math").double().train()
    out = _forward(model, cfg, torch.float64)
    loss_fn = SemMIMLoss(SemMIMLossConfig(), K, tp_group=spec.tp_group)
    loss, metrics = loss_fn(out)
    loss.backward()
    return model, out, loss, metrics, loss_fn


def _tp_worker(rank, world):
    state = init_parallel_state(tensor_parallel=2)
    cfg = semmim_tiny()
    ref_model, ref_out, ref_loss, ref_metrics, ref_fn = _tp_step(cfg, ParallelSpec(), 0, 1)
    ref_params = dict(ref_model.named_parameters())
    for sp, ac in ((False, False), (True, True)):
        label = f"SemMIM TP=2 sp={sp} ac={ac}"
        spec = ParallelSpec(state.tp_group, sequence_parallel=sp, activation_checkpointing=ac)
        model, out, loss, metrics, fn = _tp_step(cfg, spec, state.tp_rank, 2)
        for key in ref_out:
            torch.testing.assert_close(out[key], ref_out[key], **TOL64, msg=lambda m: f"{label} {key}: {m}")
        # the losses sum in float32 (like RILSLoss); the TP row split changes the order of the sums
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0, msg=lambda m: f"{label} loss: {m}")
        for key in ("agreement_loss", "code_ppl_patch", "code_ppl_global", "code_row_ppl_patch"):
            torch.testing.assert_close(metrics[key], ref_metrics[key], rtol=1e-6, atol=0,
                                       msg=lambda m: f"{label} {key}: {m}")
        for name in ("center_global", "center_patch"):
            torch.testing.assert_close(getattr(fn, name), getattr(ref_fn, name), rtol=1e-6, atol=1e-8)
        names, params = zip(*model.named_parameters())
        specs = [shard_spec(p) for p in params]
        fulls = gather_full_tensors(params, specs, state.tp_group)
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        grads = gather_full_tensors([params[i].grad for i in trainable], [specs[i] for i in trainable], state.tp_group)
        for name, full in zip(names, fulls):
            assert torch.equal(full, ref_params[name].detach()), f"{label} {name}: init is not the slice of TP=1's"
        for i, grad in zip(trainable, grads):
            ref_grad = ref_params[names[i]].grad
            scale = ref_grad.abs().max().clamp(min=1.0)
            # float32 loss sums scale every gradient by the same rounded factors on both sides
            torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-9 * scale,
                                       msg=lambda m: f"{label} grad {names[i]}: {m}")


def test_semmim_tp2_matches_tp1():
    spawn(_tp_worker, 2)


# ------------------------------------------------------------------------------ ZeRO-3 x TP x DP EMA
BF16_ZERO3 = {
    "train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
    "steps_per_print": 1000000, "bf16": {"enabled": True},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-8, "weight_decay": 0.05,
                                              "torch_adam": True}},
    # persistence threshold between the tiny model's vectors (64) and matrices (>= 4096): both paths
    "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                          "reduce_bucket_size": 10000000, "stage3_prefetch_bucket_size": 10000000,
                          "stage3_param_persistence_threshold": 300},
}
EMA_STEPS = 3


def _ema_worker(rank, world, tmp):
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param
    from rils_scale.checkpoint.layout import tensor_parallel_layout_for
    from rils_scale.checkpoint.momentum import open_momentum_state
    from rils_scale.models.param_groups import optimizer_groups
    from rils_scale.parallel import DeepSpeedMPU
    from rils_scale.parallel.deepspeed_utils import zero_init_context
    from rils_scale.train.ema import MomentumEMA, momentum_at, rank_state_path

    state = init_parallel_state(tensor_parallel=2)
    cfg = semmim_tiny()
    model_parallel_seed(1, state.tp_rank, state.tp_size)
    with zero_init_context(state, BF16_ZERO3, enabled=True):
        model = build_model(cfg, ParallelSpec(state.tp_group))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=optimizer_groups(model, 0.05),
                                           config=BF16_ZERO3, mpu=DeepSpeedMPU(state))
    module = engine.module
    params = dict(module.named_parameters())
    pairs = module.momentum_pairs()
    assert any(getattr(params[m], "ds_persist", False) for _, m in pairs), "no persistent parameter exercised"
    assert not all(getattr(params[m], "ds_persist", False) for _, m in pairs)
    ema = MomentumEMA(module, 0.996, total_steps=10)
    loss_fn = SemMIMLoss(SemMIMLossConfig(), K, dp_group=state.dp_group, tp_group=state.tp_group)
    specs = {o: shard_spec(params[o]) for o, _ in pairs}

    def consolidated_online():
        """TP = 1 fp32 masters of the online parameters the momentum branch follows (collective)."""
        locals_ = [safe_get_full_fp32_param(params[o]) for o, _ in pairs]
        fulls = gather_full_tensors(locals_, [specs[o] for o, _ in pairs], state.tp_group)
        return {m: f.float() for (_, m), f in zip(pairs, fulls)}

    ref = consolidated_online()  # a plain EMA, as one process would run it
    init = {k: v.clone() for k, v in ref.items()}
    ref_bf16 = {k: v.bfloat16() for k, v in ref.items()}  # what a bf16 EMA would hold
    for step in range(EMA_STEPS):
        images, ids = _inputs(cfg, torch.bfloat16, seed=10 * step + state.dp_rank)
        out = engine(images, ids, mask_generator=torch.Generator().manual_seed(step), mask_strategy="text-guided")
        assert out["teacher_global"].dtype == torch.bfloat16  # the teacher runs in the compute dtype
        loss, _ = loss_fn(out)
        engine.backward(loss)
        engine.step()
        m = ema.update(step)
        assert m == momentum_at(step, 10, 0.996)
        online = consolidated_online()
        for k in ref:
            ref[k].mul_(m).add_(online[k], alpha=1 - m)
            ref_bf16[k] = (m * ref_bf16[k].float() + (1 - m) * online[k]).bfloat16()
    # the momentum parameters hold the fp32 EMA in the compute dtype (gathered: persistent or not)
    for s in ema.slots:
        assert torch.equal(s.momentum.ds_tensor, s.ema.to(torch.bfloat16).view_as(s.momentum.ds_tensor)), s.name
    ema.write(rank_state_path(tmp, state.dp_rank, state.tp_rank), {"center.global": loss_fn.center_global,
              "center.patch": loss_fn.center_patch}, step=EMA_STEPS, dp_size=state.dp_size, tp_size=state.tp_size)
    dist.barrier()
    saved = open_momentum_state(tmp)
    assert (saved.dp_size, saved.tp_size, saved.step) == (2, 2, EMA_STEPS)
    with deepspeed.zero.GatheredParameters([params[m] for _, m in pairs]):
        for _, m in pairs:  # what forward sees == the bf16 of this TP rank's consolidated EMA
            local = saved.readers[state.tp_rank].get(m)
            assert torch.equal(params[m].data, local.to(torch.bfloat16)), m
    layout = tensor_parallel_layout_for(cfg, 2)
    moved = lost = total = 0
    for _, m in pairs:
        spec = layout.get(m)
        shards = [r.get(m) for r in saved.readers]
        got = merge_shards(shards, spec.partition_dim, spec.stride, spec.vocab_size) if spec else shards[0]
        if spec is None:
            assert torch.equal(shards[0], shards[1]), f"{m}: replicated EMA differs between TP ranks"
        torch.testing.assert_close(got, ref[m], rtol=1e-6, atol=1e-7 * max(1.0, ref[m].abs().max().item()),
                                   msg=lambda msg: f"{m}: consolidated EMA != plain EMA: {msg}")
        if m.endswith("weight") and ref[m].dim() == 2:
            changed = ref[m] != init[m]
            moved += int(changed.sum())
            lost += int((changed & (ref_bf16[m] == init[m].bfloat16())).sum())
            total += changed.numel()
    # the point of the fp32 buffer: at m = 0.996 a bf16 EMA keeps (almost) none of these updates
    assert moved > 0.9 * total and lost > 0.5 * moved, (moved, lost, total)
    centers = saved.centers()
    assert torch.equal(centers["center.patch"], loss_fn.center_patch.cpu())


def test_zero3_tp2_dp2_bf16_ema_equals_a_plain_ema_of_the_online_weights(tmp_path):
    pytest.importorskip("deepspeed")
    spawn(_ema_worker, 4, str(tmp_path))
