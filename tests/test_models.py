"""Model math: masking, position embeddings, attention paths, presets, gradients."""
import math

import numpy as np
import pytest
import torch

from rils_scale.models import ParallelSpec, build_model, get_config, list_presets
from rils_scale.models.attention import attention
from rils_scale.models.vision import random_masking, sincos_2d_position_embedding


def _batch(cfg, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ids = torch.randint(3, cfg.text.vocab_size, (b, cfg.text.context_length), generator=g)
    for i in range(b):  # variable caption lengths, padding 0
        ids[i, 5 + 3 * i:] = 0
    return images, ids


def test_random_masking_properties():
    ids_keep, mask, ids_restore = random_masking(16, 64, 0.75, generator=torch.Generator().manual_seed(0))
    assert ids_keep.shape == (16, 16)
    assert torch.all(mask.sum(1) == 48)
    # kept ids are exactly the unmasked positions
    for b in range(16):
        assert set(ids_keep[b].tolist()) == set((mask[b] == 0).nonzero().squeeze(1).tolist())
    # restore is the inverse permutation of the shuffle
    assert torch.equal(torch.sort(ids_restore, dim=1).values, torch.arange(64).expand(16, -1))
    # same generator seed -> same mask; different seed -> different
    _, mask2, _ = random_masking(16, 64, 0.75, generator=torch.Generator().manual_seed(0))
    _, mask3, _ = random_masking(16, 64, 0.75, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mask, mask2) and not torch.equal(mask, mask3)
    # every position is masked at rate ~0.75 over many samples
    _, big, _ = random_masking(4000, 64, 0.75, generator=torch.Generator().manual_seed(2))
    assert abs(big.mean().item() - 0.75) < 1e-6
    assert big.mean(0).min() > 0.7 and big.mean(0).max() < 0.8


def test_text_guided_masking_prefers_relevant_patches():
    """Patches with high caption similarity are masked far more often than at random."""
    b, n = 2000, 64
    scores = torch.zeros(b, n)
    scores[:, :8] = 0.3  # 8 "relevant" patches
    _, mask, _ = random_masking(b, n, 0.75, generator=torch.Generator().manual_seed(0), scores=scores,
                                temperature=0.1)
    relevant_rate = mask[:, :8].mean().item()
    other_rate = mask[:, 8:].mean().item()
    assert torch.all(mask.sum(1) == 48)  # same mask ratio as random
    assert relevant_rate > 0.97 and other_rate < 0.75
    # Exact rule: Gumbel top-k = sampling without replacement from softmax(scores / T).
    # The probability that one relevant patch is masked first equals its softmax share.
    w = torch.exp(scores[0] / 0.1)
    assert math.isclose((w[:8].sum() / w.sum()).item(), 8 * math.e ** 3 / (8 * math.e ** 3 + 56), rel_tol=1e-5)


def test_sincos_matches_mae_formula():
    dim, grid = 16, 4
    emb = sincos_2d_position_embedding(dim, grid)
    assert emb.shape == (1 + grid * grid, dim) and torch.all(emb[0] == 0)
    # MAE: grid = meshgrid(w, h); first half encodes grid[0] (w coordinate), second half h
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4.0))
    for h in range(grid):
        for w in range(grid):
            row = emb[1 + h * grid + w].double().numpy()
            exp = np.concatenate([np.sin(w * omega), np.cos(w * omega), np.sin(h * omega), np.cos(h * omega)])
            np.testing.assert_allclose(row, exp, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_backends_agree(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64) for _ in range(3))
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    for mask in (None, pad):
        a = attention(q, k, v, causal=causal, key_padding_mask=mask, backend="sdpa")
        b = attention(q, k, v, causal=causal, key_padding_mask=mask, backend="math")
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_attention_module_flag_flip_same_output():
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg).double().eval()
    images, ids = _batch(cfg)
    ref = model.encode_image(images.double())
    for block in model.visual.transformer.blocks:
        block.attn.attn_backend = "math"
    torch.testing.assert_close(model.encode_image(images.double()), ref, rtol=1e-10, atol=1e-10)


def test_forward_backward_every_parameter_gets_gradient():
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    images, ids = _batch(cfg)
    out = model(images, ids, mask_generator=torch.Generator().manual_seed(0))
    n = cfg.vision.num_patches
    assert out["student_patches"].shape == (4, n, cfg.embed_dim)
    assert out["mask"].sum().item() == 4 * (n - int(n * 0.25))
    for key in ("image_features", "text_features", "student_patches", "teacher_patches"):
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(out[key].shape[:-1]))
    loss = (out["image_features"] * out["text_features"]).sum() + out["student_patches"].sum() \
        + out["logit_scale"]
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_beit_qkv_bias_and_release_details():
    cfg = get_config("tiny")
    model = build_model(cfg)
    attn = model.visual.transformer.blocks[0].attn
    assert attn.qkv.bias is None and attn.q_bias is not None and attn.v_bias is not None
    assert model.visual.norm.eps == 1e-6
    assert math.isclose(model.logit_scale().item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        model.logit_scale.value.fill_(10.0)
    assert math.isclose(model.logit_scale().item(), 100.0, rel_tol=1e-5)  # clamped at ln 100


def test_text_tower_pools_end_of_text_and_is_causal():
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg).double().eval()
    ids = torch.zeros(1, cfg.text.context_length, dtype=torch.long)
    ids[0, :4] = torch.tensor([1, 50, 60, 2])
    base = model.encode_text(ids)
    shorter = ids[:, :8]  # fewer trailing pads: causal attention and end-of-text pooling ignore them
    torch.testing.assert_close(model.encode_text(shorter), base)
    later = ids.clone()
    later[0, 4:6] = torch.tensor([70, 2])  # longer caption -> pooled at the new end
    assert not torch.allclose(model.encode_text(later), base)


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds_with_consistent_shapes(name):
    cfg = get_config(name)
    with torch.device("meta"):
        model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 0
    assert cfg.vision.width % cfg.vision.heads == 0 and cfg.text.width % cfg.text.heads == 0
    expected_millions = {"vit_b16": (140, 175), "vit_l16": (400, 480), "vit_h14": (900, 1100),
                         "vit_g14": (1300, 1500)}
    if name in expected_millions:
        lo, hi = expected_millions[name]
        assert lo < n_params / 1e6 < hi, n_params


def test_tiny_runs_with_activation_checkpointing_same_gradients():
    cfg = get_config("tiny")
    images, ids = _batch(cfg)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, ParallelSpec(activation_checkpointing=ckpt)).double()
        out = model(images.double(), ids, mask_generator=torch.Generator().manual_seed(0))
        (out["student_patches"].pow(2).sum() + (out["image_features"] * out["text_features"]).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(model.parameters())) - 1
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-12)
