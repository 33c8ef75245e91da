"""The WebDataset-layout training and evaluation loaders.

Per data-parallel rank, per DataLoader worker, one infinite *stream*:

    epoch e: shards of this (dp_rank, worker) for e  ->  tar samples  ->  cheap checks
             ->  shuffle buffer (seeded by seed, e, dp_rank, worker)  ->  decode image
             ->  batch  ->  augment (seeded by seed, e, key) + tokenize  ->  yield
    then e += 1, forever.

Why these choices:
  * Shards are split by the *data-parallel* rank, not the global rank: tensor-parallel peers
    must see identical batches.
  * The shard order is re-shuffled every epoch with (seed, epoch) and the sample shuffle
    buffer's seed mixes the epoch, so epochs differ (OpenCLIP shipped a bug where they did not).
  * Every worker stream is infinite; a rank never runs dry before another (all ranks must
    take the same number of steps). ``data_epoch`` in a batch is its stream's epoch.
  * Each sample's augmentation depends only on (seed, epoch, key), and each stream is a pure
    function of (seed, dp layout, worker), so ``start_batch=N`` replays exactly: each worker
    drops the batches it produced among the first N (the DataLoader takes batch ``b`` from
    worker ``b % num_workers``, so after a resume worker ``i`` plays stream
    ``(i + N) % num_workers``). Dropped batches are read and their images decoded (needed to
    know which samples are valid) but not augmented or tokenized.
  * Bad data is skipped and counted per reason (see ``decode.SKIP_REASONS``); counts ride
    along in each batch's ``skipped`` dict so they reach the main process from workers.
"""
from __future__ import annotations

import itertools
import math
import random
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .decode import (MISSING_IMAGE, BadSample, decode_caption, decode_image, decode_json,
                     find_image_member)
from .seeding import sample_seed
from .sources import check_local_shards_exist, expand_urls, iter_tar_samples
from .tokenizer import Tokenizer
from .transforms import eval_transform, train_transform

MAX_EMPTY_EPOCHS = 3
"""A stream that yields no valid sample for this many epochs in a row raises (no usable data)."""


@dataclass(frozen=True)
class StreamSpec:
    """Everything one worker stream needs; small and picklable (sent to DataLoader workers)."""

    urls: tuple[str, ...]
    """Expanded shard URLs, in a fixed order shared by all ranks."""
    tokenizer: Tokenizer
    image_size: int
    context_length: int
    batch_size: int
    """Samples per batch on this data-parallel rank."""
    dp_rank: int
    dp_size: int
    num_workers: int
    """DataLoader workers per rank; 0 means the main process is the only stream."""
    seed: int
    shuffle_buffer: int
    """Samples held for shuffling (raw bytes); 0 or 1 disables sample shuffling."""
    resampled: bool
    """Draw shards with replacement (no shard-count requirement; for multi-node runs)."""
    start_batch: int
    """Global batches already consumed on this rank (resume point)."""
    epoch: int
    """Epoch the streams start at."""

    @property
    def streams_per_rank(self) -> int:
        return max(1, self.num_workers)


def shards_for_stream(spec: StreamSpec, epoch: int, worker: int) -> list[str]:
    """The shards stream (dp_rank, worker) reads in ``epoch``.

    Non-resampled: one (seed, epoch)-seeded permutation shared by all ranks, dealt out by rank
    then by worker, so in every epoch each shard goes to exactly one stream. Resampled: each
    stream draws ``ceil(shards / streams)`` shards with replacement from its own RNG.
    """
    urls, streams = list(spec.urls), spec.streams_per_rank
    if spec.resampled:
        rng = random.Random(sample_seed("resample", spec.seed, epoch, spec.dp_rank, worker))
        draws = max(1, math.ceil(len(urls) / (spec.dp_size * streams)))
        return [rng.choice(urls) for _ in range(draws)]
    random.Random(sample_seed("shard-order", spec.seed, epoch)).shuffle(urls)
    return urls[spec.dp_rank::spec.dp_size][worker::streams]


