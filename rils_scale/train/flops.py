"""Analytical FLOP accounting of one RILS training step (per rank), for MFU and planning.

Conventions (docs/performance.md has the derivation and the check against
``torch.utils.flop_counter.FlopCounterMode``):

- A multiply-add is 2 FLOPs. Only matrix products are counted: linear layers, the patch
  convolution, attention's ``QKᵀ`` and ``AV``, the projections and the loss products.
  Elementwise work (LayerNorm, GELU, softmax, bias adds, normalisation, the KL's exp/log)
  is ignored: it is < 1 % of the FLOPs here and is memory-bound anyway.
- Attention is counted in full (``4·S²·D`` per layer), also for the causal text tower, as
  FlopCounterMode and the usual MFU conventions (PaLM, Megatron) do; a causal kernel that
  skips masked tiles does about half of that work, which makes reported MFU slightly generous
  for the text tower (about 1 % of a B/16 step).
- Everything is per rank and per micro-batch. ``micro_batch`` is this rank's samples,
  ``global_batch`` the data-parallel batch (the contrastive columns and the sentence
  prototypes of the reconstruction loss).

What the model computes (rils_scale.models.rils.RILS.forward) and the objective
(rils_scale.objectives):

- masked encoder: patch convolution over **all** N patches (the gather of visible tokens
  comes after it), then ``depth`` blocks on ``1 + K`` tokens, ``K = int(N·(1 - mask_ratio))``;
- unmasked encoder: patch convolution and ``depth`` blocks on ``1 + N`` tokens;
- decoder: Linear D→D on ``1 + K`` tokens, ``decoder_depth`` blocks on ``1 + N`` tokens,
  Linear D→D on N tokens;
- text tower: ``depth`` blocks on ``context_length`` tokens (token lookup is free);
- projections: ``image_projection`` three times (N unmasked patch tokens, the pooled token,
  N decoder predictions) and ``text_projection`` once;
- contrastive ("local loss"): ``B × G`` image→text and ``B × G`` text→image logits;
- reconstruction: teacher and student logits of the kept masked rows against all G
  prototypes. Under TP the rows are split across TP peers (objectives/reconstruction.py).

Backward is 2× forward for every product whose two operands both need a gradient, except:
the patch convolution (the images take no gradient: 1×), the teacher side (stop-gradient: the
``image_projection`` of the unmasked patch tokens and the teacher logits, 0×) and the student
logits (the prototypes are detached by default: 1×, 2× with
``prototype_grad``).

``total`` is the *model* FLOPs per rank (forward + backward, the numerator of MFU): work a
perfect implementation must do. ``recompute`` (activation checkpointing: one more forward of
every checkpointed transformer block, as the chosen policy checkpoints them, except fc2's
product: torch's non-reentrant checkpoint stops recomputing at the last tensor backward needs), ``recon_recompute``
(the streaming KL backward recomputes both logit matrices, as FlashAttention does) and
``recon_uncounted`` (masked rows the retrieval filter drops, computed anyway with weight 0) are
extra hardware work, reported apart and summed in ``total_with_recompute`` (the numerator of HFU:
what is *executed*).

The patch-sentence KL on its own (:func:`kl_flops`, the convention the KL benchmark and the
fused kernels report) counts what is executed, FlashAttention's way: forward = the two logit
GEMMs (teacher, student; ``2·P·M·D`` each); backward = the two recomputed logit GEMMs plus the
gradient products, ``dS = G·T`` always and ``dT = Gᵀ·S`` only when the prototypes take a
gradient. Every backend except ``reference`` (which stores its P×M logits) recomputes.
"""
from __future__ import annotations

from typing import Dict

from ..models.config import RILSConfig
from .flop_terms import (_block_params, _patch_embed_flops, block_attention_flops, block_flops,  # noqa: F401
                         block_linear_flops, context_projection_flops, cross_attention_flops, masked_patches,
                         visible_tokens)
from ..models.transformer import checkpointed_blocks

COMPONENTS = ("masked_encoder", "unmasked_encoder", "decoder", "text", "projections", "contrastive",
              "reconstruction")


# --------------------------------------------------------------------------- the KL op
KL_BACKENDS_STORING_LOGITS = ("reference",)  # every other backend recomputes them in backward


