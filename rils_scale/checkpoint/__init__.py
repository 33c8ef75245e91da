"""Checkpoints: DeepSpeed ZeRO x TP shards -> one state dict -> rils / timm / open_clip / deepspeed formats.

Modules, one concern each:
    layout         run-directory and shard-file layout, the TP split rules of the model
    serialization  safe reading of DeepSpeed files, streaming safetensors writer
    file_bounds    what a DeepSpeed file may make a reader build (checked before and after unpickling)
    consolidate    ZeRO partitions per TP rank -> merged fp32 tensors (streamed)
    sources        a DeepSpeed checkpoint or an exported rils directory, behind one interface
    export         rils / timm (hub layout) / deepspeed (weights-only, any TP) exporters
    open_clip_export  the CLIP towers as an OpenCLIP local-dir: model (lazy: the trainer never imports it)
    resume         the trainer's loader for weights-only checkpoints
    load           load_model(): a single-process model for downstream use
See docs/checkpoints.md.
"""
from .consolidate import Checkpoint, ReplicaMismatchError, consolidate, open_checkpoint
from .export import FORMATS, export, export_deepspeed, export_rils, export_timm, timm_hub_config, timm_model_kwargs
from .layout import CheckpointError, resolve_checkpoint, tensor_parallel_layout_for
from .load import load_model

__all__ = ["Checkpoint", "CheckpointError", "FORMATS", "ReplicaMismatchError", "consolidate", "export",
           "export_deepspeed", "export_rils", "export_timm", "load_model", "open_checkpoint",
           "resolve_checkpoint", "tensor_parallel_layout_for", "timm_hub_config", "timm_model_kwargs"]
