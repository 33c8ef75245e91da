"""Writes tests/data/quick_gelu_text.json: a tiny QuickGELU text tower's sentence features,
computed by the hand-written float64 forward below from the weights that the seeded model
holds (python tests/make_quick_gelu_reference.py). The test re-derives the weights from the
same seed and checks the model against both the stored numbers and this forward."""
from __future__ import annotations

import json
import math
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "data", "quick_gelu_text.json")
SEED = 11


def tiny_text_config(activation: str = "quick_gelu"):
    from rils_scale.models import TextConfig
    return TextConfig(context_length=8, vocab_size=50, width=16, depth=2, heads=2, activation=activation)


def build_tower(activation: str = "quick_gelu"):
    from rils_scale.models.text import TextEncoder
    from rils_scale.models.transformer import ParallelSpec
    torch.manual_seed(SEED)
    return TextEncoder(tiny_text_config(activation), ParallelSpec(), attn_backend="math").double()


def token_ids() -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 13, 2, 0, 0, 0], [1, 40, 41, 42, 43, 44, 45, 2], [1, 7, 2, 0, 0, 0, 0, 0]])
    return ids


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def reference_forward(state: dict, ids: torch.Tensor, cfg) -> torch.Tensor:
    """CLIP's text transformer written out: pre-norm causal blocks, QuickGELU MLP
    ``x * sigmoid(1.702 x)``, final LayerNorm, the token at the end-of-text position."""
    sd = {k: v.double() for k, v in state.items()}
    n, w, h = ids.shape[1], cfg.width, cfg.heads
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:n]
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    for i in range(cfg.depth):
        p = f"transformer.blocks.{i}."
        y = _ln(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"], cfg.layer_norm_eps)
        qkv = y @ sd[p + "attn.qkv.weight"].t() + sd[p + "attn.qkv.bias"]
        q, k, v = qkv.split(w, dim=-1)
        heads = lambda t: t.reshape(t.shape[0], n, h, w // h).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(w // h)
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + att.transpose(1, 2).reshape(-1, n, w) @ sd[p + "attn.proj.weight"].t() + sd[p + "attn.proj.bias"]
        y = _ln(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"], cfg.layer_norm_eps)
        hdn = y @ sd[p + "mlp.fc1.weight"].t() + sd[p + "mlp.fc1.bias"]
        hdn = hdn * torch.sigmoid(1.702 * hdn)
        x = x + hdn @ sd[p + "mlp.fc2.weight"].t() + sd[p + "mlp.fc2.bias"]
    x = _ln(x, sd["ln_final.weight"], sd["ln_final.bias"], cfg.layer_norm_eps)
    eot = (ids != cfg.pad_id).sum(1) - 1
    return x[torch.arange(ids.shape[0]), eot]


if __name__ == "__main__":
    tower = build_tower()
    out = reference_forward(tower.state_dict(), token_ids(), tiny_text_config())
    with open(REFERENCE, "w") as f:
        json.dump({"seed": SEED, "sentence_features": out.tolist()}, f, indent=1)
    print("wrote", REFERENCE)
