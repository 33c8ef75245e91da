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


def timm_hub_config(cfg: RILSConfig, source: Optional[Source] = None) -> dict:
    """timm's hub ``config.json``: what ``timm.create_model("local-dir:DIR")`` reads.

    ``model_args`` override every structural value of the named architecture; ``num_classes``
    is left to ``pretrained_cfg`` so that passing ``num_classes=N`` makes timm drop the
    ``head`` (the image projection) and build a fresh one; ``pretrained_cfg`` carries the
    evaluation transform the model was trained with, which ``resolve_data_config`` returns.
    """
    kwargs = timm_model_kwargs(cfg)
    kwargs.pop("num_classes")
    image = _image_config(cfg)
    size = image["size"]
    out = {
        "architecture": "vit_base_patch16_224",
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
    if source is not None:
        out["rils_source"] = source.describe()
    return out