def kl_flops(rows: int, prototypes: int, dim: int, *, prototype_grad: bool = False,
             backend: str = "streaming") -> Dict[str, float]:
    """Executed FLOPs of one ``patch_sentence_kl`` call on ``rows`` × ``prototypes`` × ``dim``.

    ``forward``: teacher and student logits (2 GEMMs). ``backward``: the recomputed logits
    (2 GEMMs, none for a backend that stores them) and the gradient products (``dS``; plus
    ``dT`` with ``prototype_grad``). ``model_backward`` is the backward without recompute
    (what MFU counts); ``total`` = forward + backward (executed, as FlashAttention counts).
    """
    gemm = 2.0 * rows * prototypes * dim
    recompute = 0.0 if backend in KL_BACKENDS_STORING_LOGITS else 2 * gemm
    grads = gemm * (2 if prototype_grad else 1)
    return {"forward": 2 * gemm, "backward": recompute + grads, "recompute": recompute,
            "model_backward": grads, "total": 2 * gemm + recompute + grads, "gemm": gemm}


# --------------------------------------------------------------------------- step FLOPs
def rils_step_flops(cfg: RILSConfig, micro_batch: int, global_batch: int, *,
                    activation_checkpointing: float = 0.0, tensor_parallel: int = 1,
                    recon_rows_fraction: float = 1.0, prototype_grad: bool = False,
                    recon_backend: str = "streaming", recon_split_tp: bool = True) -> Dict[str, float]:
    """FLOPs of one training step (one micro-batch) on one rank.

    Returns per-component **forward** FLOPs of the whole (unsharded) model for
    ``micro_batch`` samples (``masked_encoder``, ``unmasked_encoder``, ``decoder``, ``text``,
    ``projections``, ``contrastive``, ``reconstruction``), their sums ``forward``,
    ``backward``, ``recompute`` and ``recon_recompute`` (also unsharded), and the per-rank
    figures ``total`` (forward + backward, sharded parts / ``tensor_parallel``: the MFU
    numerator) and ``total_with_recompute`` (plus all recomputation: HFU numerator).
    ``backward_components`` holds the backward FLOPs per component.

    ``activation_checkpointing``: the fraction of each stack's blocks recomputed in backward
    (False / 0 none, True / 1 every block, in between selective: the first
    ``models.transformer.checkpointed_blocks`` blocks of each stack); ``recompute`` counts those
    blocks' forward again, up to fc2 (torch's checkpoint stops at the last tensor backward needs). ``recon_rows_fraction``: the fraction of masked rows that count
    (the retrieval filter); the KL computes every masked row (fixed-size rows,
    objectives/rows.py), so the others are executed work (``recon_uncounted``), not model FLOPs.

    Extra switches (defaults match the trainer): ``prototype_grad`` (the KL also trains the
    text tower through the prototypes: one more product in backward), ``recon_backend``
    (any KL backend but "reference" recomputes both logit matrices in backward; "reference"
    stores them), ``recon_split_tp`` (the KL rows are split over TP peers, as
    objectives/reconstruction.py does).
    Pure arithmetic on the config: cheap, but callers should still compute it once per run.
    """
    if getattr(cfg, "recipe", "rils") == "semmim":  # momentum branch, fusion, K-way codes: semmim_flops.py
        from .semmim_flops import semmim_step_flops
        return semmim_step_flops(cfg, micro_batch, global_batch, activation_checkpointing=activation_checkpointing,
                                 tensor_parallel=tensor_parallel)
    key = (repr(cfg.to_dict()), int(micro_batch), int(global_batch), float(activation_checkpointing),
           int(tensor_parallel), float(recon_rows_fraction), bool(prototype_grad), recon_backend,
           bool(recon_split_tp))
    if key not in _CACHE:  # RILSConfig is not hashable: key on its contents
        _CACHE[key] = _compute(cfg, *key[1:])
    out = dict(_CACHE[key])
    out["backward_components"] = dict(out["backward_components"])
    return out


_CACHE: Dict[tuple, Dict] = {}


