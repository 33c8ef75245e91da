"""The compute dtype reaches attention and the block GEMMs (flash-attn needs bf16 q, k, v).

Two ways the trainer's bf16 can look: ``torch.autocast`` over fp32 weights (benchmarks, any
autocast user) and DeepSpeed's bf16 weights (``model.to(bfloat16)``, no autocast: the
trainer). In both, an fp32 parameter added to a bf16 activation used to promote q, k, v to
fp32; these tests spy on the attention call and on the blocks' matmuls.
"""
import pytest
import torch

from rils_scale.models import build_model, get_config
from rils_scale.models import transformer as transformer_mod


def _batch(cfg, b=2):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ids = torch.randint(3, cfg.text.vocab_size, (b, cfg.text.context_length), generator=g)
    ids[:, 6:] = 0
    return images, ids


def _spy(monkeypatch, model):
    """Record q, k, v dtypes at every attention call, and the input dtype of every matmul
    inside a transformer block (qkv, proj, fc1, fc2)."""
    seen = {"attention": [], "block_gemm": []}
    real_attention = transformer_mod.attention

    def attention(q, k, v, **kw):
        seen["attention"].append((q.dtype, k.dtype, v.dtype))
        return real_attention(q, k, v, **kw)

    monkeypatch.setattr(transformer_mod, "attention", attention)
    for block in (m for m in model.modules() if isinstance(m, transformer_mod.Block)):
        for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            lin.register_forward_pre_hook(lambda mod, args: seen["block_gemm"].append(args[0].dtype))
    return seen


def _run(model, cfg, autocast: bool, dtype):
    images, ids = _batch(cfg)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        out = model(images.to(dtype), ids, mask_generator=torch.Generator().manual_seed(0))
    return out


@pytest.mark.parametrize("mode", ["autocast", "bf16_weights"])
def test_attention_and_block_gemms_see_bf16(monkeypatch, mode):
    cfg = get_config("tiny")
    model = build_model(cfg)
    if mode == "bf16_weights":
        model = model.to(torch.bfloat16)  # what DeepSpeed's bf16 engine holds
    seen = _spy(monkeypatch, model)
    linear_inputs, real_linear = [], torch.nn.functional.linear

    def linear(x, w, b=None):  # every matmul through F.linear: blocks, heads, projections
        linear_inputs.append(x.dtype)
        return real_linear(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    out = _run(model, cfg, autocast=(mode == "autocast"),
               dtype=torch.float32 if mode == "autocast" else torch.bfloat16)
    # every block of both towers and the decoder called attention, all in bf16
    blocks = sum(1 for m in model.modules() if isinstance(m, transformer_mod.Attention))
    assert len(seen["attention"]) >= blocks > 0
    assert set(seen["attention"]) == {(torch.bfloat16,) * 3}, set(seen["attention"])
    # no fp32 activation reaches a block's matmul (autocast would cast it: an fp32 copy per GEMM)
    assert len(seen["block_gemm"]) == 4 * len(seen["attention"])  # the vision tower runs twice
    assert set(seen["block_gemm"]) == {torch.bfloat16}, set(seen["block_gemm"])
    if mode == "bf16_weights":  # no autocast to rescue an fp32 activation: everything is bf16
        assert linear_inputs and set(linear_inputs) == {torch.bfloat16}, set(linear_inputs)
    assert all(torch.isfinite(t.float()).all() for t in out.values() if torch.is_tensor(t))


def test_bias_in_compute_dtype_matches_fp32_reference():
    """The cast moves no math: bf16-weight forward stays close to the fp32 one (q/v bias on)."""
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    attn = next(m for m in model.modules() if isinstance(m, transformer_mod.Attention))
    assert attn.q_bias is not None
    with torch.no_grad():
        attn.q_bias.normal_(0, 0.5)
        attn.v_bias.normal_(0, 0.5)
    x = torch.randn(2, 9, attn.q_bias.numel() * attn.proj.weight.shape[0] // attn.q_bias.numel())
    ref = attn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attn(x)
    assert got.dtype == torch.bfloat16
    rel = (got.float() - ref).norm() / ref.norm()
    assert rel < 2e-2, rel


def test_eval_encodes_fp32_pixels_with_a_bf16_model():
    """Evaluation feeds loader pixels (fp32) to a possibly-bf16 model: cast to the model's dtype."""
    from rils_scale.eval.data import _encode_images
    cfg = get_config("tiny")
    model = build_model(cfg).eval()
    images, _ = _batch(cfg)
    ref, ref_enc = _encode_images(model, images, "cpu", with_encoder=True)
    got, got_enc = _encode_images(model.to(torch.bfloat16), images, "cpu", with_encoder=True)  # raised before
    for g, r in ((got, ref), (got_enc, ref_enc)):
        assert g.dtype == torch.float32 and g.shape == r.shape
        assert (g - r).norm() / r.norm() < 5e-2
