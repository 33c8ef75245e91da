"""Fast checks of the checkpoint pieces that need no DeepSpeed run (the real runs are in
tests/test_checkpoint_export.py)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_streaming_writer_any_order_matches_safetensors(tmp_path):
    from safetensors.torch import load_file
    from rils_scale.checkpoint.serialization import StreamingSafetensorsWriter
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2).bfloat16(),
               "empty": torch.zeros(0)}
    path = str(tmp_path / "x.safetensors")
    with StreamingSafetensorsWriter(path, [(n, t.shape, t.dtype) for n, t in tensors.items()], {"k": "v"}) as w:
        for name in ("c", "empty", "a", "b"):
            w.write(name, tensors[name])
    loaded = load_file(path)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[n], tensors[n]) for n in tensors)
    with pytest.raises(ValueError, match="never written"):
        with StreamingSafetensorsWriter(str(tmp_path / "y.safetensors"), [("a", (1,), torch.float32)]):
            pass
    assert not os.path.exists(tmp_path / "y.safetensors")


def test_tp_layout_is_read_from_the_layers():
    from rils_scale.checkpoint import tensor_parallel_layout_for
    from rils_scale.models import get_config
    cfg = get_config("tiny")
    cfg.text.vocab_size = 255
    layout = tensor_parallel_layout_for(cfg, 2)
    qkv = layout["visual.transformer.blocks.0.attn.qkv.weight"]
    assert (qkv.partition_dim, qkv.stride) == (0, 3)
    assert layout["text.transformer.blocks.1.attn.qkv.bias"].stride == 3
    assert layout["visual.transformer.blocks.0.attn.proj.weight"].partition_dim == 1
    assert layout["visual.transformer.blocks.0.attn.q_bias"].partition_dim == 0
    assert layout["text.token_embedding.weight"].vocab_size == 255
    for replicated in ("visual.norm.weight", "image_projection.weight", "visual.transformer.blocks.0.mlp.fc2.bias",
                       "decoder.embed.weight", "logit_scale.value", "text.positional_embedding"):
        assert replicated not in layout
    assert tensor_parallel_layout_for(cfg, 1) == {}
    with pytest.raises(ValueError, match="not divisible"):
        tensor_parallel_layout_for(cfg, 3)


def test_bench_shapes_match_the_real_model():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from bench_convert import _full_shapes
    from rils_scale.models import RILS, get_config
    cfg = get_config("tiny")
    cfg.text.vocab_size = 300
    real = {n: tuple(p.shape) for n, p in RILS(cfg).named_parameters()}
    assert dict(_full_shapes(cfg)) == real


def test_timm_kwargs_semantics():
    from rils_scale.checkpoint import timm_model_kwargs
    from rils_scale.models import get_config
    kw = timm_model_kwargs(get_config("vit_g14"))
    assert kw["global_pool"] == "avg" and kw["fc_norm"] is False and kw["class_token"] is True
    assert int(kw["embed_dim"] * kw["mlp_ratio"]) == get_config("vit_g14").vision.mlp_hidden


def test_fsync_tree_skips_a_peer_temporary_file_renamed_meanwhile(tmp_path, monkeypatch):
    """Ranks fsync the tag while peers still write: a ``*.tmp<pid>`` listed then renamed is no error."""
    import os
    from rils_scale.checkpoint import integrity
    (tmp_path / "kept.bin").write_bytes(b"x")
    real_walk = os.walk
    monkeypatch.setattr(integrity.os, "walk", lambda d: [(r, s, f + ["gone.json.tmp123"]) for r, s, f in real_walk(d)])
    integrity.fsync_tree(str(tmp_path))  # raised FileNotFoundError before
    monkeypatch.setattr(integrity, "fsync_path", lambda p: (_ for _ in ()).throw(PermissionError(p)))
    with pytest.raises(PermissionError):  # other failures still surface
        integrity.fsync_tree(str(tmp_path))
