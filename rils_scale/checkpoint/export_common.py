"""Pieces every export format shares: the output directory, the tokenizer copy, the image
transform description and the towers' activations (read by the timm and OpenCLIP exports)."""
from __future__ import annotations

import os
import shutil
from typing import Optional

from ..models.config import RILSConfig
from .layout import CheckpointError
from .sources import Source, source_tokenizer


def _image_config(cfg: RILSConfig) -> dict:
    from ..data.transforms import CLIP_MEAN, CLIP_STD
    return {"size": cfg.vision.image_size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
            "interpolation": "bicubic", "resize": "shorter side to size, then center crop (crop_pct 1.0)"}


def _prepare_dir(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise CheckpointError(f"output directory {path} exists and is not empty (pass --overwrite to replace files)")
    os.makedirs(path, exist_ok=True)


def _copy_tokenizer(source: Source, out_dir: str, tokenizer: Optional[str], required: bool) -> Optional[str]:
    path = tokenizer or source_tokenizer(source)
    if path is None:
        if required:
            raise CheckpointError("no tokenizer found next to the checkpoint (RUN/tokenizer.model) or in its "
                                  "config.json: pass --tokenizer PATH")
        return None
    dest = os.path.join(out_dir, "tokenizer.model")
    if os.path.abspath(path) != os.path.abspath(dest):
        shutil.copyfile(path, dest)
    return dest


def vision_activation(cfg: RILSConfig) -> str:
    """MLP activation of the vision tower: ``"gelu"`` (exact) or ``"quick_gelu"``; configs
    written before the ``activation`` field existed are GELU."""
    return _activation(getattr(cfg.vision, "activation", "gelu"))


def text_activation(cfg: RILSConfig) -> str:
    """MLP activation of the text tower (``"gelu"`` for configs without the field)."""
    return _activation(getattr(cfg.text, "activation", "gelu"))


def _activation(name: str) -> str:
    name = str(name).lower().replace("-", "_")
    name = {"quickgelu": "quick_gelu", "gelu_exact": "gelu"}.get(name, name)
    if name not in ("gelu", "quick_gelu"):
        raise CheckpointError(f"activation {name!r} has no timm/OpenCLIP equivalent (gelu, quick_gelu)")
    return name
