"""Analytical FLOPs (rils_scale.train.flops) against torch's FlopCounterMode.

The counter sees every matmul / conv / bmm the model and a stand-in loss dispatch, forward
and backward: the two encoder passes, decoder, text tower, the three uses of
image_projection, the contrastive logits (local form, both directions, as
objectives/contrastive.py) and the reference KL over masked rows. The reference KL stores
its logits, so it matches ``recon_backend="reference"``; the streaming backward recomputes
them (``recon_recompute``), which is not model FLOPs and not in ``total``.
Attention runs with the "math" backend: the counter has no formula for the CPU SDPA kernel.
vit_b16 runs on the meta device (shapes only), so it costs no compute.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from rils_scale.models import build_model, get_config
from rils_scale.ops import patch_sentence_kl_reference
from rils_scale.train.flops import masked_patches, model_params, rils_step_flops, visible_tokens


def stand_in_loss(out):
    img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
    labels = torch.arange(img.shape[0], device=img.device)
    clip = 0.5 * (F.cross_entropy(scale * img @ txt.T, labels) + F.cross_entropy(scale * txt @ img.T, labels))
    mask = out["mask"]
    b, n, e = out["student_patches"].shape
    n_masked = int(round(float(n * 0.75))) if mask.is_meta else int(mask[0].sum())
    idx = mask.argsort(dim=1, descending=True, stable=True)[:, :n_masked]  # the masked positions
    idx = idx.unsqueeze(-1).expand(-1, -1, e)
    student = torch.gather(out["student_patches"], 1, idx).reshape(-1, e)
    teacher = torch.gather(out["teacher_patches"], 1, idx).reshape(-1, e)
    kl = patch_sentence_kl_reference(student, teacher, txt.detach(), student_temp=0.1, teacher_temp=0.04)
    return clip + 0.5 * kl.mean()


def counted_flops(name: str, batch: int, device: str) -> int:
    torch.manual_seed(0)
    cfg = get_config(name)
    model = build_model(cfg, attn_backend="math").to(device)
    images = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, device=device)
    tokens = torch.randint(1, cfg.text.vocab_size, (batch, cfg.text.context_length), device=device)
    with FlopCounterMode(display=False) as counter:
        stand_in_loss(model(images, tokens)).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name,batch,device", [("tiny", 4, "cpu"), ("vit_b16", 2, "meta")])
def test_analytical_flops_match_flop_counter(name, batch, device):
    cfg = get_config(name)
    analytic = rils_step_flops(cfg, batch, batch, recon_backend="reference")
    counted = counted_flops(name, batch, device)
    rel = abs(analytic["total"] - counted) / counted
    print(f"{name} B={batch}: analytical {analytic['total']:.6e}  counter {counted:.6e}  rel {rel:.2e}")
    assert rel < 0.05
    assert rel < 1e-3, "the formulas are exact for matmul FLOPs; a gap means the model changed"


def test_components_vit_b16():
    cfg = get_config("vit_b16")
    assert visible_tokens(cfg) == 1 + 49 and masked_patches(cfg) == 147
    f = rils_step_flops(cfg, 1, 1)
    # one ViT-B/16 forward at 224 px is 17.56 GMACs = 35.1 GFLOPs (timm / fvcore figure)
    assert f["unmasked_encoder"] == pytest.approx(35.13e9, rel=1e-3)
    # masked pass on 50 tokens: about a quarter of the unmasked one
    assert 0.24 < f["masked_encoder"] / f["unmasked_encoder"] < 0.26
    # attention is ~4 % of the encoder at N = 197 (DESIGN §8)
    att = 12 * 4 * 197 ** 2 * 768
    assert 0.03 < att / f["unmasked_encoder"] < 0.05
    # backward: 2x except the patch conv weight-only and the KL (teacher 0x, student 1x)
    assert f["backward"] < 2 * f["forward"]
    assert f["backward_components"]["reconstruction"] == f["reconstruction"] / 2


def test_reconstruction_scaling_and_switches():
    cfg = get_config("vit_b16")
    b, g, e = 256, 32768, cfg.embed_dim
    f = rils_step_flops(cfg, b, g)
    p = b * 147
    assert f["reconstruction"] == pytest.approx(2 * 2 * p * g * e)  # teacher + student products
    # DESIGN §8: at B=256/GPU, G=32k the KL's three products (teacher, student, student
    # gradient) are 3.8 TFLOP, 8.5 % of the step's model FLOPs
    kl = f["reconstruction"] + f["backward_components"]["reconstruction"]
    assert kl == pytest.approx(3 * 2 * p * g * e) and kl == pytest.approx(3.79e12, rel=1e-2)
    assert 0.08 < kl / f["total"] < 0.09
    half = rils_step_flops(cfg, b, g, recon_rows_fraction=0.5)
    assert half["reconstruction"] == pytest.approx(f["reconstruction"] / 2)
    pg = rils_step_flops(cfg, b, g, prototype_grad=True)
    assert pg["total"] - f["total"] == pytest.approx(2 * p * g * e)
    assert f["recon_recompute"] == pytest.approx(2 * 2 * p * g * e)
    assert rils_step_flops(cfg, b, g, recon_backend="reference")["recon_recompute"] == 0


def test_checkpointing_and_tensor_parallel():
    cfg = get_config("vit_l16")
    base = rils_step_flops(cfg, 32, 32 * 64)
    ck = rils_step_flops(cfg, 32, 32 * 64, activation_checkpointing=True)
    assert ck["total"] == base["total"]  # model FLOPs do not change
    blocks = ck["recompute"]
    # every block but not the loss/projections, and not fc2 (a third of a block's linear FLOPs:
    # the checkpoint's recompute stops at the last tensor backward needs)
    assert 0.6 * base["forward"] < blocks < 0.75 * base["forward"]
    tp2 = rils_step_flops(cfg, 32, 32 * 64, tensor_parallel=2)
    assert base["total"] / 2 < tp2["total"] < 0.52 * base["total"]


def test_recompute_of_each_checkpointing_policy_matches_flop_counter():
    """Selective (first half of every stack) and every-block checkpointing: the counter sees the
    recomputed forwards in backward (up to fc2: torch's checkpoint stops early); their excess over
    no checkpointing is ``recompute``."""
    from rils_scale.models import ParallelSpec
    cfg, batch = get_config("tiny"), 4

    def counted(fraction):
        torch.manual_seed(0)
        model = build_model(cfg, ParallelSpec(activation_checkpointing=fraction), attn_backend="math")
        images = torch.randn(batch, 3, 32, 32)
        tokens = torch.randint(1, cfg.text.vocab_size, (batch, cfg.text.context_length))
        with FlopCounterMode(display=False) as counter:
            stand_in_loss(model(images, tokens)).backward()
        return counter.get_total_flops()

    none = counted(0.0)
    for fraction in (0.5, 1.0):
        recompute = rils_step_flops(cfg, batch, batch, activation_checkpointing=fraction)["recompute"]
        assert counted(fraction) - none == pytest.approx(recompute, rel=1e-9), fraction
    assert rils_step_flops(cfg, batch, batch, activation_checkpointing=True)["recompute"] == recompute
    half = rils_step_flops(cfg, batch, batch, activation_checkpointing=0.5)["recompute"]
    assert 0.5 * recompute < half < recompute  # tiny: 1 of 2 blocks, and the 1-block decoder


def test_dropped_rows_are_executed_not_model_flops():
    cfg = get_config("vit_b16")
    full, half = rils_step_flops(cfg, 256, 32768), rils_step_flops(cfg, 256, 32768, recon_rows_fraction=0.5)
    assert full["recon_uncounted"] == 0
    assert half["recon_uncounted"] > 0 and half["total"] < full["total"]  # model FLOPs: kept rows only
    # executed: every masked row, kept or not
    assert half["total_with_recompute"] == pytest.approx(full["total_with_recompute"], rel=1e-12)


def test_model_params_match_module():
    for name in ("tiny", "vit_b16"):
        cfg = get_config(name)
        model = build_model(cfg)
        assert sum(p.numel() for p in model.parameters()) == model_params(cfg)["total"]
    assert model_params(get_config("vit_b16"))["total"] == 157_730_049


def test_cached_and_cheap(monkeypatch):
    """Repeated calls with the same arguments compute once (a cache hit, counted, not timed:
    a wall-clock bound failed on a busy CI machine), and callers get copies."""
    from rils_scale.train import flops
    calls = []
    compute = flops._compute
    monkeypatch.setattr(flops, "_compute", lambda *a: (calls.append(a), compute(*a))[1])
    flops._CACHE.clear()
    cfg = get_config("vit_h14")
    for _ in range(1000):
        rils_step_flops(cfg, 64, 64 * 256, activation_checkpointing=True, tensor_parallel=2)
    assert len(calls) == 1
    a = rils_step_flops(cfg, 64, 64 * 256)
    a["total"] = -1
    assert rils_step_flops(cfg, 64, 64 * 256)["total"] > 0  # callers get copies
    assert len(calls) == 2


def test_hardware_peaks_and_mfu():
    from rils_scale.train import hardware as hw
    assert hw.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert hw.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert hw.peak_tflops("NVIDIA H200", "bfloat16") == 989.0
    assert hw.peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert hw.peak_tflops("NVIDIA A10", "bf16") == 125.0  # not confused with A100
    assert hw.peak_tflops("NVIDIA L40S", "bf16") == 362.05 and hw.peak_tflops("NVIDIA L4", "bf16") == 121.0
    assert hw.peak_tflops("Tesla V100-SXM2-32GB", "fp16") == 125.0
    assert hw.peak_tflops("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 tensor cores
    assert hw.peak_tflops("cpu: AMD EPYC", "bf16") is None
    with pytest.raises(ValueError):
        hw.peak_tflops("NVIDIA H100", "int3")
    assert hw.mfu(989e12 * 0.5, 1.0, 989.0) == pytest.approx(0.5)
    assert hw.mfu(1e12, 1.0, None) is None
    meter = hw.ThroughputMeter(flops_per_step=2e12, samples_per_step=64, peak_tflops=10.0)
    m = meter.update(0.5)
    assert m == {"step_s": 0.5, "samples_per_s": 128.0, "tflops_per_device": 4.0, "mfu": pytest.approx(0.4)}
    assert hw.peak_memory_bytes() > 10 * 2 ** 20 and hw.device_name().startswith("cpu")


def test_kl_flops_count_what_is_executed():
    """KL convention (FlashAttention's): forward 2 logit GEMMs; backward 2 recomputed logit
    GEMMs + dS = G·T (+ dT = Gᵀ·S when the prototypes take a gradient)."""
    from rils_scale.train.flops import kl_flops
    p, m, d = 37_632, 32_768, 512
    gemm = 2 * p * m * d
    f = kl_flops(p, m, d)
    assert f["forward"] == 2 * gemm and f["backward"] == 3 * gemm and f["total"] == 5 * gemm
    assert f["recompute"] == 2 * gemm and f["model_backward"] == gemm
    g = kl_flops(p, m, d, prototype_grad=True)
    assert g["backward"] == 4 * gemm and g["total"] == 6 * gemm  # 2 + (2 recompute + 2 products)
    assert g["total"] == pytest.approx(7.576e12, rel=1e-3)
    r = kl_flops(p, m, d, backend="reference")  # stores its logits: nothing recomputed
    assert r["recompute"] == 0 and r["total"] == 3 * gemm
    for name in ("triton", "hybrid", "cuda", "auto", "streaming_chunked"):
        assert kl_flops(p, m, d, backend=name)["total"] == 5 * gemm
    # the step's reconstruction entries are the same numbers
    cfg = get_config("vit_b16")
    step = rils_step_flops(cfg, 256, 32768, recon_backend="hybrid")
    kl = kl_flops(256 * masked_patches(cfg), 32768, cfg.embed_dim)
    assert step["reconstruction"] == kl["forward"] and step["recon_recompute"] == kl["recompute"]
    assert step["backward_components"]["reconstruction"] == kl["model_backward"]