def _compute(cfg: RILSConfig, b: int, g: int, ckpt: float, tp: int, rows_frac: float, proto_grad: bool,
             recon_backend: str, recon_split_tp: bool) -> Dict[str, float]:
    if b < 1 or g < b:
        raise ValueError(f"need 1 <= micro_batch <= global_batch, got {b} and {g}")
    if tp < 1:
        raise ValueError(f"tensor_parallel must be >= 1, got {tp}")
    if not 0.0 <= rows_frac <= 1.0:
        raise ValueError(f"recon_rows_fraction must be in [0, 1], got {rows_frac}")
    if recon_backend not in ("streaming", "streaming_chunked", "cuda", "triton", "hybrid", "reference", "auto"):
        raise ValueError(f"unknown recon_backend {recon_backend!r}")
    v, t, e = cfg.vision, cfg.text, cfg.embed_dim
    n, d, f = v.num_patches, v.width, v.mlp_hidden
    s_vis, s_all = visible_tokens(cfg), 1 + n
    patch = _patch_embed_flops(v)

    # sharded (TP-split) block FLOPs and replicated FLOPs, forward, per micro-batch
    blocks = {
        "masked_encoder": b * v.depth * block_flops(s_vis, d, f),
        "unmasked_encoder": b * v.depth * block_flops(s_all, d, f),
        "decoder": b * v.decoder_depth * (block_flops(s_all, d, f) + (
            cross_attention_flops(s_all, t.context_length, d, t.width) if cfg.decoder_text_conditioning else 0)),
        "text": b * t.depth * block_flops(t.context_length, t.width, t.mlp_hidden),
    }
    replicated = {
        "masked_encoder": b * patch,
        "unmasked_encoder": b * patch,
        "decoder": b * (2 * s_vis * d * d + 2 * n * d * d),
        "text": 0,
        "projections": b * (2 * (2 * n + 1) * d * e + 2 * t.width * e),
        "contrastive": 2 * (2 * b * g * e),
    }
    rows = b * masked_patches(cfg) * rows_frac
    kl = kl_flops(rows, g, e, prototype_grad=proto_grad, backend=recon_backend)
    logit = kl["gemm"]  # one P x G x E product
    recon = {"teacher": logit, "student": logit}

    fwd = {c: blocks.get(c, 0) + replicated.get(c, 0) for c in COMPONENTS if c != "reconstruction"}
    fwd["reconstruction"] = recon["teacher"] + recon["student"]
    bwd = {c: 2 * fwd[c] for c in COMPONENTS if c != "reconstruction"}
    bwd["masked_encoder"] -= b * patch  # images take no gradient: weight gradient only
    bwd["unmasked_encoder"] -= b * patch
    if cfg.decoder_text_conditioning:  # the caption context is detached: its k/v projection's weight gradient only
        bwd["decoder"] -= b * v.decoder_depth * context_projection_flops(t.context_length, d, t.width)
    # the projected unmasked patch tokens are the KL teacher only (stop-gradient): no backward
    # (the unmasked pass learns through the pooled token, i.e. the contrastive loss)
    bwd["projections"] -= 2 * b * 2 * n * d * e
    bwd["reconstruction"] = kl["model_backward"]  # dS (+ dT with prototype_grad); teacher: stop-gradient

    sharded_fwd = sum(blocks.values())
    # Recompute of a checkpointed block: its forward up to the last tensor backward needs. torch's
    # non-reentrant checkpoint stops there (early stop), so fc2's product is not redone.
    stacks = {"masked_encoder": (v.depth, s_vis, d, f), "unmasked_encoder": (v.depth, s_all, d, f),
              "decoder": (v.decoder_depth, s_all, d, f), "text": (t.depth, t.context_length, t.width, t.mlp_hidden)}
    recompute = sum(b * checkpointed_blocks(depth, ckpt) * (block_flops(s, w, h) - 2 * s * h * w)
                    for depth, s, w, h in stacks.values())
    recon_recompute = kl["recompute"]
    # rows the retrieval filter drops are still computed (fixed-size rows, weight 0)
    uncounted = kl_flops(b * masked_patches(cfg) * (1.0 - rows_frac), g, e, prototype_grad=proto_grad,
                         backend=recon_backend)["total"]

    recon_div = tp if recon_split_tp else 1
    recon_total = fwd["reconstruction"] + bwd["reconstruction"]
    # every block product has both operands with gradient, except a detached context's k/v projection
    sharded_total = 3 * sharded_fwd - (b * v.decoder_depth * context_projection_flops(t.context_length, d, t.width)
                                       if cfg.decoder_text_conditioning else 0)
    replicated_total = sum(fwd.values()) + sum(bwd.values()) - sharded_total - recon_total
    total = sharded_total / tp + replicated_total + recon_total / recon_div
    out: Dict[str, float] = {c: float(fwd[c]) for c in COMPONENTS}
    out.update(
        forward=float(sum(fwd.values())),
        backward=float(sum(bwd.values())),
        recompute=float(recompute),
        recon_recompute=float(recon_recompute),
        recon_uncounted=float(uncounted),
        total=float(total),
        total_with_recompute=float(total + recompute / tp + (recon_recompute + uncounted) / recon_div),
        attention=float(b * (v.depth * block_attention_flops(s_vis, d)
                             + (v.depth + v.decoder_depth) * block_attention_flops(s_all, d)
                             + t.depth * block_attention_flops(t.context_length, t.width))),
        tensor_parallel=tp, micro_batch=b, global_batch=g,
    )
    out["backward_components"] = {c: float(x) for c, x in bwd.items()}
    return out


