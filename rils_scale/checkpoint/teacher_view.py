"""``convert_checkpoint.py --which teacher``: a checkpoint source read with SemMIM's momentum
encoder in the student's place (the momentum tensors themselves: :mod:`.momentum`)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from .layout import CheckpointError
from .momentum import MOMENTUM_PREFIX
from .sources import source_tokenizer

WHICH = ("student", "teacher")


class TeacherView:
    """A source (``Checkpoint`` or exported ``rils`` directory) in which every online module that has
    a momentum copy (vision encoder, text-fusion block, code head) reads its momentum weights:
    ``visual.X`` is ``momentum.visual.X``. Names, shapes and everything else are the source's, so
    every exporter writes the teacher exactly as it writes the student. The projections and the
    text tower have no momentum copy and stay the student's."""

    def __init__(self, source):
        self.source = source
        names = set(source.names())
        self._swap = {n: MOMENTUM_PREFIX + n for n in names if MOMENTUM_PREFIX + n in names}
        if not self._swap:
            raise CheckpointError("--which teacher: this checkpoint has no momentum encoder (momentum.* weights); "
                                  "only --recipe semmim runs have one")

    def __getattr__(self, item):  # model_config, names, full_shape, step, client_state, ...
        return getattr(self.source, item)

    def iter_full_tensors(self, names=None, **kw) -> Iterator[Tuple[str, torch.Tensor]]:
        names = list(names if names is not None else self.source.names())
        readers: Dict[str, List[str]] = OrderedDict()  # source tensor -> the requested names it serves
        for n in names:
            readers.setdefault(self._swap.get(n, n), []).append(n)
        for name, tensor in self.source.iter_full_tensors(list(readers), **kw):
            for requested in readers[name]:
                yield requested, tensor

    def tokenizer_path(self) -> Optional[str]:
        return source_tokenizer(self.source)

    def describe(self) -> dict:
        return dict(self.source.describe(), weights="teacher (momentum encoder)")


def select_weights(source, which: str):
    """``which`` = student (the source itself) | teacher (:class:`TeacherView`)."""
    if which not in WHICH:
        raise CheckpointError(f"--which must be one of {WHICH}, got {which!r}")
    return source if which == "student" else TeacherView(source)
