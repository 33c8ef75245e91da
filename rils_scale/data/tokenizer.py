"""The caption tokenizer used by the loaders and the model: ``[sot, tokens..., eot, pad...]``.

See ``tokenizer_training`` for how the SentencePiece model is trained and why (BPE, case
folding inside the model, fixed special ids ``pad=0, unk=1, sot=2, eot=3``).
"""
from __future__ import annotations

import os

import sentencepiece as spm
import torch

from .tokenizer_training import EOT_ID, PAD_ID, SOT_ID, UNK_ID, normalize_caption, train_tokenizer

MAX_CAPTION_CHARS = 16 << 10
"""Captions are cut to this many characters before SentencePiece sees them: its time and memory
grow with the input (a 50 MB caption took 11 s and 3.3 GB), and a 77-token context needs far less."""

__all__ = ["EOT_ID", "PAD_ID", "SOT_ID", "UNK_ID", "Tokenizer", "normalize_caption", "train_tokenizer"]


class Tokenizer:
    """Encodes captions to fixed-length id rows ``[sot, tokens..., eot, pad(0)...]``.

    Over-long captions are truncated before ``eot`` so ``eot`` is always the last non-pad token,
    the position the text tower pools. Its copy state (spawn/forkserver DataLoader workers,
    deepcopy) is just the model-proto bytes.
    """

    pad_id = PAD_ID

    def __init__(self, processor: spm.SentencePieceProcessor):
        self._sp = processor
        if (processor.pad_id(), processor.bos_id(), processor.eos_id()) != (PAD_ID, SOT_ID, EOT_ID):
            raise ValueError(f"tokenizer model has pad/bos/eos ids ({processor.pad_id()}, {processor.bos_id()}, "
                             f"{processor.eos_id()}); expected ({PAD_ID}, {SOT_ID}, {EOT_ID}): train it with "
                             "rils_scale.data.train_tokenizer")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        return cls(spm.SentencePieceProcessor(model_file=str(path)))

    @classmethod
    def from_serialized(cls, proto: bytes) -> "Tokenizer":
        return cls(spm.SentencePieceProcessor(model_proto=proto))

    def serialized(self) -> bytes:
        """The model file's bytes (to store next to a checkpoint)."""
        return self._sp.serialized_model_proto()

    def __getstate__(self):
        return {"proto": self.serialized()}

    def __setstate__(self, state):
        self._sp = spm.SentencePieceProcessor(model_proto=state["proto"])

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included (the text tower's embedding rows)."""
        return self._sp.get_piece_size()

    @property
    def sot_id(self) -> int:
        return SOT_ID

    @property
    def eot_id(self) -> int:
        return EOT_ID

    def encode(self, text: str) -> list[int]:
        """Token ids of one caption, without sot/eot."""
        return self._sp.encode(normalize_caption(text[:MAX_CAPTION_CHARS]), out_type=int)

    def __call__(self, texts: list[str] | str, context_length: int = 77) -> torch.LongTensor:
        if context_length < 2:
            raise ValueError(f"context_length={context_length} leaves no room for sot and eot")
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), context_length), PAD_ID, dtype=torch.long)
        for row, ids in enumerate(self._sp.encode([normalize_caption(t[:MAX_CAPTION_CHARS]) for t in texts],
                                                         out_type=int)):
            ids = [SOT_ID, *ids[:context_length - 2], EOT_ID]
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids) -> str | list[str]:
        """Text of one id row (or a ``[B, L]`` batch); sot/eot/pad are dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            return [self.decode(row) for row in ids]
        return self._sp.decode([i for i in ids if i not in (PAD_ID, SOT_ID, EOT_ID)])