def batches_before(start_batch: int, worker: int, num_streams: int) -> int:
    """How many of the first ``start_batch`` batches came from ``worker`` (round-robin order)."""
    return max(0, (start_batch - worker + num_streams - 1) // num_streams)


def shuffled(items: Iterable, buffer_size: int, rng: random.Random) -> Iterator:
    """Shuffle buffer: fill ``buffer_size`` items, then emit a random one per new item."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


def _checked_samples(shards: Sequence[str], skipped: Counter) -> Iterator[tuple[str, bytes, str]]:
    """(key, image bytes, caption) of samples with an image member and a usable caption.

    Only the image, ``txt`` and ``json`` members are ever touched; others (pickles, numpy
    arrays, ...) are ignored. The image itself is decoded later, after shuffling, so the
    buffer holds compact encoded bytes.
    """
    for url in shards:
        for sample in iter_tar_samples(url, lambda reason: skipped.update((reason,))):
            image_ext = find_image_member(sample)
            if image_ext is None:
                skipped[MISSING_IMAGE] += 1
                continue
            try:
                caption = decode_caption(sample)
            except BadSample as bad:
                skipped[bad.reason] += 1
                continue
            yield sample["__key__"], sample[image_ext], caption


def _sample_stream(spec: StreamSpec, worker: int, skipped: Counter) -> Iterator[tuple[int, str, bytes, str]]:
    """Infinite (epoch, key, image bytes, caption) stream of one (dp_rank, worker)."""
    empty_epochs = 0
    for epoch in itertools.count(spec.epoch):
        shards = shards_for_stream(spec, epoch, worker)
        rng = random.Random(sample_seed("shuffle", spec.seed, epoch, spec.dp_rank, worker))
        produced = False
        for key, image_bytes, caption in shuffled(_checked_samples(shards, skipped), spec.shuffle_buffer, rng):
            produced = True
            yield epoch, key, image_bytes, caption
        empty_epochs = 0 if produced else empty_epochs + 1
        if empty_epochs >= MAX_EMPTY_EPOCHS:
            raise RuntimeError(f"data stream (dp_rank={spec.dp_rank}, worker={worker}) found no valid sample "
                               f"in {MAX_EMPTY_EPOCHS} epochs; shards: {shards[:3]}... skipped: {dict(skipped)}")


def _batch_stream(spec: StreamSpec, worker: int) -> Iterator[dict]:
    """Infinite batches of one stream, after dropping those consumed before ``start_batch``."""
    transform = train_transform(spec.image_size)
    to_drop = batches_before(spec.start_batch, worker, spec.streams_per_rank)
    skipped: Counter = Counter()
    pending: list = []
    for epoch, key, image_bytes, caption in _sample_stream(spec, worker, skipped):
        try:
            image = decode_image(image_bytes)
        except BadSample as bad:
            skipped[bad.reason] += 1
            continue
        pending.append((epoch, key, image, caption))
        if len(pending) < spec.batch_size:
            continue
        batch, pending = pending, []
        if to_drop > 0:  # resume: this batch was consumed before the checkpoint
            to_drop -= 1
            skipped.clear()
            continue
        images = torch.stack([transform(img, random.Random(sample_seed("augment", spec.seed, ep, k)))
                              for ep, k, img, _ in batch])
        yield {"images": images,
               "token_ids": spec.tokenizer([c for *_, c in batch], spec.context_length),
               "keys": [k for _, k, _, _ in batch],
               "skipped": dict(skipped),
               "data_epoch": batch[-1][0]}
        skipped.clear()


class TrainStream(IterableDataset):
    """IterableDataset over this rank's infinite batch stream; one stream per DataLoader worker."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None and info.num_workers != self.spec.streams_per_rank:
            raise RuntimeError(f"StreamSpec.num_workers={self.spec.num_workers} but the DataLoader "
                               f"runs {info.num_workers} workers")
        return _batch_stream(self.spec, stream_of_worker(info.id if info is not None else 0, self.spec))


def stream_of_worker(worker_id: int, spec: StreamSpec) -> int:
    """The stream a DataLoader worker must play so that global batch order survives a resume.

    The DataLoader asks worker ``j % W`` for its ``j``-th batch; after resuming at
    ``start_batch = N`` its ``j``-th batch is global batch ``N + j``, which belongs to stream
    ``(N + j) % W``. So worker ``i`` runs stream ``(i + N) % W``.
    """
    return (worker_id + spec.start_batch) % spec.streams_per_rank


class TimedLoader:
    """Iterator wrapper that measures how long the consumer waits for each batch.

    ``last_wait_s`` is the wait for the latest batch (the trainer logs it, so a stalled input
    pipeline is visible in the metrics); ``batches_consumed`` is the value to store in a
    checkpoint and pass back as ``start_batch``; ``skipped_total`` sums the batches' skip counts.
    """

    def __init__(self, iterable: Iterable[dict], start_batch: int = 0):
        self._iterable = iterable
        self._iterator: Iterator[dict] | None = None
        self.last_wait_s = 0.0
        self.total_wait_s = 0.0
        self.batches_consumed = start_batch
        self.skipped_total: Counter = Counter()

    def __iter__(self) -> "TimedLoader":
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = iter(self._iterable)
        start = time.perf_counter()
        batch = next(self._iterator)
        self.last_wait_s = time.perf_counter() - start
        self.total_wait_s += self.last_wait_s
        self.batches_consumed += 1
        self.skipped_total.update(batch.get("skipped", {}))
        return batch

    def close(self) -> None:
        """Stop worker processes (dropping the DataLoader iterator shuts them down)."""
        self._iterator = None


def _validate(spec: StreamSpec) -> None:
    if not 0 <= spec.dp_rank < spec.dp_size:
        raise ValueError(f"dp_rank={spec.dp_rank} is outside [0, dp_size={spec.dp_size})")
    for name in ("image_size", "batch_size", "context_length"):
        if getattr(spec, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(spec, name)}")
    if spec.num_workers < 0 or spec.start_batch < 0 or spec.epoch < 0:
        raise ValueError("num_workers, start_batch and epoch must be >= 0")
    needed = spec.dp_size * spec.streams_per_rank
    if not spec.resampled and len(spec.urls) < needed:
        raise ValueError(
            f"{len(spec.urls)} shard(s) cannot feed {spec.dp_size} data-parallel rank(s) x "
            f"{spec.streams_per_rank} worker(s) = {needed} streams: every stream needs at least one shard. "
            f"Write more, smaller shards (make_shards.py --shard-size), reduce --num-workers, "
            f"or use --resampled (shards drawn with replacement).")


def build_train_loader(urls, tokenizer: Tokenizer, *, image_size: int, context_length: int, batch_size: int,
                       dp_rank: int, dp_size: int, num_workers: int, seed: int, shuffle_buffer: int = 2000,
                       resampled: bool = False, start_batch: int = 0, epoch: int = 0,
                       pin_memory: bool = False, prefetch_factor: int = 2) -> TimedLoader:
    """Infinite loader of this data-parallel rank's batches (see the module docstring).

    Each batch: ``images`` float32 ``[B, 3, S, S]``, ``token_ids`` int64 ``[B, L]``, ``keys``,
    ``skipped`` (reason -> count since this stream's previous batch) and ``data_epoch``.
    Raises ValueError / FileNotFoundError before any work when the shards cannot feed every
    stream or are missing.
    """
    spec = StreamSpec(urls=tuple(expand_urls(urls)), tokenizer=tokenizer, image_size=image_size,
                      context_length=context_length, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size,
                      num_workers=num_workers, seed=seed, shuffle_buffer=shuffle_buffer, resampled=resampled,
                      start_batch=start_batch, epoch=epoch)
    _validate(spec)
    check_local_shards_exist(spec.urls)
    # batch_size=None: workers already batch. The stream never ends, so DataLoader epochs (and
    # persistent_workers) play no role; epochs advance inside the streams.
    loader = DataLoader(TrainStream(spec), batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                        prefetch_factor=prefetch_factor if num_workers > 0 else None,
                        worker_init_fn=_ignore_termination_signals if num_workers > 0 else None)
    return TimedLoader(loader, start_batch=start_batch)


def _ignore_termination_signals(worker_id: int) -> None:
    """Workers outlive SIGTERM/SIGUSR1 so the trainer can finish its step and checkpoint.

    Launchers (deepspeed's, Slurm) signal the whole process tree; a worker that died on the
    signal would make the main process raise in the middle of the step it must complete. The
    main process shuts its workers down when it exits.
    """
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class EvalLoader:
    """Ordered, finite, re-iterable batches of evaluation shards (main process, no shuffling).

    Each batch: ``images`` (eval transform), ``token_ids`` (when a tokenizer is given),
    ``captions``, ``keys``, ``json`` (list of metadata dicts, ``{}`` when absent) and
    ``skipped``. The last batch may be smaller. Bad samples are skipped and counted as in
    training, plus ``bad_json`` for malformed metadata.
    """

    def __init__(self, urls: Sequence[str], tokenizer: Tokenizer | None, image_size: int, batch_size: int,
                 context_length: int):
        self.urls, self.tokenizer, self.batch_size, self.context_length = urls, tokenizer, batch_size, context_length
        self.transform = eval_transform(image_size)

    def _samples(self, skipped: Counter) -> Iterator[tuple]:
        for url in self.urls:
            for sample in iter_tar_samples(url, lambda reason: skipped.update((reason,))):
                try:
                    image_ext = find_image_member(sample)
                    if image_ext is None:
                        raise BadSample(MISSING_IMAGE)
                    caption = decode_caption(sample)
                    meta = decode_json(sample)
                    image = decode_image(sample[image_ext])
                except BadSample as bad:
                    skipped[bad.reason] += 1
                    continue
                yield sample["__key__"], self.transform(image), caption, meta

    def _collate(self, items: list, skipped: Counter) -> dict:
        batch = {"images": torch.stack([img for _, img, _, _ in items]),
                 "captions": [c for _, _, c, _ in items], "keys": [k for k, *_ in items],
                 "json": [m for *_, m in items], "skipped": dict(skipped)}
        if self.tokenizer is not None:
            batch["token_ids"] = self.tokenizer(batch["captions"], self.context_length)
        skipped.clear()
        return batch

    def __iter__(self) -> Iterator[dict]:
        skipped: Counter = Counter()
        items: list = []
        for item in self._samples(skipped):
            items.append(item)
            if len(items) == self.batch_size:
                yield self._collate(items, skipped)
                items = []
        if items:
            yield self._collate(items, skipped)


def build_eval_loader(urls, tokenizer: Tokenizer | None, image_size: int, batch_size: int, *,
                      context_length: int = 77) -> EvalLoader:
    """Ordered evaluation batches over ``urls`` (same URL forms as ``build_train_loader``)."""
    if batch_size < 1 or image_size < 1:
        raise ValueError("batch_size and image_size must be >= 1")
    expanded = expand_urls(urls)
    check_local_shards_exist(expanded)
    return EvalLoader(expanded, tokenizer, image_size, batch_size, context_length)
