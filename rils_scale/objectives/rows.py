"""Which patch rows a masked-modelling loss counts, as fixed-size device tensors (no host sync).

A loss over "masked patches of the samples that pass a filter" has a data-dependent number of
rows. Compacting them (``nonzero``, boolean indexing) makes the host read that number back from
the device, which on a GPU stalls the CPU until every queued kernel has run, every step. Here the
row count is static instead: every sample contributes the same number of candidate rows and each
row carries a 0/1 weight (masked, and its sample kept). The loss is the weighted sum over the
global count of weight-1 rows, all reduced on the device (docs/performance.md, "No host sync").

- With ``masked_ids [B, K]`` (the model's masked patch positions; random and text-guided masking
  hide exactly ``K = N - visible`` patches of every sample) the candidates are exactly the masked
  patches: no extra rows except those of samples the filter drops.
- Without it (any 0/1 mask, e.g. tests), every one of the ``N`` patch rows is a candidate.

Row order is sample-major, patches ascending: the order ``nonzero`` gave, so sums keep their order.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def candidate_rows(mask: torch.Tensor, keep: torch.Tensor, masked_ids: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flat row indices into ``[B * N]`` and whether each row counts (bool), both ``[B * K]``.

    ``mask [B, N]`` (1 = masked), ``keep [B]`` bool, ``masked_ids [B, K]`` (optional, any order).
    A masked patch outside ``masked_ids`` would be silently dropped, so an asynchronous device
    assertion (no host sync) checks that every masked patch is among them (``masked_ids`` unique).
    """
    b, n = mask.shape
    if masked_ids is None:
        ids = torch.arange(n, device=mask.device).expand(b, n)
    else:
        ids = torch.sort(masked_ids.to(mask.device), dim=1).values
    masked = mask.gather(1, ids).gt(0)
    if masked_ids is not None:
        torch._assert_async(masked.sum(dim=1).eq(mask.gt(0).sum(dim=1)).all(),
                            "masked_ids must hold every masked patch of each sample")
    counted = masked & keep.to(mask.device)[:, None]
    flat = ids + torch.arange(b, device=mask.device)[:, None] * n
    return flat.reshape(-1), counted.reshape(-1)
