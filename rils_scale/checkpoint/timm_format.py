"""The RILS vision encoder in timm's terms: ``VisionTransformer`` keyword arguments, parameter
names, the tensors under those names, and the hub ``config.json`` that
``timm.create_model("local-dir:DIR")`` reads (used by the timm export and by the OpenCLIP
export's timm trunk)."""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import torch

from ..models.config import RILSConfig
from ..models.vision import sincos_2d_position_embedding
from .export_common import _image_config, vision_activation
from .layout import CheckpointError
from .sources import Source


def timm_model_kwargs(cfg: RILSConfig, num_classes: Optional[int] = None) -> dict:
    """Keyword arguments of ``timm.models.vision_transformer.VisionTransformer`` (equally of
    ``timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)``, whose preset
    values they all override) that give exactly the RILS vision encoder:

    - ``class_token=True``, ``no_embed_class=False``: the cls token is prepended and the
      position table has a cls row (zeros for the fixed sin-cos table), as in RILS;
    - ``global_pool="avg"`` with ``fc_norm=False``: timm then applies the final ``norm`` to
      every token *before* pooling (``fc_norm=None`` would move it after the pool) and averages
      the patch tokens only (``pool_include_prefix=False`` drops the cls token) -- exactly
      RILS's "mean of final-normed patch tokens, cls excluded";
    - ``qkv_bias=True``: the fused ``qkv.bias`` holds (q_bias, 0, v_bias);
    - timm's default LayerNorm eps is 1e-6 and its MLP activation exact GELU, as in RILS
      (``act_layer="quick_gelu"`` when the vision tower was trained with QuickGELU);
    - ``num_classes=embed_dim``: the head is the image projection, so ``model(x)`` equals
      ``encode_image(x)`` (unnormalised); ``num_classes=0`` gives the pooled encoder features.
    """
    v = cfg.vision
    if abs(v.layer_norm_eps - 1e-6) > 1e-12:
        raise CheckpointError(f"timm export assumes LayerNorm eps 1e-6 (timm's default), model has {v.layer_norm_eps}")
    hidden = v.mlp_hidden
    ratio = hidden / v.width
    if int(v.width * ratio) != hidden:  # timm uses int(dim * mlp_ratio)
        ratio = (hidden + 0.5) / v.width
    kwargs = {
        "img_size": v.image_size, "patch_size": v.patch_size, "in_chans": 3,
        "num_classes": cfg.embed_dim if num_classes is None else num_classes,
        "global_pool": "avg", "fc_norm": False, "class_token": True, "no_embed_class": False,
        "pre_norm": False, "final_norm": True, "embed_dim": v.width, "depth": v.depth, "num_heads": v.heads,
        "mlp_ratio": ratio, "qkv_bias": True, "qk_norm": False, "init_values": None, "reg_tokens": 0,
        "dynamic_img_size": False,
    }
    activation = vision_activation(cfg)
    if activation != "gelu":
        kwargs["act_layer"] = activation  # timm's get_act_layer("quick_gelu") is x * sigmoid(1.702 x)
    return kwargs


def _timm_entries(cfg: RILSConfig) -> List[Tuple[str, Tuple[int, ...]]]:
    v, d = cfg.vision, cfg.vision.width
    entries = [("cls_token", (1, 1, d)), ("pos_embed", (1, 1 + v.num_patches, d)),
               ("patch_embed.proj.weight", (d, 3, v.patch_size, v.patch_size)), ("patch_embed.proj.bias", (d,))]
    for i in range(v.depth):
        b = f"blocks.{i}."
        entries += [(b + "norm1.weight", (d,)), (b + "norm1.bias", (d,)),
                    (b + "attn.qkv.weight", (3 * d, d)), (b + "attn.qkv.bias", (3 * d,)),
                    (b + "attn.proj.weight", (d, d)), (b + "attn.proj.bias", (d,)),
                    (b + "norm2.weight", (d,)), (b + "norm2.bias", (d,)),
                    (b + "mlp.fc1.weight", (v.mlp_hidden, d)), (b + "mlp.fc1.bias", (v.mlp_hidden,)),
                    (b + "mlp.fc2.weight", (d, v.mlp_hidden)), (b + "mlp.fc2.bias", (d,))]
    entries += [("norm.weight", (d,)), ("norm.bias", (d,)),
                ("head.weight", (cfg.embed_dim, d)), ("head.bias", (cfg.embed_dim,))]
    return entries