def flops_per_sample(cfg: RILSConfig, global_batch: int = 1, **kw) -> float:
    """Model FLOPs (forward + backward, TP = 1) per training sample at a given global batch."""
    return rils_step_flops(cfg, 1, max(global_batch, 1), **kw)["total"]


# --------------------------------------------------------------------------- parameters
def model_params(cfg: RILSConfig) -> Dict[str, int]:
    """Parameter counts: ``vision``, ``decoder``, ``text``, ``projections`` (SemMIM: also ``fusion``,
    ``codes``), and ``sharded`` (split over TP ranks) / ``replicated`` (every TP rank holds a copy)
    of the **trainable** ones (``trainable``: what the optimizer holds). SemMIM's momentum branch
    (no gradient, no optimizer state) is ``momentum`` / ``momentum_sharded``; ``total`` counts
    every parameter of the module. Also ``<part>_sharded`` per part and ``largest_block``
    (parameters of the widest block)."""
    v, t, e = cfg.vision, cfg.text, cfg.embed_dim
    vb = _block_params(v.width, v.mlp_hidden, "qv")
    tb = _block_params(t.width, t.mlp_hidden, "qkv")
    vis_rep = 3 * v.patch_size ** 2 * v.width + v.width + v.width + 2 * v.width  # patch W+b, cls, norm
    dec_rep = 2 * (v.width * v.width + v.width) + v.width + 2 * v.width  # embed, pred, mask token, norm
    txt_rep = t.context_length * t.width + 2 * t.width  # positions, ln_final
    d = v.width
    # text-conditioned decoder: each block's cross-attention (q, kv with biases, proj) and its norm
    cross = (2 * d * d + d + 2 * d * t.width + 2 * d, 3 * d) if cfg.decoder_text_conditioning else (0, 0)
    parts = {
        "vision": (v.depth * vb["sharded"], vis_rep + v.depth * vb["replicated"]),
        "decoder": (v.decoder_depth * (vb["sharded"] + cross[0]),
                    dec_rep + v.decoder_depth * (vb["replicated"] + cross[1])),
        "text": (t.vocab_size * t.width + t.depth * tb["sharded"], txt_rep + t.depth * tb["replicated"]),
        "projections": (0, v.width * e + t.width * e + 1),  # image, text projection, logit scale
    }
    momentum = None
    if getattr(cfg, "recipe", "rils") == "semmim":  # trainable fusion block and code head; frozen momentum copies
        from .semmim_flops import semmim_params
        sm = semmim_params(cfg)
        parts["fusion"] = (sm["fusion_sharded"], sm["fusion"] - sm["fusion_sharded"])
        parts["codes"] = (0, sm["codes"])
        momentum = (sm["momentum_sharded"], sm["momentum"] - sm["momentum_sharded"])
    out = {k: s + r for k, (s, r) in parts.items()}
    out.update({f"{k}_sharded": s for k, (s, _) in parts.items()})
    out["sharded"] = sum(s for s, _ in parts.values())
    out["replicated"] = sum(r for _, r in parts.values())
    out["trainable"] = out["sharded"] + out["replicated"]
    out["momentum"], out["momentum_sharded"] = (sum(momentum), momentum[0]) if momentum else (0, 0)
    out["total"] = out["trainable"] + out["momentum"]  # every parameter of the module
    out["largest_block"] = max(sum(vb.values()), sum(tb.values()))
    return out


def params_per_rank(cfg: RILSConfig, tensor_parallel: int = 1, part: str = None) -> float:
    """Parameters one TP rank holds (of the whole model, or of ``part``: vision / decoder /
    text / projections)."""
    p = model_params(cfg)
    if part is None:
        return p["sharded"] / tensor_parallel + p["replicated"]
    sharded = p[f"{part}_sharded"]
    return sharded / tensor_parallel + (p[part] - sharded)


__all__ = ["rils_step_flops", "kl_flops", "model_params", "params_per_rank", "flops_per_sample", "block_flops",
           "block_linear_flops", "block_attention_flops", "visible_tokens", "masked_patches", "COMPONENTS"]
