"""Export the CLIP part of a RILS model as an OpenCLIP ``local-dir:`` model.

    OUT/open_clip_config.json        model_cfg + preprocess_cfg (what open_clip 3.x reads)
    OUT/open_clip_model.safetensors  weights under OpenCLIP's names, fp32
    OUT/tokenizer.json, tokenizer_config.json, special_tokens_map.json   (HF tokenizer)
    OUT/tokenizer.model              the SentencePiece original
    OUT/timm_trunk/config.json       only for a timm trunk no timm architecture name builds (see below)

``open_clip.create_model_and_transforms("local-dir:OUT")`` and
``open_clip.get_tokenizer("local-dir:OUT")`` then compute RILS's ``encode_image`` /
``encode_text`` (float32, reordered sums only) and its token ids. How each RILS detail is
expressed in OpenCLIP's config (open_clip >= 3.0):

- vision: no ``ln_pre`` (``no_ln_pre``); mean of final-normed patch tokens, cls excluded
  (``pool_type="avg"``, ``final_ln_after_pool=false``); LayerNorm eps via ``norm_kwargs``;
  the fixed sin-cos table stored in the learnable ``positional_embedding``. OpenCLIP's
  ``conv1`` has no bias, so the patch-embedding bias is folded into the positional rows of the
  patches (the cls row stays zero): ``conv(x) + b + pos == conv_nobias(x) + (pos + b)``;
- attention: RILS's learned q/v bias with k bias fixed at zero is ``in_proj_bias =
  cat(q_bias, 0, v_bias)``;
- text: pooling at the end-of-text token by id (``pool_type="eos"``, ``eos_id=3``); OpenCLIP's
  default ``argmax`` pooling assumes the end token has the highest id, which is not so here;
- activations: OpenCLIP has one ``quick_gelu`` flag for both towers. When the towers differ
  (RILS's default: exact-GELU vision, QuickGELU text), the vision tower is a timm trunk whose
  own activation is GELU, with the projection as OpenCLIP's ``head.proj``; the flag then serves
  the text tower. OpenCLIP builds a trunk with ``timm.create_model(vision_cfg.timm_model_name)``
  and nothing else (open_clip 3.3 ``TimmModel``: no model arguments reach timm), so:

  * when a registered timm ViT is exactly this encoder (``timm_format.TIMM_REGISTRY_VITS``:
    every preset from ``small`` up at its native resolution), ``timm_model_name`` is that name
    and the folder holds no path: it can be moved, copied or uploaded as it is;
  * otherwise (``tiny``, other resolutions) timm can only build the trunk from a folder's
    ``config.json`` (``OUT/timm_trunk``), and timm resolves that path against the current
    directory, not against OUT. It is written absolute, the export is *not relocatable*, and
    the converter says so; after moving OUT, ``python -m rils_scale.checkpoint.open_clip_export
    relocate NEW_DIR`` rewrites the one path (or re-export there);
- ``logit_scale``: the clamped value the trained model uses.

The RILS decoder is not part of a CLIP model and is left out.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..models.vision import sincos_2d_position_embedding
from .export_common import _copy_tokenizer, _image_config, _prepare_dir, text_activation, vision_activation
from .layout import CheckpointError
from .serialization import StreamingSafetensorsWriter, write_json
from .sources import Source
from .timm_format import _timm_entries, describe_vision, iter_timm_tensors, timm_hub_config, timm_registry_name

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"  # the first name open_clip's local-dir loader looks for
TIMM_TRUNK_DIR = "timm_trunk"
VISION_TOWERS = ("auto", "native", "timm")


@dataclass
class _Target:
    """One output tensor: its name, shape, the RILS tensors it is built from and how."""

    name: str
    shape: Tuple[int, ...]
    inputs: Tuple[str, ...]
    build: Callable[..., torch.Tensor] = lambda t: t


def _block_targets(src: str, dst: str, width: int, hidden: int, qv_bias: bool) -> List[_Target]:
    """A RILS pre-norm block (``src``) as an OpenCLIP ``ResidualAttentionBlock`` (``dst``)."""
    d, h = width, hidden
    t = [_Target(dst + "ln_1.weight", (d,), (src + "norm1.weight",)),
         _Target(dst + "ln_1.bias", (d,), (src + "norm1.bias",)),
         _Target(dst + "attn.in_proj_weight", (3 * d, d), (src + "attn.qkv.weight",)),
         _Target(dst + "attn.out_proj.weight", (d, d), (src + "attn.proj.weight",)),
         _Target(dst + "attn.out_proj.bias", (d,), (src + "attn.proj.bias",)),
         _Target(dst + "ln_2.weight", (d,), (src + "norm2.weight",)),
         _Target(dst + "ln_2.bias", (d,), (src + "norm2.bias",)),
         _Target(dst + "mlp.c_fc.weight", (h, d), (src + "mlp.fc1.weight",)),
         _Target(dst + "mlp.c_fc.bias", (h,), (src + "mlp.fc1.bias",)),
         _Target(dst + "mlp.c_proj.weight", (d, h), (src + "mlp.fc2.weight",)),
         _Target(dst + "mlp.c_proj.bias", (d,), (src + "mlp.fc2.bias",))]
    if qv_bias:
        t.append(_Target(dst + "attn.in_proj_bias", (3 * d,), (src + "attn.q_bias", src + "attn.v_bias"),
                         lambda q, v: torch.cat([q, torch.zeros_like(q), v])))
    else:
        t.append(_Target(dst + "attn.in_proj_bias", (3 * d,), (src + "attn.qkv.bias",)))
    return t


def _native_vision_targets(cfg) -> List[_Target]:
    v = cfg.vision
    d = v.width
    sincos = sincos_2d_position_embedding(d, v.grid_size)  # [1 + N, D], cls row zero

    def positions(bias):  # fold the patch-embedding bias into the patch rows
        pos = sincos.clone()
        pos[1:] += bias
        return pos

    t = [_Target("visual.conv1.weight", (d, 3, v.patch_size, v.patch_size), ("visual.patch_embed.weight",)),
         _Target("visual.positional_embedding", (1 + v.num_patches, d), ("visual.patch_embed.bias",), positions),
         _Target("visual.class_embedding", (d,), ("visual.cls_token",), lambda c: c.reshape(d)),
         _Target("visual.ln_post.weight", (d,), ("visual.norm.weight",)),
         _Target("visual.ln_post.bias", (d,), ("visual.norm.bias",)),
         _Target("visual.proj", (d, cfg.embed_dim), ("image_projection.weight",))]
    for i in range(v.depth):
        t += _block_targets(f"visual.transformer.blocks.{i}.", f"visual.transformer.resblocks.{i}.", d,
                            v.mlp_hidden, qv_bias=True)
    return t


def _text_targets(cfg) -> List[_Target]:
    x = cfg.text
    w = x.width
    t = [_Target("token_embedding.weight", (x.vocab_size, w), ("text.token_embedding.weight",)),
         _Target("positional_embedding", (x.context_length, w), ("text.positional_embedding",)),
         _Target("ln_final.weight", (w,), ("text.ln_final.weight",)),
         _Target("ln_final.bias", (w,), ("text.ln_final.bias",)),
         _Target("text_projection", (w, cfg.embed_dim), ("text_projection.weight",)),
         _Target("logit_scale", (), ("logit_scale.value",),
                 lambda s: s.clamp(max=cfg.logit_scale_max).reshape(()))]
    for i in range(x.depth):
        t += _block_targets(f"text.transformer.blocks.{i}.", f"transformer.resblocks.{i}.", w, x.mlp_hidden,
                            qv_bias=False)
    return t


def _write_targets(writer: StreamingSafetensorsWriter, source: Source, targets: Sequence[_Target]) -> None:
    """Stream the RILS tensors the targets need; write each target once all its inputs came."""
    waiting: Dict[str, List[_Target]] = {}
    for target in targets:
        for name in target.inputs:
            waiting.setdefault(name, []).append(target)
    missing = [n for n in waiting if n not in set(source.names())]
    if missing:
        raise CheckpointError(f"checkpoint lacks {missing[:5]} needed by the OpenCLIP export")
    held: Dict[str, torch.Tensor] = {}
    for name, tensor in source.iter_full_tensors(list(waiting)):
        held[name] = tensor.float()
        for target in waiting[name]:
            if all(n in held for n in target.inputs):
                writer.write(target.name, target.build(*(held[n] for n in target.inputs)).contiguous())
        for n in [n for n in held if all(all(i in held for i in t.inputs) for t in waiting[n])]:
            del held[n]  # every target reading it is written


def open_clip_model_config(cfg, vision_tower: str, trunk_dir: Optional[str] = None) -> dict:
    v, x = cfg.vision, cfg.text
    from ..data.tokenizer_training import EOT_ID, PAD_ID
    if vision_tower == "native":
        vision = {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.width, "layers": v.depth,
                  "head_width": v.width // v.heads, "mlp_ratio": v.mlp_hidden / v.width, "no_ln_pre": True,
                  "pool_type": "avg", "final_ln_after_pool": False, "pos_embed_type": "learnable",
                  "norm_kwargs": {"eps": v.layer_norm_eps}}
    else:  # a registered timm name needs no path (the folder stays relocatable); else the trunk folder
        registry = timm_registry_name(cfg)
        trunk = registry if registry is not None else "local-dir:" + os.path.abspath(trunk_dir)
        vision = {"image_size": v.image_size, "timm_model_name": trunk,
                  "timm_model_pretrained": False, "timm_pool": "avg", "timm_proj": "linear",
                  "timm_proj_bias": False}
    text = {"context_length": x.context_length, "vocab_size": x.vocab_size, "width": x.width, "heads": x.heads,
            "layers": x.depth, "mlp_ratio": x.mlp_hidden / x.width, "pool_type": "eos", "eos_id": EOT_ID,
            "pad_id": x.pad_id if x.pad_id is not None else PAD_ID, "norm_kwargs": {"eps": x.layer_norm_eps},
            "proj_bias": False,
            # any non-empty name selects OpenCLIP's HFTokenizer; with local-dir: it reads this directory
            # (after uploading the directory to the Hugging Face Hub, set it to the repo id)
            "hf_tokenizer_name": "local-dir", "tokenizer_kwargs": {"clean": "whitespace"}}
    return {"embed_dim": cfg.embed_dim, "quick_gelu": text_activation(cfg) == "quick_gelu",
            "vision_cfg": vision, "text_cfg": text}


def export_open_clip(source: Source, output_dir: str, *, tokenizer: Optional[str] = None,
                     vision_tower: str = "auto", overwrite: bool = False) -> Dict[str, str]:
    """Write an OpenCLIP ``local-dir:`` model (see the module docstring).

    ``vision_tower``: ``"native"`` (OpenCLIP's own ViT; needs the same activation in both
    towers), ``"timm"`` (a timm trunk, any activation) or ``"auto"`` (native when possible).
    """
    try:  # the tokenizer conversion needs them; say how to get them instead of a traceback
        import tokenizers  # noqa: F401
        from sentencepiece import sentencepiece_model_pb2  # noqa: F401  (needs protobuf)
    except ImportError as err:
        raise CheckpointError(f"--format open_clip needs the interop packages ({err}): "
                              "pip install -e '.[interop]'") from None
    from ..data.hf_tokenizer import write_hf_tokenizer
    from ..data.tokenizer import Tokenizer
    from ..data.transforms import CLIP_MEAN, CLIP_STD

    if vision_tower not in VISION_TOWERS:
        raise CheckpointError(f"vision_tower must be one of {VISION_TOWERS}, got {vision_tower!r}")
    cfg = source.model_config
    same_activation = vision_activation(cfg) == text_activation(cfg)
    if vision_tower == "auto":
        vision_tower = "native" if same_activation else "timm"
    if vision_tower == "native" and not same_activation:
        raise CheckpointError(f"vision ({vision_activation(cfg)}) and text ({text_activation(cfg)}) activations "
                              "differ and OpenCLIP has one quick_gelu flag: use vision_tower='timm'")
    _prepare_dir(output_dir, overwrite)
    tok_path = _copy_tokenizer(source, output_dir, tokenizer, required=True)
    tok = Tokenizer.load(tok_path)
    if tok.vocab_size != cfg.text.vocab_size:
        raise CheckpointError(f"tokenizer {tok_path} has {tok.vocab_size} ids, the model {cfg.text.vocab_size}")
    hf_files = write_hf_tokenizer(tok.serialized(), output_dir, cfg.text.context_length)

    written = {}
    trunk_dir = os.path.join(output_dir, TIMM_TRUNK_DIR)
    text_targets = _text_targets(cfg)
    if vision_tower == "native":
        vision_targets = _native_vision_targets(cfg)
        entries = [(t.name, t.shape, torch.float32) for t in vision_targets + text_targets]
    else:
        trunk = [("visual.trunk." + n, s) for n, s in _timm_entries(cfg) if not n.startswith("head.")]
        entries = [(n, s, torch.float32) for n, s in trunk]
        entries.append(("visual.head.proj.weight", (cfg.embed_dim, cfg.vision.width), torch.float32))
        entries += [(t.name, t.shape, torch.float32) for t in text_targets]
    weights = os.path.join(output_dir, OPEN_CLIP_WEIGHTS)
    with StreamingSafetensorsWriter(weights, entries, {"format": "pt", "producer": "rils_scale"}) as writer:
        if vision_tower == "native":
            _write_targets(writer, source, vision_targets)
        else:
            for name, tensor in iter_timm_tensors(source):
                if name == "head.weight":
                    writer.write("visual.head.proj.weight", tensor)
                elif name != "head.bias":  # RILS's projection has no bias
                    writer.write("visual.trunk." + name, tensor)
        _write_targets(writer, source, text_targets)
    relocatable = vision_tower == "native" or timm_registry_name(cfg) is not None
    if vision_tower == "timm":
        if relocatable:
            written["timm_trunk"] = f"timm architecture {timm_registry_name(cfg)} (by name: no path in the folder)"
        else:
            os.makedirs(trunk_dir, exist_ok=True)
            write_json(os.path.join(trunk_dir, "config.json"), timm_hub_config(cfg, source))
            written["timm_trunk"] = trunk_dir
            written["warning"] = (
                f"this OpenCLIP export loads only from {os.path.abspath(output_dir)}: its vision tower "
                f"({describe_vision(cfg)}) differs in activation from the text tower, so it is a timm trunk, "
                "and no registered timm architecture has its shape, so open_clip_config.json names the trunk "
                "folder by absolute path (timm resolves it against the current directory). After moving or "
                "copying the folder run: python -m rils_scale.checkpoint.open_clip_export relocate NEW_DIR")

    image = _image_config(cfg)
    write_json(os.path.join(output_dir, OPEN_CLIP_CONFIG), {
        "model_cfg": open_clip_model_config(cfg, vision_tower, trunk_dir),
        "preprocess_cfg": {"size": image["size"], "mode": "RGB", "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0},
        "rils_scale": {
            "source": source.describe(), "vision_tower": vision_tower, "decoder": "not exported",
            "relocatable": relocatable,
            "notes": ["OpenCLIP's transform converts RGBA/LA/palette-with-transparency images with "
                      "PIL convert('RGB') (transparent pixels take their stored colour); rils_scale "
                      "composites them on white first. RGB, L and CMYK inputs are processed alike.",
                      "OpenCLIP's HFTokenizer first runs ftfy.fix_text and html.unescape (twice) on each "
                      "text; rils_scale's tokenizer does not, so texts with HTML entities or mojibake "
                      "can tokenize differently. Plain text gives identical ids."]},
    })
    written.update(weights=weights, config=os.path.join(output_dir, OPEN_CLIP_CONFIG),
                   tokenizer=", ".join(os.path.basename(p) for p in hf_files) + " + tokenizer.model")
    return written


def relocate_open_clip(path: str) -> str:
    """Point a moved export's ``timm_model_name`` at its own ``timm_trunk`` folder again (only
    exports whose trunk no timm architecture name builds carry a path). Returns the new name."""
    config_path = os.path.join(path, OPEN_CLIP_CONFIG)
    trunk = os.path.join(path, TIMM_TRUNK_DIR)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{path} holds no {OPEN_CLIP_CONFIG}: not an OpenCLIP export")
    with open(config_path) as f:
        config = json.load(f)
    vision = config["model_cfg"]["vision_cfg"]
    if not str(vision.get("timm_model_name", "")).startswith("local-dir:"):
        return str(vision.get("timm_model_name", "native"))  # nothing to relocate
    if not os.path.isfile(os.path.join(trunk, "config.json")):
        raise CheckpointError(f"{trunk}/config.json is missing: copy the whole export folder")
    vision["timm_model_name"] = "local-dir:" + os.path.abspath(trunk)
    write_json(config_path, config)
    return vision["timm_model_name"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(
        prog="python -m rils_scale.checkpoint.open_clip_export",
        description="relocate DIR: after moving an OpenCLIP export whose timm trunk is named by path, point "
                    "it at DIR/timm_trunk (exports without a path need nothing)")
    parser.add_argument("command", choices=("relocate",))
    parser.add_argument("dir", help="the export folder, where it is now")
    args = parser.parse_args(argv)
    try:
        name = relocate_open_clip(args.dir)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"[open_clip_export] {args.dir}: vision tower {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
