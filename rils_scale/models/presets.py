"""Registered model presets: each a short builder of a :class:`RILSConfig`.

B/16 and L/16 follow the official RILS release (models_rils.py); H/14 and g/14 are our
choices, taking the vision towers of the ViT papers and the text towers of OpenCLIP's
ViT-H-14 / ViT-g-14 (width 1024, 16 heads, 24 layers, joint width 1024).
"""
from __future__ import annotations

from typing import Callable, Dict

from .config import RILSConfig, SemMIMConfig, TextConfig, VisionConfig

_PRESETS: Dict[str, Callable[[], RILSConfig]] = {}


def register(fn: Callable[[], RILSConfig]):
    _PRESETS[fn.__name__] = fn
    return fn


def list_presets():
    return sorted(_PRESETS)


def get_config(name: str, **overrides) -> RILSConfig:
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {list_presets()}")
    cfg = _PRESETS[name]()
    cfg.name = name
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@register
def tiny() -> RILSConfig:
    """32 px images, 4 px patches (64 patches), 4 heads: milliseconds per step on a CPU."""
    return RILSConfig(
        vision=VisionConfig(image_size=32, patch_size=4, width=64, depth=2, heads=4),
        text=TextConfig(context_length=32, vocab_size=1000, width=64, depth=2, heads=4),
        embed_dim=64, semmim=SemMIMConfig(num_codes=256))


@register
def small() -> RILSConfig:
    """ViT-S/16 with a 384-wide text tower: a test preset with several heads (6 and 6)."""
    return RILSConfig(
        vision=VisionConfig(width=384, depth=12, heads=6),
        text=TextConfig(width=384, depth=12, heads=6),
        embed_dim=384)


@register
def vit_b16() -> RILSConfig:
    return RILSConfig(
        vision=VisionConfig(width=768, depth=12, heads=12),
        text=TextConfig(width=512, depth=12, heads=8),
        embed_dim=512)


@register
def vit_l16() -> RILSConfig:
    return RILSConfig(
        vision=VisionConfig(width=1024, depth=24, heads=16),
        text=TextConfig(width=768, depth=12, heads=12),
        embed_dim=768)


@register
def vit_h14() -> RILSConfig:
    return RILSConfig(
        vision=VisionConfig(patch_size=14, width=1280, depth=32, heads=16),
        text=TextConfig(width=1024, depth=24, heads=16),
        embed_dim=1024)


@register
def vit_g14() -> RILSConfig:
    return RILSConfig(
        vision=VisionConfig(patch_size=14, width=1408, depth=40, heads=16, mlp_ratio=6144 / 1408),
        text=TextConfig(width=1024, depth=24, heads=16),
        embed_dim=1024)
