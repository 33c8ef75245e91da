"""The method's switches: per-tower activation (text QuickGELU as the release), the logit-scale
cap after the step, the pixel / vision reconstruction targets against float64 references,
the text-conditioned decoder at TP = 2 against TP = 1, and probes on encoder features."""
from __future__ import annotations

import json
import math

import pytest
import torch

from distributed_utils import spawn
from make_quick_gelu_reference import REFERENCE, build_tower, reference_forward, tiny_text_config, token_ids
from rils_scale.models import RILSConfig, build_model, get_config, list_presets
from rils_scale.models.rils import LogitScale, normalized_pixel_targets, patchify
from rils_scale.objectives import LossConfig, RILSLoss
from rils_scale.objectives.feature_targets import FeatureReconstructionLoss
from rils_scale.train.param_clamp import clamp_logit_scale_, clamp_parameter_


# ------------------------------------------------------------------ 1. text activation
def test_text_tower_quick_gelu_matches_stored_release_style_reference():
    with open(REFERENCE) as f:
        stored = torch.tensor(json.load(f)["sentence_features"], dtype=torch.float64)
    tower = build_tower("quick_gelu")
    with torch.no_grad():
        got = tower(token_ids())
        live = reference_forward(tower.state_dict(), token_ids(), tiny_text_config())
    torch.testing.assert_close(got, stored, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(live, stored, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # the activation really is in play: exact GELU moves the features
        gelu = build_tower("gelu")(token_ids())
    assert (gelu - stored).abs().max() > 1e-4


def test_presets_use_quick_gelu_text_and_gelu_vision_and_old_configs_load_as_gelu():
    for name in list_presets():
        cfg = get_config(name)
        assert (cfg.text.activation, cfg.vision.activation) == ("quick_gelu", "gelu"), name
    saved = get_config("tiny").to_dict()
    assert RILSConfig.from_dict(saved).text.activation == "quick_gelu"  # round trip keeps it
    for tower in ("vision", "text"):  # a config saved before the field existed: built with GELU
        del saved[tower]["activation"]
    old = RILSConfig.from_dict(saved)
    assert (old.text.activation, old.vision.activation) == ("gelu", "gelu")
    assert (old.recon_target, old.decoder_text_conditioning) == ("language", False)


# ------------------------------------------------------------------ 2. logit-scale cap
def test_logit_scale_stays_capped_and_can_come_back_down():
    cap = math.log(100.0)
    scale = LogitScale(4.5, cap)
    opt = torch.optim.Adam(scale.parameters(), lr=0.2)
    for _ in range(10):  # push it up, hard
        opt.zero_grad()
        (-scale()).backward()
        opt.step()
        clamp_parameter_(scale.value, cap)
        assert scale.value.item() <= cap + 1e-6  # (float32 rounding of ln 100)
        assert not clamp_parameter_(scale.value, cap, report=True)  # a second clamp finds nothing above the cap
    assert scale.value.item() == pytest.approx(cap)
    opt.zero_grad()
    scale().backward()
    assert scale.value.grad.abs().item() > 1.0  # at the cap the gradient still speaks (d exp(v)/dv = 100)
    for _ in range(20):  # now pull it down (Adam's momentum first has to turn)
        opt.zero_grad()
        scale().backward()
        opt.step()
        clamp_parameter_(scale.value, cap)
    assert scale.value.item() < cap - 0.5  # it came back down
    # forward is capped even for a parameter set above the cap elsewhere
    with torch.no_grad():
        scale.value.fill_(7.0)
    assert scale().item() == pytest.approx(100.0)
    model = build_model(get_config("tiny"))
    with torch.no_grad():
        model.logit_scale.value.fill_(9.0)
    assert clamp_logit_scale_(model, report=True) and model.logit_scale.value.item() == pytest.approx(cap)


ZERO3_BF16 = {
    "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 6,
    "optimizer": {"type": "Adam", "params": {"lr": 0.3, "torch_adam": True}},
    "bf16": {"enabled": True},
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}


def _zero3_clamp_worker(rank, world):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logit_scale = LogitScale(4.4, math.log(100.0))
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x).sum() * 0 - self.logit_scale()  # pushes the scale up

    toy = Toy()
    engine, _, _, _ = deepspeed.initialize(model=toy, model_parameters=toy.parameters(), config=ZERO3_BF16)
    param = engine.module.logit_scale.value
    assert param.ds_tensor.numel() < 2 or world == 1
    x = torch.ones(1, 4, dtype=torch.bfloat16)
    hits = 0
    for _ in range(6):
        engine.backward(engine(x))
        engine.step()
        hits += clamp_logit_scale_(engine, report=True)
        master = safe_get_full_fp32_param(param)
        with deepspeed.zero.GatheredParameters([param]):
            seen = float(param.data.float().max())
        assert float(master.max()) <= math.log(100.0) + 1e-6 and seen <= math.log(100.0) + 1e-2
    assert rank == 1 or hits >= 5  # the steps did push it past the cap (rank 1 holds only padding)


def test_logit_scale_clamp_under_zero3_bf16_reaches_the_master_copy():
    pytest.importorskip("deepspeed")
    spawn(_zero3_clamp_worker, 2)


# ------------------------------------------------------------------ new objectives
def test_patchify_and_pixel_targets_against_loops():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 8, 12, generator=g, dtype=torch.float64)
    x = patchify(images, 4)
    assert x.shape == (2, 6, 48)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                block = images[b, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].permute(1, 2, 0).reshape(-1)
                torch.testing.assert_close(x[b, i * 3 + j], block, rtol=0, atol=0)
    t = normalized_pixel_targets(images, 4)
    ref = (x - x.mean(-1, keepdim=True)) / torch.sqrt(((x - x.mean(-1, keepdim=True)) ** 2).sum(-1, keepdim=True) / 47 + 1e-6)
    torch.testing.assert_close(t, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("target", ["pixel", "vision"])
def test_feature_targets_loss_and_gradient_against_float64_formulas(target):
    g = torch.Generator().manual_seed(3)
    b, n, f = 3, 5, 7
    student = torch.randn(b, n, f, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(b, n, f, generator=g, dtype=torch.float64)
    mask = (torch.rand(b, n, generator=g) > 0.4).double()
    keep = torch.tensor([True, False, True])
    out = FeatureReconstructionLoss(target)(student, teacher, mask, keep)
    out.loss.backward()
    sel = (mask > 0) & keep[:, None]
    s, t = student.detach(), teacher
    if target == "pixel":
        per = ((s - t) ** 2).mean(-1)
        grad = 2 * (s - t) / f
    else:
        sn, tn = s / s.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
        per = 2 - 2 * (sn * tn).sum(-1)
        # d(2 - 2 s.t/|s||t|)/ds = -2 (tn - (sn.tn) sn) / |s|
        grad = -2 * (tn - (sn * tn).sum(-1, keepdim=True) * sn) / s.norm(dim=-1, keepdim=True)
    rows = int(sel.sum())
    assert out.rows == out.global_rows == rows
    torch.testing.assert_close(out.loss, per[sel].sum() / rows, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(student.grad, grad * sel[..., None] / rows, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("target", ["pixel", "vision"])
def test_model_and_rils_loss_wire_the_feature_targets(target):
    torch.manual_seed(0)
    cfg = get_config("tiny", recon_target=target)
    model = build_model(cfg, attn_backend="math").double()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ids = torch.randint(4, 1000, (2, 32))
    ids[:, 8:] = 0
    out = model(images, ids, mask_generator=torch.Generator().manual_seed(1))
    if target == "pixel":
        torch.testing.assert_close(out["teacher_patches"], normalized_pixel_targets(images, 4))
        assert out["student_patches"].shape == (2, 64, 48)
    else:
        torch.testing.assert_close(out["teacher_patches"], model.visual(images)[:, 1:])
        assert not out["teacher_patches"].requires_grad
    loss, metrics = RILSLoss(LossConfig(recon_target=target, kl_backend="reference"))(out)
    ref = FeatureReconstructionLoss(target)(out["student_patches"], out["teacher_patches"], out["mask"],
                                            torch.ones(2, dtype=torch.bool)).loss
    torch.testing.assert_close(metrics["recon_loss_share"].double(), ref.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, metrics["clip_loss"].double() + 0.5 * ref, rtol=1e-6, atol=0)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------ 7. text-conditioned decoder, TP=2
def _tp_step(cfg, spec, tp_rank, tp_size):
    """test_tensor_parallel._step with the loss matching the model's reconstruction target."""
    from test_tensor_parallel import MASK_SEED, SEED, _inputs
    from rils_scale.parallel import model_parallel_seed
    model_parallel_seed(SEED, tp_rank, tp_size)
    model = build_model(cfg, spec).to(torch.float64).train()
    images, ids = _inputs(cfg, torch.float64)
    out = model(images, ids, mask_generator=torch.Generator().manual_seed(MASK_SEED))
    loss, _ = RILSLoss(LossConfig(retrieval_filter=False, kl_backend="reference", recon_target=cfg.recon_target),
                       tp_group=spec.tp_group)(out)
    loss.backward()
    return model, out, loss


def _tp_worker(rank, world):
    from test_tensor_parallel import TOL, _compare
    from rils_scale.models.transformer import ParallelSpec
    from rils_scale.parallel import init_parallel_state
    state = init_parallel_state(tensor_parallel=2)
    for target, cases in (("language", [(False, False), (True, True)]), ("pixel", [(True, False)]),
                          ("vision", [(False, False)])):
        cfg = get_config("tiny", decoder_text_conditioning=True, recon_target=target)
        ref = _tp_step(cfg, ParallelSpec(), 0, 1)
        for sp, ac in cases:
            spec = ParallelSpec(tp_group=state.tp_group, sequence_parallel=sp, activation_checkpointing=ac)
            got = _tp_step(cfg, spec, state.tp_rank, 2)
            _compare(f"text-conditioned {target} sp={sp} ac={ac}", state.tp_group, got, ref, TOL[torch.float64])


def test_text_conditioned_decoder_tp2_matches_tp1():
    spawn(_tp_worker, 2)


def test_text_conditioning_changes_the_decoder_and_sees_the_caption():
    torch.manual_seed(0)
    model = build_model(get_config("tiny", decoder_text_conditioning=True), attn_backend="math")
    assert model.decoder.transformer.blocks[0].cross_attn is not None
    images = torch.randn(2, 3, 32, 32)
    ids = torch.randint(4, 1000, (2, 32))
    ids[:, 8:] = 0
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    a = model(images, ids, mask_generator=gen())["student_patches"]
    ids2 = ids.clone()
    ids2[:, 3] = 5
    b = model(images, ids2, mask_generator=gen())["student_patches"]
    assert (a - b).abs().max() > 1e-4  # the caption reaches the decoder
    ids3 = ids.clone()
    ids3[:, 20] = 7  # a token after the end of text is padding: masked out of the cross-attention
    ids3[:, 8:20] = 0
    c = model(images, ids3, mask_generator=gen())
    assert c["student_patches"].shape == a.shape


# ------------------------------------------------------------------ 3. probe features
def test_probe_reads_encoder_features_by_default(tmp_path):
    from rils_scale.data.shards import ShardWriter
    from rils_scale.eval.data import extract_features
    from rils_scale.eval.runner import evaluate
    from PIL import Image

    class Wrapped(torch.nn.Module):  # what load_model returns, minus the checkpoint
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.inner = build_model(get_config("tiny"))
            self.cfg = self.inner.cfg

        def encode_image(self, x):
            return self.inner.encode_image(x)

        def encode_image_features(self, x):
            return self.inner.encode_image_features(x)

    for split in ("train", "test"):
        with ShardWriter(tmp_path / split, 100) as w:
            for i in range(12):
                w.write(Image.new("RGB", (32, 32), (20 * i, 100, 200 - 10 * i)), f"c{i % 2}",
                        {"label": i % 2, "class_name": f"c{i % 2}"}, ext="png")
    model = Wrapped().to(torch.bfloat16)  # a bf16 model: eval must cast the fp32 pixels
    feats = extract_features(model, str(tmp_path / "test"), with_text=False, with_encoder=True)
    assert feats.image.shape == (12, 64) and feats.encoder.shape == (12, 64)
    assert not torch.allclose(feats.image, feats.encoder)
    logs = []
    res = evaluate(model, data=str(tmp_path / "test"), train_data=str(tmp_path / "train"),
                   tasks=["linear_probe", "few_shot"], shots=[2], seeds=[0], probe_c=1.0, log=logs.append)
    assert res["tasks"]["linear_probe"]["features"] == res["tasks"]["few_shot"]["features"] == "encoder"
    assert any("encoder features" in line for line in logs)
    res = evaluate(model, data=str(tmp_path / "test"), train_data=str(tmp_path / "train"),
                   tasks=["linear_probe"], probe_c=1.0, probe_features="joint", log=logs.append)
    assert res["tasks"]["linear_probe"]["features"] == "joint"
