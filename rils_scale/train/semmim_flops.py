"""Analytical FLOPs of one SemMIM training step (per rank), the SemMIM side of ``train/flops.py``.

Same conventions as ``flops.py`` (matrix products only, 2 FLOPs per multiply-add, attention in
full, per micro-batch, ``total`` = model FLOPs per rank = the MFU numerator). What
``rils_scale.models.semmim.SemMIM.forward`` and ``objectives/semmim_loss.py`` compute:

- as RILS: the masked and unmasked online encoder passes, the decoder (plus its cross-attention
  to the caption's L tokens when text-conditioned), the text tower, the contrastive logits;
- text-guided masking: ``image_projection`` of the N unmasked patch tokens and their product with
  the caption embedding, without gradient (``text_guided_masking=True``, the recipe's default);
- the text-fusion block (self-attention + cross-attention + MLP on N tokens), online with
  gradient and its momentum copy without;
- the **momentum branch**, forward only: the vision encoder on all 1 + N tokens (no backward:
  it is an EMA, not trained by autograd), its fusion block, its code head on 1 + N rows;
- the code head online on 1 + M rows (pooled masked view, M = masked patches);
- the K-way cross-entropies over ``R = 1 + M`` rows per sample against K codes of width E_c:
  teacher and student logits in forward (2 products), ``dS = G C_s`` and ``dC_s = G^T S`` in
  backward (2 products). The streaming op also runs one more teacher-logit product in forward
  (its two-pass softmax) and two recomputed logit products in backward: executed, not model
  FLOPs (``codes_recompute``). Under TP the rows are split over the TP peers.

The EMA update (elementwise) and the centre update (one ``E_c x K`` product-vector) are ignored
like every elementwise op.
"""
from __future__ import annotations

from typing import Dict

from ..models.config import RILSConfig
from ..models.transformer import checkpointed_blocks
from .flop_terms import (_block_params, _patch_embed_flops, block_attention_flops, block_flops,
                         context_projection_flops, cross_attention_flops, masked_patches, visible_tokens)

COMPONENTS = ("masked_encoder", "unmasked_encoder", "decoder", "text", "fusion", "momentum_encoder",
              "momentum_fusion", "projections", "contrastive", "codes")