def rils_to_timm_name(name: str) -> Optional[str]:
    """timm name of a RILS vision parameter (``None``: not part of the timm model, or q/v bias,
    which are fused into ``qkv.bias`` separately)."""
    if name == "visual.cls_token":
        return "cls_token"
    if name.startswith("visual.patch_embed."):
        return "patch_embed.proj." + name.rsplit(".", 1)[1]
    if name.startswith("visual.norm."):
        return name[len("visual."):]
    if name.startswith("visual.transformer.blocks."):
        if name.endswith(("attn.q_bias", "attn.v_bias")):
            return None
        return name[len("visual.transformer."):]
    if name == "image_projection.weight":
        return "head.weight"
    return None


def iter_timm_tensors(source: Source) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(timm name, tensor)`` of the vision encoder + projection head, one at a time."""
    cfg = source.model_config
    names = [n for n in source.names() if n.startswith("visual.") or n == "image_projection.weight"]
    yield "pos_embed", sincos_2d_position_embedding(cfg.vision.width, cfg.vision.grid_size)[None]
    yield "head.bias", torch.zeros(cfg.embed_dim)
    pending: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, tensor in source.iter_full_tensors(names):
        if name.endswith(("attn.q_bias", "attn.v_bias")):
            block = name.rsplit(".", 1)[0][len("visual.transformer."):]  # blocks.i.attn
            pending.setdefault(block, {})[name.rsplit(".", 1)[1]] = tensor
            if len(pending[block]) == 2:  # RILS's k bias is fixed at zero (BEiT style)
                pair = pending.pop(block)
                q, v = pair["q_bias"], pair["v_bias"]
                yield block + ".qkv.bias", torch.cat([q, torch.zeros_like(q), v])
            continue
        target = rils_to_timm_name(name)
        if target is not None:
            yield target, (tensor.t().contiguous() if target == "head.weight" else tensor)


# timm's registered ViTs (``timm/models/vision_transformer.py``) whose builder, with timm's
# VisionTransformer defaults (cls token, learned position table, qkv bias, pre-norm blocks, final
# LayerNorm eps 1e-6, exact GELU, no layer scale), is the RILS encoder of this shape:
# (patch, width, depth, heads, MLP hidden, image size). tests/test_checkpoint_portability.py
# builds each one with timm and compares it with VisionTransformer(**timm_model_kwargs(...)).
TIMM_REGISTRY_VITS = {
    "vit_tiny_patch16_224": (16, 192, 12, 3, 768, 224),
    "vit_tiny_patch16_384": (16, 192, 12, 3, 768, 384),
    "vit_small_patch8_224": (8, 384, 12, 6, 1536, 224),
    "vit_small_patch16_224": (16, 384, 12, 6, 1536, 224),
    "vit_small_patch16_384": (16, 384, 12, 6, 1536, 384),
    "vit_small_patch32_224": (32, 384, 12, 6, 1536, 224),
    "vit_base_patch8_224": (8, 768, 12, 12, 3072, 224),
    "vit_base_patch16_224": (16, 768, 12, 12, 3072, 224),
    "vit_base_patch16_384": (16, 768, 12, 12, 3072, 384),
    "vit_base_patch32_224": (32, 768, 12, 12, 3072, 224),
    "vit_large_patch14_224": (14, 1024, 24, 16, 4096, 224),
    "vit_large_patch16_224": (16, 1024, 24, 16, 4096, 224),
    "vit_large_patch16_384": (16, 1024, 24, 16, 4096, 384),
    "vit_huge_patch14_224": (14, 1280, 32, 16, 5120, 224),
    "vit_giant_patch14_224": (14, 1408, 40, 16, 6144, 224),
}


def _shape(cfg: RILSConfig) -> Tuple[int, int, int, int, int, int]:
    v = cfg.vision
    return (v.patch_size, v.width, v.depth, v.heads, v.mlp_hidden, v.image_size)


def timm_registry_name(cfg: RILSConfig) -> Optional[str]:
    """The timm architecture that *is* this vision encoder when built by name alone (no
    ``model_args``), or None. Such a name needs no path: OpenCLIP can build the trunk from it."""
    if vision_activation(cfg) != "gelu" or abs(cfg.vision.layer_norm_eps - 1e-6) > 1e-12:
        return None
    shape = _shape(cfg)
    return next((name for name, s in TIMM_REGISTRY_VITS.items() if s == shape), None)


def timm_architecture(cfg: RILSConfig) -> Tuple[str, bool]:
    """``(name, exact)``: the registered architecture timm builds the encoder from. timm's hub
    config must name a registered builder; ``model_args`` then override every structural value.
    When no builder has this shape, the nearest one (width, then depth, patch, image size) is
    named and ``exact`` is False: the config says so next to the name."""
    name = timm_registry_name(cfg)
    if name is not None:
        return name, True
    patch, width, depth, _, _, size = _shape(cfg)

    def distance(item):
        p, w, d, _, _, s = item[1]
        return (abs(w - width), abs(d - depth), abs(p - patch), abs(s - size))

    return min(TIMM_REGISTRY_VITS.items(), key=distance)[0], False


def describe_vision(cfg: RILSConfig) -> str:
    """A name-free description of the encoder's shape, for configs and messages."""
    v = cfg.vision
    return (f"RILS ViT encoder ({cfg.name} preset): {v.depth} blocks, width {v.width}, {v.heads} heads, "
            f"MLP {v.mlp_hidden}, {v.patch_size} px patches, {v.image_size} px images, "
            f"{vision_activation(cfg).replace('_', ' ')}")


