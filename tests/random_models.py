"""Seeded random RILS models written as ``rils`` exports, for tests that need a model but no
training run (exports, evaluation plumbing)."""
from __future__ import annotations

import json
import os
import shutil

import torch


def tokenizer(tmp_path):
    from rils_scale.data.tokenizer import Tokenizer, train_tokenizer
    words = ["red", "green", "blue", "circle", "square", "triangle", "left", "of", "a", "the", "two", "small"]
    captions = [f"a {a} {b} left of the {c} {d}" for a in words[:3] for b in words[3:6] for c in words[:3]
                for d in words[3:6]] * 4
    path = train_tokenizer(captions, tmp_path / "tok", vocab_size=96)
    return str(path), Tokenizer.load(path).vocab_size


def rils_dir(path, cfg, tokenizer):
    """A ``rils`` export of a seeded random model (what ``convert_checkpoint --format rils`` writes)."""
    from safetensors.torch import save_file
    from rils_scale.models import RILS
    torch.manual_seed(0)
    model = RILS(cfg, attn_backend="math")
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised biases and unit norms would hide mistakes
            p.add_(0.05 * torch.randn_like(p))
    os.makedirs(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(path, "model.safetensors"))
    shutil.copyfile(tokenizer, os.path.join(path, "tokenizer.model"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"format": "rils", "format_version": 1, "model": cfg.to_dict(), "tokenizer": "tokenizer.model",
                   "weights": "model.safetensors", "source": {"step": 0}}, f)
    return str(path)


def config(vocab, vision=None, text_activation="quick_gelu"):
    from rils_scale.models import get_config
    from rils_scale.models.config import VisionConfig
    cfg = get_config("tiny")
    if vision:
        cfg.vision = VisionConfig(**vision)
    cfg.text.vocab_size = vocab
    cfg.text.activation = text_activation
    return cfg
