"""``load_model``: a single-process RILS model (no TP, no DeepSpeed) for downstream use."""
from __future__ import annotations

from typing import List, Optional, Union

import torch

from ..models import RILS, build_model
from .layout import CheckpointError
from .sources import RilsDirSource, open_source, source_tokenizer


def load_model(path: str, device: Union[str, torch.device] = "cpu", *, tag: Optional[str] = None,
               tokenizer: Optional[str] = None, trusted: bool = False) -> RILS:
    """Load a model for inference.

    Args:
        path: an exported ``rils`` directory (``convert_checkpoint.py --format rils``), or a
            training run directory / its ``checkpoints/`` directory / one tag directory, which
            is consolidated on the fly (any ZeRO stage, TP and DP size).
        device: where to put the model.
        tag: checkpoint tag for DeepSpeed paths (default: ``latest``).
        tokenizer: override the tokenizer file.
        trusted: see :func:`rils_scale.checkpoint.serialization.load_ds_file`.

    Returns:
        ``RILS`` in eval mode, fp32, with ``.tokenizer`` (a ``Tokenizer``), ``.transform`` (the
        eval image transform: PIL image -> normalised tensor), ``.tokenize(texts)`` (ids at the
        model's context length) and the usual ``encode_image`` / ``encode_text`` / ``encode_patches``.
    """
    from ..data.tokenizer import Tokenizer
    from ..data.transforms import eval_transform

    source = open_source(path, tag, trusted=trusted)
    cfg = source.model_config
    model = build_model(cfg, attn_backend="auto")  # RILS, or SemMIM (momentum branch included)
    state = dict(source.iter_full_tensors())
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that do not fit the configuration stored next to them
        raise CheckpointError(f"{path}: the weights do not fit the model its configuration describes "
                              f"({str(err).strip().splitlines()[-1][:300]})") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    del state
    model.to(device).eval()
    tok_path = tokenizer or source_tokenizer(source)
    if tok_path is None:
        raise CheckpointError(f"{path}: no tokenizer.model found; pass tokenizer=PATH")
    model.tokenizer = Tokenizer.load(tok_path)
    if model.tokenizer.vocab_size != cfg.text.vocab_size:
        raise CheckpointError(f"tokenizer {tok_path} has {model.tokenizer.vocab_size} ids, the model "
                              f"{cfg.text.vocab_size}: wrong tokenizer file?")
    model.transform = eval_transform(cfg.vision.image_size)
    context = cfg.text.context_length

    def tokenize(texts: Union[str, List[str]]) -> torch.LongTensor:
        return model.tokenizer(texts, context).to(device)

    model.tokenize = tokenize
    model.source = source.describe()
    return model


__all__ = ["load_model", "RilsDirSource"]
