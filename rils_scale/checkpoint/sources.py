"""Anything the exporters can read: a DeepSpeed checkpoint or an exported ``rils`` directory.

Both offer the same small interface (``model_config``, ``names()``, ``full_shape(name)``,
``iter_full_tensors()``, ``tokenizer_path()``, ``describe()``, ``step``, ``client_state``,
``lr_scheduler``, ``run_config()``), so ``rils`` -> ``timm`` works as well as DeepSpeed -> ``timm``.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Iterator, List, Optional, Tuple, Union

import torch

from ..models.config import RILSConfig
from .consolidate import Checkpoint, open_checkpoint
from .layout import CheckpointError

RILS_FORMAT = "rils"
RILS_WEIGHTS = "model.safetensors"
RILS_CONFIG = "config.json"


def _read_config(path: str) -> dict:
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:  # ValueError: malformed JSON, undecodable bytes
        raise CheckpointError(f"{path}: not a readable JSON config ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def is_rils_dir(path: str) -> bool:
    cfg = os.path.join(path, RILS_CONFIG)
    if not (os.path.isfile(cfg) and os.path.isfile(os.path.join(path, RILS_WEIGHTS))):
        return False
    return _read_config(cfg).get("format") == RILS_FORMAT


class RilsDirSource:
    """An exported ``rils`` directory (``model.safetensors`` + ``config.json`` + ``tokenizer.model``)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.config = _read_config(os.path.join(self.path, RILS_CONFIG))
        try:
            self.model_config = RILSConfig.from_dict(self.config["model"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{os.path.join(self.path, RILS_CONFIG)}: no usable model configuration "
                                  f"({type(err).__name__}: {err})") from None
        from .serialization import open_safetensors
        self._weights = os.path.join(self.path, RILS_WEIGHTS)
        with open_safetensors(self._weights) as f:
            self._shapes = OrderedDict((n, torch.Size(f.get_slice(n).get_shape())) for n in f.keys())
        source = self.config.get("source", {})
        self.step = source.get("step")
        self.client_state = {"step": self.step, "model_config": self.config["model"]}
        self.lr_scheduler = None

    def names(self) -> List[str]:
        return list(self._shapes)

    def full_shape(self, name: str) -> torch.Size:
        return self._shapes[name]

    def iter_full_tensors(self, names=None, release_every=None) -> Iterator[Tuple[str, torch.Tensor]]:
        from .serialization import iter_safetensors
        yield from ((n, t.float()) for n, t in iter_safetensors(self._weights, names or self.names()))

    def tokenizer_path(self) -> Optional[str]:
        p = os.path.join(self.path, self.config.get("tokenizer", "tokenizer.model"))
        return p if os.path.isfile(p) else None

    def run_config(self) -> Optional[dict]:
        return None

    def describe(self) -> dict:
        return dict(self.config.get("source", {}), exported_from=self.path)


Source = Union[Checkpoint, RilsDirSource]


def open_source(path: str, tag: Optional[str] = None, *, trusted: bool = False,
                replica_tolerance: float = 0.0) -> Source:
    """A ``rils`` export directory, or a DeepSpeed run / checkpoints / tag directory."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist")
    if is_rils_dir(path):
        if tag is not None:
            raise CheckpointError(f"{path} is an exported rils directory: --tag does not apply")
        return RilsDirSource(path)
    return open_checkpoint(path, tag, trusted=trusted, replica_tolerance=replica_tolerance)


def source_tokenizer(source: Source) -> Optional[str]:
    if isinstance(source, Checkpoint):
        return source.ref.tokenizer_path()
    return source.tokenizer_path()


def source_run_config(source: Source) -> Optional[dict]:
    return source.ref.run_config() if isinstance(source, Checkpoint) else None