def semmim_step_flops(cfg: RILSConfig, micro_batch: int, global_batch: int, *, activation_checkpointing: float = 0.0,
                      tensor_parallel: int = 1, text_guided_masking: bool = True) -> Dict[str, float]:
    """Per-component forward FLOPs (unsharded, one micro-batch), ``forward`` / ``backward`` /
    ``recompute`` / ``codes_recompute`` sums, and per rank ``total`` (model FLOPs, MFU numerator)
    and ``total_with_recompute`` (executed, HFU numerator); keys as ``rils_step_flops``
    (``reconstruction`` is the code cross-entropies, ``recon_recompute`` their recompute)."""
    b, g, tp = int(micro_batch), int(global_batch), int(tensor_parallel)
    if b < 1 or g < b or tp < 1:
        raise ValueError(f"need 1 <= micro_batch <= global_batch and TP >= 1, got {b}, {g}, {tp}")
    v, t, e = cfg.vision, cfg.text, cfg.embed_dim
    ec, k = cfg.semmim.code_dim or e, cfg.semmim.num_codes
    n, d, f, ctx = v.num_patches, v.width, v.mlp_hidden, t.context_length
    m = masked_patches(cfg)
    s_vis, s_all = visible_tokens(cfg), 1 + n
    patch = _patch_embed_flops(v)
    dec_cross = cross_attention_flops(s_all, ctx, d, t.width) if cfg.decoder_text_conditioning else 0
    fusion = block_flops(n, d, f) + cross_attention_flops(n, ctx, d, t.width) \
        if cfg.semmim.target_text_injection else 0

    blocks = {  # TP-split
        "masked_encoder": b * v.depth * block_flops(s_vis, d, f),
        "unmasked_encoder": b * v.depth * block_flops(s_all, d, f),
        "decoder": b * v.decoder_depth * (block_flops(s_all, d, f) + dec_cross),
        "text": b * t.depth * block_flops(ctx, t.width, t.mlp_hidden),
        "fusion": b * fusion,
        "momentum_encoder": b * v.depth * block_flops(s_all, d, f),
        "momentum_fusion": b * fusion,
    }
    scoring = b * (2 * n * d * e + 2 * n * e) if text_guided_masking else 0  # no gradient
    replicated = {
        "masked_encoder": b * patch, "unmasked_encoder": b * patch, "momentum_encoder": b * patch,
        "decoder": b * (2 * s_vis * d * d + 2 * n * d * d),
        "projections": b * (2 * d * e + 2 * t.width * e) + scoring + b * 2 * (1 + m) * d * ec
        + b * 2 * (1 + n) * d * ec,  # image/text, scoring, online code head, momentum code head
        "contrastive": 2 * (2 * b * g * e),
    }
    rows = b * (1 + m)
    gemm = 2.0 * rows * k * ec
    fwd = {c: float(blocks.get(c, 0) + replicated.get(c, 0)) for c in COMPONENTS if c != "codes"}
    fwd["codes"] = 2 * gemm  # teacher and student logits
    no_backward = ("momentum_encoder", "momentum_fusion")
    bwd = {c: (0.0 if c in no_backward else 2 * fwd[c]) for c in COMPONENTS if c != "codes"}
    bwd["masked_encoder"] -= b * patch  # images take no gradient: the conv's weight gradient only
    bwd["unmasked_encoder"] -= b * patch
    # no gradient: the scoring, the momentum code head
    bwd["projections"] -= 2 * (scoring + b * 2 * (1 + n) * d * ec)
    bwd["codes"] = 2 * gemm  # dS and dC_s; the teacher side takes none
    # the caption context is detached: the k/v projections of the cross-attentions get a weight gradient only
    detached_context = b * context_projection_flops(ctx, d, t.width)
    bwd["decoder"] -= v.decoder_depth * detached_context if cfg.decoder_text_conditioning else 0
    bwd["fusion"] -= detached_context if cfg.semmim.target_text_injection else 0

    online_sharded = sum(v_ for c, v_ in blocks.items() if c not in no_backward)
    momentum_sharded = sum(blocks[c] for c in no_backward)
    # Checkpointed online blocks are recomputed up to fc2, as in flops.py (the momentum branch runs
    # without gradient: nothing to recompute); ``activation_checkpointing`` is the policy's fraction.
    stacks = [(v.depth, s_vis, d, f), (v.depth, s_all, d, f), (v.decoder_depth, s_all, d, f),
              (t.depth, ctx, t.width, t.mlp_hidden)] + ([(1, n, d, f)] if cfg.semmim.target_text_injection else [])
    recompute = sum(b * checkpointed_blocks(depth, float(activation_checkpointing)) * (block_flops(s, w, h) - 2 * s * h * w)
                    for depth, s, w, h in stacks)
    codes_recompute = 3 * gemm  # forward: the teacher's second pass; backward: both logit tiles
    sharded_total = 3 * online_sharded + momentum_sharded \
        - (v.decoder_depth * detached_context if cfg.decoder_text_conditioning else 0) \
        - (detached_context if cfg.semmim.target_text_injection else 0)
    codes_total = fwd["codes"] + bwd["codes"]
    replicated_total = sum(fwd.values()) + sum(bwd.values()) - sharded_total - codes_total
    total = sharded_total / tp + replicated_total + codes_total / tp
    out: Dict[str, float] = dict(fwd)
    out.update(
        reconstruction=fwd["codes"], forward=float(sum(fwd.values())), backward=float(sum(bwd.values())),
        recompute=float(recompute), recon_recompute=float(codes_recompute), codes_recompute=float(codes_recompute),
        total=float(total), total_with_recompute=float(total + recompute / tp + codes_recompute / tp),
        attention=float(b * (v.depth * block_attention_flops(s_vis, d)
                             + (2 * v.depth + v.decoder_depth) * block_attention_flops(s_all, d)
                             + t.depth * block_attention_flops(ctx, t.width)
                             + (2 * block_attention_flops(n, d) if cfg.semmim.target_text_injection else 0))),
        tensor_parallel=tp, micro_batch=b, global_batch=g)
    out["backward_components"] = {c: float(x) for c, x in bwd.items()}
    return out


def semmim_params(cfg: RILSConfig) -> Dict[str, int]:
    """SemMIM's parameters beyond RILS's: ``fusion`` and ``codes`` (trainable, with their TP-sharded
    shares) and the ``momentum`` branch (EMA copies of vision encoder, fusion and code head)."""
    v, t = cfg.vision, cfg.text
    ec, k = cfg.semmim.code_dim or cfg.embed_dim, cfg.semmim.num_codes
    vb = _block_params(v.width, v.mlp_hidden, "qv")
    d = v.width
    if cfg.semmim.target_text_injection:  # a block + cross-attention (q, kv with bias, proj) + its norm
        cross_sharded = d * d + d + t.width * 2 * d + 2 * d + d * d
        fusion_sharded, fusion_replicated = vb["sharded"] + cross_sharded, vb["replicated"] + d + 2 * d
    else:
        fusion_sharded = fusion_replicated = 0
    codes = d * ec + k * ec
    vis_rep = 3 * v.patch_size ** 2 * d + d + d + 2 * d
    vision_sharded, vision_replicated = v.depth * vb["sharded"], vis_rep + v.depth * vb["replicated"]
    return {"fusion": fusion_sharded + fusion_replicated, "fusion_sharded": fusion_sharded,
            "codes": codes, "codes_sharded": 0,
            "momentum": vision_sharded + vision_replicated + fusion_sharded + fusion_replicated + codes,
            "momentum_sharded": vision_sharded + fusion_sharded}