def timm_hub_config(cfg: RILSConfig, source: Optional[Source] = None) -> dict:
    """timm's hub ``config.json``: what ``timm.create_model("local-dir:DIR")`` reads.

    ``model_args`` override every structural value of the named architecture; ``num_classes``
    is left to ``pretrained_cfg`` so that passing ``num_classes=N`` makes timm drop the
    ``head`` (the image projection) and build a fresh one; ``pretrained_cfg`` carries the
    evaluation transform the model was trained with, which ``resolve_data_config`` returns.
    ``architecture`` is a registered timm builder (timm cannot build anything else); when no
    builder has the encoder's shape, ``architecture_note`` says that the name is only the
    builder and what the model is. ``model(x)`` without ``num_classes`` is the image
    projection (``embed_dim`` outputs, timm's convention for CLIP image towers), not a classifier.
    """
    kwargs = timm_model_kwargs(cfg)
    architecture, exact = timm_architecture(cfg)
    kwargs.pop("num_classes")
    image = _image_config(cfg)
    size = image["size"]
    out = {
        "architecture": architecture,
        "architecture_note": (f"{architecture} is this model's own timm architecture" if exact else
                              f"not a {architecture}: timm builds that registered architecture with model_args "
                              f"overriding every structural value, giving the {describe_vision(cfg)}"),
        "num_classes": cfg.embed_dim,
        "num_features": cfg.vision.width,
        "global_pool": "avg",
        "model_args": kwargs,
        "pretrained_cfg": {
            "tag": "rils", "custom_load": False, "input_size": [3, size, size], "fixed_input_size": True,
            "interpolation": image["interpolation"], "crop_pct": 1.0, "crop_mode": "center",
            "mean": image["mean"], "std": image["std"], "num_classes": cfg.embed_dim, "pool_size": None,
            "first_conv": "patch_embed.proj", "classifier": "head",
        },
    }
    out["head_note"] = (f"head = the RILS image projection ({cfg.vision.width} -> {cfg.embed_dim}, the CLIP "
                        "image embedding), not a classifier: pass num_classes=N for a fresh N-way head, or "
                        "num_classes=0 for the pooled encoder features")
    if source is not None:
        out["rils_source"] = source.describe()
    return out
