"""Which shards each stream reads in an epoch, balanced by sample counts when they are known.

A *stream* is one (data-parallel rank, DataLoader worker) pair; global stream ``g = dp_rank *
workers + worker``. Every epoch one (seed, epoch)-seeded permutation of the shard list, shared by
all ranks, is dealt so that each shard goes to exactly one stream.

Without counts shards are dealt round-robin (rank first, then worker), as before. img2dataset
writes ``NNNNN_stats.json`` beside each ``NNNNN.tar`` with its ``successes``; when those exist,
shards are dealt greedily, largest first, to the stream with the fewest samples so far (LPT), so
unequal shards (an empty one, a half-failed one) starve no stream. Each stream then reads its
shards in permutation order.
"""
from __future__ import annotations

import heapq
import json
import os
import random
from collections.abc import Sequence

from .seeding import sample_seed
from .sources import local_path


def read_sample_counts(urls: Sequence[str]) -> tuple[int, ...] | None:
    """Per-shard sample counts from img2dataset ``_stats.json`` files, or None if none is found.

    Shards without a readable stats file get the median of the known counts.
    """
    counts: list[int | None] = []
    for url in urls:
        path = local_path(url)
        count = None
        if path is not None:
            stats = os.path.splitext(path)[0] + "_stats.json"
            try:
                with open(stats, "rb") as f:
                    value = json.loads(f.read(1 << 20)).get("successes")
                count = int(value) if isinstance(value, (int, float)) and value >= 0 else None
            except (OSError, ValueError, AttributeError, RecursionError):
                count = None
        counts.append(count)
    known = sorted(c for c in counts if c is not None)
    if not known:
        return None
    median = known[len(known) // 2]
    return tuple(median if c is None else c for c in counts)


def shard_permutation(num_shards: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_shards))
    random.Random(sample_seed("shard-order", seed, epoch)).shuffle(order)
    return order


def deal_indices(order: Sequence[int], weights: Sequence[float] | None, dp_size: int,
                 workers: int) -> list[list[int]]:
    """Deal shard indices (in ``order``) to ``dp_size * workers`` streams, indexed by global stream."""
    streams = dp_size * workers
    if weights is None:  # round-robin: shard j of the order -> rank j % dp, then worker
        dealt = [[] for _ in range(streams)]
        for rank in range(dp_size):
            for worker in range(workers):
                dealt[rank * workers + worker] = list(order[rank::dp_size][worker::workers])
        return dealt
    position = {shard: i for i, shard in enumerate(order)}
    heap = [(0.0, 0, g) for g in range(streams)]  # (samples so far, shards so far, stream)
    dealt = [[] for _ in range(streams)]
    for shard in sorted(order, key=lambda s: (-weights[s], position[s])):
        load, count, target = heapq.heappop(heap)
        dealt[target].append(shard)
        heapq.heappush(heap, (load + weights[shard], count + 1, target))
    return [sorted(d, key=position.__getitem__) for d in dealt]


def check_dealable(counts: Sequence[int] | None, streams: int) -> None:
    """With known counts, every stream must be able to get a non-empty shard."""
    if counts is None:
        return
    non_empty = sum(1 for c in counts if c > 0)
    if non_empty < streams:
        raise ValueError(f"only {non_empty} of {len(counts)} shard(s) hold samples (by their _stats.json), "
                         f"fewer than the {streams} streams (data-parallel ranks x workers): reduce "
                         "--num-workers, write smaller shards, or use --resampled")


def stream_shards(urls: Sequence[str], counts: Sequence[int] | None, seed: int, epoch: int, dp_rank: int,
                  dp_size: int, workers: int, worker: int, resampled: bool) -> list[str]:
    """The shards stream (dp_rank, worker) reads in ``epoch``.

    Non-resampled: the epoch's permutation dealt as described above, so in every epoch each
    shard goes to exactly one stream. Resampled: each stream draws ``ceil(shards / streams)``
    shards with replacement from its own RNG.
    """
    if resampled:
        rng = random.Random(sample_seed("resample", seed, epoch, dp_rank, worker))
        draws = max(1, -(-len(urls) // (dp_size * workers)))
        return [rng.choice(list(urls)) for _ in range(draws)]
    order = shard_permutation(len(urls), seed, epoch)
    dealt = deal_indices(order, counts, dp_size, workers)[dp_rank * workers + worker]
    return [urls[i] for i in dealt]
