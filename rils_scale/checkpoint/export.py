"""Export a checkpoint as ``rils`` (safetensors + config), ``timm`` (vision encoder, timm's hub
layout), ``open_clip`` (image + text towers, OpenCLIP's ``local-dir:`` layout; see
``open_clip_export``) or ``deepspeed`` (weights-only checkpoint for another TP size). All
stream: one full tensor in memory at a time (see docs/checkpoints.md). The pieces the formats
share live in ``export_common`` and ``timm_format`` (re-exported here for older imports).
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from ..parallel.sharding import padded_size, split_full_tensor
from .consolidate import OPTIMIZER_KINDS
from .export_common import _copy_tokenizer, _image_config, _prepare_dir, text_activation, vision_activation
from .layout import WEIGHTS_ONLY_MARKER, CheckpointError, tensor_parallel_layout_for
from .open_clip_export import export_open_clip
from .serialization import StreamingSafetensorsWriter, write_json
from .sources import RILS_CONFIG, RILS_FORMAT, RILS_WEIGHTS, Source, source_run_config
from .timm_format import _timm_entries, iter_timm_tensors, rils_to_timm_name, timm_hub_config, timm_model_kwargs

__all__ = ["FORMATS", "export", "export_rils", "export_timm", "export_open_clip", "export_deepspeed",
           "timm_model_kwargs", "timm_hub_config", "rils_to_timm_name", "iter_timm_tensors", "text_activation",
           "vision_activation"]

FORMATS = ("rils", "timm", "open_clip", "deepspeed")


# --------------------------------------------------------------------------------------- rils
def export_rils(source: Source, output_dir: str, *, tokenizer: Optional[str] = None,
                overwrite: bool = False) -> Dict[str, str]:
    """``model.safetensors`` (fp32, TP=1 names) + ``config.json`` + ``tokenizer.model``."""
    _prepare_dir(output_dir, overwrite)
    cfg = source.model_config
    names = source.names()
    weights = os.path.join(output_dir, RILS_WEIGHTS)
    with StreamingSafetensorsWriter(weights, [(n, source.full_shape(n), torch.float32) for n in names],
                                    {"format": "pt", "producer": "rils_scale"}) as writer:
        for name, tensor in source.iter_full_tensors():
            writer.write(name, tensor)
    tok = _copy_tokenizer(source, output_dir, tokenizer, required=True)
    write_json(os.path.join(output_dir, RILS_CONFIG), {
        "format": RILS_FORMAT, "format_version": 1, "model": cfg.to_dict(), "tokenizer": "tokenizer.model",
        "weights": RILS_WEIGHTS, "dtype": "float32", "image": _image_config(cfg), "source": source.describe(),
    })
    return {"weights": weights, "config": os.path.join(output_dir, RILS_CONFIG), "tokenizer": tok}


# --------------------------------------------------------------------------------------- timm
def export_timm(source: Source, output_dir: str, *, overwrite: bool = False) -> Dict[str, str]:
    """The vision encoder (+ image projection as ``head``) in timm's hub layout:
    ``config.json`` + ``model.safetensors``, loaded by
    ``timm.create_model("local-dir:DIR", pretrained=True[, num_classes=N])``. Also writes the
    older ``timm_config.json`` sidecar (``model_kwargs`` for ``VisionTransformer(**kwargs)``)."""
    _prepare_dir(output_dir, overwrite)
    cfg = source.model_config
    weights = os.path.join(output_dir, "model.safetensors")
    with StreamingSafetensorsWriter(weights, [(n, s, torch.float32) for n, s in _timm_entries(cfg)],
                                    {"format": "pt", "producer": "rils_scale"}) as writer:
        for name, tensor in iter_timm_tensors(source):
            writer.write(name, tensor)
    hub = timm_hub_config(cfg, source)
    write_json(os.path.join(output_dir, "config.json"), hub)
    write_json(os.path.join(output_dir, "timm_config.json"), {
        "architecture": hub["architecture"],
        "architecture_note": hub["architecture_note"],
        "model_kwargs": timm_model_kwargs(cfg),
        "usage": ("timm.create_model('local-dir:' + DIR, pretrained=True) (config.json); or "
                  "timm.models.vision_transformer.VisionTransformer(**cfg['model_kwargs']) + "
                  "load_state_dict(safetensors.torch.load_file('model.safetensors'), strict=True). "
                  "model(x) == RILS encode_image(x) (unnormalised); num_classes=0 gives the pooled "
                  "features; model.forward_features(x) the final-normed tokens [B, 1 + N, D] (cls first)."),
        "pretrained_cfg": hub["pretrained_cfg"],
        "notes": {"pos_embed": "fixed 2-D sin-cos table (MAE), stored as timm's learnable pos_embed; "
                               "freeze it or keep it, and resample it for other resolutions",
                  "head": "RILS image_projection (weight = projection.T, zero bias)"},
        "source": source.describe(),
    })
    return {"weights": weights, "config": os.path.join(output_dir, "config.json"),
            "sidecar": os.path.join(output_dir, "timm_config.json")}


# ---------------------------------------------------------------------------------- deepspeed
def export_deepspeed(source: Source, output_dir: str, tensor_parallel: int, *, tokenizer: Optional[str] = None,
                     overwrite: bool = False, with_optimizer: Optional[bool] = None) -> Dict[str, str]:
    """A weights-only checkpoint for ``tensor_parallel`` TP ranks, laid out as a run directory::

        OUT/config.json, OUT/tokenizer.model
        OUT/checkpoints/latest
        OUT/checkpoints/<tag>/rils_weights.json          marker + client state + LR-schedule state
        OUT/checkpoints/<tag>/tp_rank_XX.safetensors     TP rank XX's shards, fp32, trainer names

        OUT/checkpoints/<tag>/tp_rank_XX_optim.safetensors  with_optimizer: Adam's exp_avg.* / exp_avg_sq.*
        OUT/checkpoints/<tag>/rils_complete.json         written last: the tag is complete

    ``pretrain.py --output-dir OUT --resume --tensor-parallel N`` loads it (any ZeRO stage, any
    DP size): fp32 weights exactly, step / samples / LR schedule restored, and with
    ``with_optimizer`` (default: whenever the source holds Adam moments) both moments and
    Adam's step count exactly, so training continues as if never interrupted (elastic resume).
    """
    if tensor_parallel < 1:
        raise CheckpointError(f"--tensor-parallel must be >= 1, got {tensor_parallel}")
    cfg = source.model_config
    try:
        layout = tensor_parallel_layout_for(cfg, tensor_parallel)
    except ValueError as err:
        raise CheckpointError(f"model {cfg.name!r} cannot be split over TP={tensor_parallel}: {err}") from None
    step = source.step if source.step is not None else 0
    tag = getattr(getattr(source, "ref", None), "tag", None) or f"global_step{step}"
    checkpoints = os.path.join(output_dir, "checkpoints")
    tag_dir = os.path.join(checkpoints, tag)
    if os.path.exists(tag_dir) and not overwrite:
        raise CheckpointError(f"{tag_dir} already exists (pass --overwrite to replace it)")
    os.makedirs(tag_dir, exist_ok=True)

    def shard_shape(name):
        full = list(source.full_shape(name))
        spec = layout.get(name)
        if spec is None:
            return tuple(full)
        size = padded_size(full[spec.partition_dim], tensor_parallel) if spec.vocab_size is not None \
            else full[spec.partition_dim]
        full[spec.partition_dim] = size // tensor_parallel
        return tuple(full)

    names = source.names()
    has_optimizer = bool(getattr(source, "has_optimizer_state", lambda: False)())
    if with_optimizer is None:
        with_optimizer = has_optimizer
    if with_optimizer and not has_optimizer:
        raise CheckpointError(f"{source.describe().get('path')}: no Adam moments to carry (a weights-only source or a "
                              "ZeRO-0/1/2 checkpoint); convert with --weights-only")
    files = [f"tp_rank_{t:02d}.safetensors" for t in range(tensor_parallel)]
    _write_tp_shards(source, layout, tag_dir, files, names, shard_shape, tensor_parallel, kinds=("fp32",))
    optimizer_meta = "not stored: Adam moments start from zero on resume (docs/checkpoints.md)"
    if with_optimizer:
        optim_files = [f"tp_rank_{t:02d}_optim.safetensors" for t in range(tensor_parallel)]
        _write_tp_shards(source, layout, tag_dir, optim_files, names, shard_shape, tensor_parallel,
                         kinds=OPTIMIZER_KINDS)
        optimizer_meta = {"files": optim_files, "kinds": list(OPTIMIZER_KINDS), "step": source.optimizer_step()}
    client = dict(source.client_state)
    client.update(step=step, tensor_parallel=tensor_parallel, model_config=cfg.to_dict())
    client.setdefault("batches_consumed", 0)
    client.setdefault("skipped", {})
    write_json(os.path.join(tag_dir, WEIGHTS_ONLY_MARKER), {
        "format": "rils-weights-only", "format_version": 1, "tensor_parallel": tensor_parallel, "files": files,
        "client_state": {k: client[k] for k in ("step", "batches_consumed", "skipped", "model_config",
                                                "tensor_parallel", "tokenizer_sha256", "skip_batches",
                                                "rollbacks") if k in client},
        "lr_scheduler": _jsonable(getattr(source, "lr_scheduler", None)),
        "optimizer": optimizer_meta,
        "source": source.describe(),
    })
    from .integrity import mark_complete, write_latest
    mark_complete(tag_dir, {"tag": tag, "step": step, "converted": True})
    write_latest(checkpoints, tag)
    run_cfg = source_run_config(source) or {}
    run_cfg = dict(run_cfg, model=cfg.to_dict(), tokenizer="tokenizer.model")
    run_cfg["parallel"] = dict(run_cfg.get("parallel", {}), tensor_parallel=tensor_parallel)
    run_cfg["converted_from"] = source.describe()
    write_json(os.path.join(output_dir, "config.json"), run_cfg)
    tok = _copy_tokenizer(source, output_dir, tokenizer, required=False)
    return {"checkpoint": tag_dir, "files": ", ".join(files), "config": os.path.join(output_dir, "config.json"),
            "tokenizer": tok or "(none found: pass --tokenizer to the trainer)"}


def _write_tp_shards(source, layout, tag_dir, files, names, shard_shape, tensor_parallel, kinds) -> None:
    """One safetensors file per TP rank with ``kind.name`` entries (plain ``name`` for fp32)."""
    key = lambda kind, n: n if kind == "fp32" else f"{kind}.{n}"  # noqa: E731
    entries = [(key(k, n), shard_shape(n), torch.float32) for k in kinds for n in names]
    writers = [StreamingSafetensorsWriter(os.path.join(tag_dir, f), entries, {"format": "pt", "tp_rank": str(t)})
               for t, f in enumerate(files)]
    try:
        for kind in kinds:
            for name, tensor in source.iter_full_tensors(kind=kind) if kind != "fp32" else source.iter_full_tensors():
                spec = layout.get(name)
                if spec is None:
                    for w in writers:
                        w.write(key(kind, name), tensor)
                    continue
                shards = split_full_tensor(tensor, spec.partition_dim, tensor_parallel, stride=spec.stride,
                                           pad=spec.vocab_size is not None)
                for w, shard in zip(writers, shards):
                    w.write(key(kind, name), shard)
                del shards
        for w in writers:
            w.close()
    except BaseException:
        for w in writers:
            w.abort()
        raise


def _jsonable(obj):
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    return None


def export(source: Source, fmt: str, output: str, *, tensor_parallel: int = 1, tokenizer: Optional[str] = None,
           overwrite: bool = False, vision_tower: str = "auto",
           with_optimizer: Optional[bool] = None) -> Dict[str, str]:
    if fmt == "rils":
        return export_rils(source, output, tokenizer=tokenizer, overwrite=overwrite)
    if fmt == "timm":
        return export_timm(source, output, overwrite=overwrite)
    if fmt == "open_clip":
        return export_open_clip(source, output, tokenizer=tokenizer, vision_tower=vision_tower, overwrite=overwrite)
    if fmt == "deepspeed":
        return export_deepspeed(source, output, tensor_parallel, tokenizer=tokenizer, overwrite=overwrite,
                                with_optimizer=with_optimizer)
    raise CheckpointError(f"unknown format {fmt!r}; choose from {FORMATS}")
