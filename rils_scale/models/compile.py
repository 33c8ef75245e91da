"""Regional compilation (``--compile``): each transformer block compiled on its own.

As torchtitan does it: ``torch.compile`` per block, not per model, so that LayerNorm, bias,
GELU and the residual adds of a block fuse around its GEMMs while everything between blocks
(masking, gathers, losses, DeepSpeed's hooks) stays eager. Identical blocks share one compiled
graph per input shape (the parameters are graph inputs), so a tower costs one compile, not one
per layer; the vision encoder's two passes (all patches, visible patches) are two shapes.

What is compiled is each block's ``forward``, not the module: ``Module.__call__`` and the hooks
registered on it (DeepSpeed ZeRO-3 gathers and releases parameters there) stay outside the
graph. Under ZeRO-3 each block must be a *leaf* module (``parallel.deepspeed_utils.
mark_zero3_leaf_modules``): its parameters are gathered for the whole block before its forward
and none of its submodules carries a hook that would break the graph. ``fullgraph=True`` makes
a graph break inside a block an error; ``dynamic=False``: shapes are static in training.

Not supported: dropout (the TP random-state swap cannot be traced): blocks with dropout > 0
raise. docs/performance.md ("Compiled blocks") has the measurements.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .transformer import Block

COMPILED_BLOCKS = (Block,)
"""The module classes compiled one by one (and made ZeRO-3 leaf modules)."""
BACKEND = "inductor"
"""The torch.compile backend of :func:`compile_blocks` (tests swap in ``aot_eager`` where
inductor's code generation is not what they check)."""


def compile_blocks(model: nn.Module, backend: Optional[str] = None) -> int:
    """Replace each block's ``forward`` by its compiled form, in place; returns how many."""
    backend = backend or BACKEND
    blocks = [m for m in model.modules() if isinstance(m, COMPILED_BLOCKS)]
    if any(getattr(b, "dropout", 0.0) > 0 for b in blocks):
        raise ValueError("--compile does not support dropout > 0 (the TP random-state swap cannot be traced)")
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=backend, fullgraph=True, dynamic=False)
    return len(blocks)
