"""The WebDataset-layout training and evaluation loaders.

Per data-parallel rank, per DataLoader worker, one infinite *stream*:

    epoch e: shards dealt to (dp_rank, stream) for e  ->  tar samples (offsets recorded)
             ->  cheap checks  ->  shuffle buffer (seeded by seed, e, dp_rank, stream)
             ->  decode + crop + resize at once (seeded by seed, e, key), uint8  ->  batch
             ->  tokenize  ->  yield, with the stream's position (``StreamState``)
    then e += 1, forever.

Why these choices:
  * Shards are split by the *data-parallel* rank, not the global rank: tensor-parallel peers
    must see identical batches. ``dealing`` balances them by sample counts when known.
  * The shard order is re-shuffled every epoch with (seed, epoch) and the sample shuffle
    buffer's seed mixes the epoch, so epochs differ (OpenCLIP shipped a bug where they did not).
  * Every worker stream is infinite; a rank never runs dry before another (all ranks must
    take the same number of steps). ``data_epoch`` in a batch is its stream's epoch.
  * Exact O(1) resume: each batch carries its stream's ``StreamState`` after the batch (epoch,
    work-item cursor, byte offset of the next sample in the current shard, the shuffle buffer as
    (shard, offset) references, the shuffle RNG). ``TimedLoader.state_dict()`` holds the state of
    the last batch *consumed* per stream; the trainer stores it with the checkpoint
    (``loader_state``) and a resumed stream seeks to it and re-reads only the buffered samples.
    Each sample's augmentation depends only on (seed, epoch, key), so batches are identical.
    The DataLoader takes batch ``b`` from worker ``b % W``, so after a resume at batch ``N``
    worker ``i`` plays stream ``(i + N) % W``. Checkpoints without loader state replay: each
    stream drops the batches it produced among the first ``N`` (cost O(N)).
  * Samples are transformed as soon as they are decoded, so a stream holds at most a batch of
    small uint8 crops, never full-size decodes; members and pixels are capped (``decode``).
  * The shuffle buffer holds encoded samples and is bounded in bytes as well as in samples
    (``shuffle_buffer_bytes``): 32 junk 63 MiB ``.jpg`` members in a 2 MB ``.tar.gz`` once drove a
    worker to 1.84 GB. A full buffer (in either unit) emits before it takes the next sample, so it
    holds at most ``shuffle_buffer_bytes`` plus one sample (docs/data.md states the per-worker bound).
  * Bad data is skipped and counted per reason (see ``decode.SKIP_REASONS``); counts ride
    along in each batch's ``skipped`` dict so they reach the main process from workers.
"""
from __future__ import annotations

import atexit
import json
import random
import time
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .dealing import check_dealable, read_sample_counts, stream_shards
from .decode import (MISSING_IMAGE, TRUNCATED_SAMPLE, USED_EXTENSIONS, BadSample, decode_caption,
                     decode_cls_label, decode_image, decode_json, find_image_member)
from .seeding import sample_seed
from .sources import SKIP_KEY, check_local_shards_exist, expand_urls, iter_tar_samples
from .stream_state import StreamState
from .tokenizer import Tokenizer
from .transforms import CropResize, eval_transform

WORKER_SIGTERM_GRACE_S = 60
"""A DataLoader worker outlives SIGTERM by at most this long (see ``_worker_init``)."""

SHUFFLE_BUFFER_BYTES = 256 << 20
"""Default bound on the encoded bytes in one stream's shuffle buffer (2000 LAION-size samples
of ~50 KB are 100 MB; the sample count is then the limit)."""


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
    """Epoch the streams start at (when no state is given)."""
    counts: tuple[int, ...] | None = None
    """Samples per shard (img2dataset ``_stats.json``), for balanced dealing; None: unknown."""
    shuffle_initial: int | None = None
    """Samples buffered before the first one is emitted (default: a tenth of the buffer)."""
    states: tuple[dict | None, ...] | None = None
    """Saved ``StreamState`` per stream of this rank (JSON); None: replay ``start_batch`` batches."""
    jpeg_draft: bool = True
    """Decode JPEGs at reduced scale when the crop allows (``transforms.CropResize``)."""
    shuffle_buffer_bytes: int = SHUFFLE_BUFFER_BYTES
    """Encoded bytes (image + caption) the shuffle buffer may hold before it stops growing."""

    @property
    def streams_per_rank(self) -> int:
        return max(1, self.num_workers)


def shards_for_stream(spec: StreamSpec, epoch: int, worker: int) -> list[str]:
    """The shards stream (spec.dp_rank, worker) reads in ``epoch`` (see ``dealing.stream_shards``)."""
    return stream_shards(spec.urls, spec.counts, spec.seed, epoch, spec.dp_rank, spec.dp_size,
                         spec.streams_per_rank, worker, spec.resampled)


def batches_before(start_batch: int, worker: int, num_streams: int) -> int:
    """How many of the first ``start_batch`` batches came from ``worker`` (round-robin order)."""
    return max(0, (start_batch - worker + num_streams - 1) // num_streams)


def _check(sample: dict, skipped: Counter):
    """(key, image bytes, caption) of a sample with an image member and a usable caption, else None."""
    if SKIP_KEY in sample:
        skipped[sample[SKIP_KEY]] += 1
        return None
    image_ext = find_image_member(sample)
    if image_ext is None:
        skipped[MISSING_IMAGE] += 1
        return None
    try:
        caption = decode_caption(sample)
    except BadSample as bad:
        skipped[bad.reason] += 1
        return None
    return sample["__key__"], sample[image_ext], caption


class _Stream:
    """The sample stream of one (dp_rank, stream): shuffled, checked samples with their epoch.

    Its attributes are a ``StreamState`` at every point where ``samples()`` is suspended at a
    yield, which is where ``snapshot()`` is called.
    """

    def __init__(self, spec: StreamSpec, stream: int, state: StreamState | None, skipped: Counter):
        self.spec, self.stream, self.skipped = spec, stream, skipped
        size = spec.shuffle_buffer
        self.initial = max(1, min(size, spec.shuffle_initial if spec.shuffle_initial else size // 10))
        self.dry: set[str] = set()  # shards read since the last valid sample
        state = state or StreamState(epoch=spec.epoch)
        self.epoch, self.cursor, self.offset, self.taken = state.epoch, state.cursor, state.offset, state.taken
        self.items = state.items
        self.rng = self._fresh_rng(self.epoch)
        if state.rng is not None:
            version, internal, gauss = state.rng
            self.rng.setstate((version, tuple(internal), gauss))
        self.buffer = self._reread(state.buffer)
        self.buffer_bytes = sum(_held_bytes(item) for item in self.buffer)

    def _fresh_rng(self, epoch: int) -> random.Random:
        return random.Random(sample_seed("shuffle", self.spec.seed, epoch, self.spec.dp_rank, self.stream))

    def _count(self, reason: str) -> None:
        self.skipped[reason] += 1

    def _reread(self, refs: list) -> list:
        """Buffered samples from their references: each shard read once, from its first reference."""
        wanted: dict[str, set[int]] = {}
        for url, offset in refs:
            wanted.setdefault(url, set()).add(offset)
        found: dict[tuple[str, int], tuple] = {}
        ignore = Counter()
        for url, offsets in wanted.items():
            last = max(offsets)
            reader = iter_tar_samples(url, lambda reason: None, start=min(offsets))
            for sample in reader:
                if sample["__offset__"] in offsets:
                    checked = _check(sample, ignore)
                    if checked is not None:
                        found[url, sample["__offset__"]] = (*checked, url, sample["__offset__"])
                if sample["__offset__"] >= last:
                    break
            reader.close()
        buffer = []
        for url, offset in refs:
            if (url, offset) in found:
                buffer.append(found[url, offset])
            else:  # the shard changed since the checkpoint
                self.skipped[TRUNCATED_SAMPLE] += 1
        return buffer

    def snapshot(self) -> StreamState:
        version, internal, gauss = self.rng.getstate()
        return StreamState(epoch=self.epoch, cursor=self.cursor, offset=self.offset, taken=self.taken,
                           buffer=[[url, offset] for *_, url, offset in self.buffer],
                           rng=[version, list(internal), gauss], items=self.items)

    def valid(self) -> None:
        """The consumer decoded a sample of this stream: the shard list is not barren."""
        self.dry.clear()

    def _next_item(self) -> None:
        self.cursor, self.offset, self.taken = self.cursor + 1, None, 0

    def _read(self) -> Iterator[tuple]:
        """Checked samples of this epoch's items from the cursor on, keeping cursor/offset current."""
        while self.cursor < len(self.items):
            url, start, limit = self.items[self.cursor]
            self.dry.add(url)
            reader = iter_tar_samples(url, self._count, start=start if self.offset is None else self.offset)
            done = False
            try:
                for sample in reader:
                    self.taken += 1
                    following = sample["__next__"]
                    done = following is None or (limit is not None and self.taken >= limit)
                    if done:
                        self._next_item()
                    else:
                        self.offset = following
                    checked, offset = _check(sample, self.skipped), sample["__offset__"]
                    sample = None  # while the reader reads the next sample, hold nothing of this one
                    if checked is not None:
                        yield (*checked, url, offset)
                        checked = None
                    if done:
                        break
            finally:
                reader.close()
            if not done:  # empty, unreadable or truncated shard
                self._next_item()

    def samples(self) -> Iterator[tuple[int, tuple]]:
        """Infinite (epoch, (key, image bytes, caption, url, offset)); webdataset-style shuffle:
        emit once ``initial`` samples are buffered, grow the buffer by up to 2 per emitted sample;
        a buffer holding ``shuffle_buffer_bytes`` takes nothing until it has emitted."""
        size, byte_cap = self.spec.shuffle_buffer, self.spec.shuffle_buffer_bytes
        while True:
            if self.items is None:
                self.items = [[url, 0, None] for url in shards_for_stream(self.spec, self.epoch, self.stream)]
            source = self._read()
            exhausted = False
            while True:
                for _ in range(1 if len(self.buffer) + 1 >= size else 2):
                    if self.buffer_bytes >= byte_cap:
                        break
                    item = None if exhausted else next(source, None)
                    if item is None:
                        exhausted = True
                        break
                    self.buffer.append(item)
                    self.buffer_bytes += _held_bytes(item)
                if not self.buffer:
                    break
                if exhausted or len(self.buffer) >= self.initial or size <= 1 or self.buffer_bytes >= byte_cap:
                    pick = self.rng.randrange(len(self.buffer)) if size > 1 else 0
                    self.buffer[pick], self.buffer[-1] = self.buffer[-1], self.buffer[pick]
                    self.buffer_bytes -= _held_bytes(self.buffer[-1])
                    item = None  # no local reference: the consumer alone holds what it was given
                    yield self.epoch, self.buffer.pop()
            if self.dry and len(self.dry) >= len(set(self.spec.urls)):
                raise RuntimeError(
                    f"no valid sample in any of the {len(set(self.spec.urls))} shard(s) (data stream dp_rank="
                    f"{self.spec.dp_rank}, stream={self.stream} read them all); first: {self.spec.urls[:3]}; "
                    f"skipped: {dict(self.skipped)}")
            self.epoch += 1
            self.items, self.cursor, self.offset, self.taken = None, 0, None, 0
            self.rng = self._fresh_rng(self.epoch)


def _held_bytes(item: tuple) -> int:
    """Encoded bytes a buffered ``(key, image bytes, caption, url, offset)`` holds."""
    return len(item[1]) + len(item[2])


def _batch_stream(spec: StreamSpec, stream: int) -> Iterator[dict]:
    """Infinite batches of one stream, from its saved state or after replaying ``start_batch``."""
    transform = CropResize(spec.image_size, draft=spec.jpeg_draft)
    saved = spec.states[stream] if spec.states is not None else None
    to_drop = 0 if spec.states is not None else batches_before(spec.start_batch, stream, spec.streams_per_rank)
    skipped: Counter = Counter()
    source = _Stream(spec, stream, StreamState.from_json(saved) if saved else None, skipped)
    # Transformed crops are written straight into the batch array (torch.stack of uint8 crops
    # measured 2.4 ms per 224 px sample here); the position travels as one JSON string (the
    # DataLoader walks nested lists element by element).
    images = np.empty((spec.batch_size, spec.image_size, spec.image_size, 3), dtype=np.uint8)
    captions, keys = [], []
    for epoch, (key, image_bytes, caption, _, _) in source.samples():
        try:
            transform(image_bytes, random.Random(sample_seed("augment", spec.seed, epoch, key)), out=images[len(keys)])
        except BadSample as bad:
            skipped[bad.reason] += 1
            continue
        finally:
            image_bytes = None  # not held while the stream reads the next sample (docs/data.md's bound)
        source.valid()
        captions.append(caption), keys.append(key)
        if len(keys) < spec.batch_size:
            continue
        if to_drop > 0:  # replay: this batch was consumed before the checkpoint
            to_drop -= 1
        else:
            yield {"images": torch.from_numpy(images), "token_ids": spec.tokenizer(captions, spec.context_length),
                   "keys": keys, "skipped": dict(skipped), "data_epoch": epoch,
                   "stream_state": json.dumps({"stream": stream, "state": vars(source.snapshot())})}
            images = np.empty_like(images)
        captions, keys = [], []
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


_OPEN_LOADERS: "weakref.WeakSet[TimedLoader]" = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    """At exit, stop workers before multiprocessing's own exit handler joins them (atexit runs
    last-registered first, and this module registers after torch imported multiprocessing)."""
    for loader in list(_OPEN_LOADERS):
        loader.close()


class TimedLoader:
    """Iterator wrapper that measures how long the consumer waits for each batch.

    ``last_wait_s`` is the wait for the latest batch (the trainer logs it, so a stalled input
    pipeline is visible in the metrics); ``batches_consumed`` is the value to store in a
    checkpoint and pass back as ``start_batch``; ``skipped_total`` sums the batches' skip counts;
    ``state_dict()`` is the loader state to store with a checkpoint (``loader_state``).
    """

    def __init__(self, iterable: Iterable[dict], start_batch: int = 0, spec: StreamSpec | None = None):
        self._iterable = iterable
        self._iterator: Iterator[dict] | None = None
        self.last_wait_s = 0.0
        self.total_wait_s = 0.0
        self.batches_consumed = start_batch
        self.skipped_total: Counter = Counter()
        self.spec = spec
        self.resume_mode = "fresh"  # set by build_train_loader (loader_state.plan_resume)
        streams = spec.streams_per_rank if spec is not None else 1
        if spec is not None and spec.states is not None:
            self._states = [s if s is not None else asdict(StreamState(epoch=spec.epoch)) for s in spec.states]
        elif spec is not None and start_batch == 0:
            self._states = [asdict(StreamState(epoch=spec.epoch)) for _ in range(streams)]
        else:  # replay: a stream's position is known once it delivers its first batch
            self._states = [None] * streams
        _OPEN_LOADERS.add(self)

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
        position = batch.pop("stream_state", None)
        if position is not None:
            position = json.loads(position)
            self._states[position["stream"]] = position["state"]
        return batch

    def state_dict(self) -> dict | None:
        """Positions of this rank's streams after the last consumed batch (JSON-serialisable), or
        None while some stream's position is unknown (right after a replay resume)."""
        if self.spec is None or any(s is None for s in self._states):
            return None
        from .loader_state import LOADER_STATE_VERSION, shard_list_digest
        spec = self.spec
        return {"version": LOADER_STATE_VERSION, "dp_rank": spec.dp_rank, "dp_size": spec.dp_size,
                "num_workers": spec.streams_per_rank, "seed": spec.seed, "resampled": spec.resampled,
                "shards": shard_list_digest(spec.urls), "batches_consumed": self.batches_consumed,
                "streams": list(self._states)}

    def close(self) -> None:
        """Stop the worker processes now: ask them to exit, then kill any that has not."""
        iterator, self._iterator = self._iterator, None
        workers = list(getattr(iterator, "_workers", []) or [])
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:  # a broken queue must not keep the processes alive
                pass
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)
        _OPEN_LOADERS.discard(self)


def _validate(spec: StreamSpec) -> None:
    if not 0 <= spec.dp_rank < spec.dp_size:
        raise ValueError(f"dp_rank={spec.dp_rank} is outside [0, dp_size={spec.dp_size})")
    for name in ("image_size", "batch_size", "context_length"):
        if getattr(spec, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(spec, name)}")
    if spec.num_workers < 0 or spec.start_batch < 0 or spec.epoch < 0:
        raise ValueError("num_workers, start_batch and epoch must be >= 0")
    if spec.shuffle_buffer_bytes < 1:
        raise ValueError(f"shuffle_buffer_bytes must be >= 1, got {spec.shuffle_buffer_bytes}")
    needed = spec.dp_size * spec.streams_per_rank
    if not spec.resampled and len(spec.urls) < needed:
        raise ValueError(
            f"{len(spec.urls)} shard(s) cannot feed {spec.dp_size} data-parallel rank(s) x "
            f"{spec.streams_per_rank} worker(s) = {needed} streams: every stream needs at least one shard. "
            f"Write more, smaller shards (make_shards.py --shard-size), reduce --num-workers, "
            f"or use --resampled (shards drawn with replacement).")
    if not spec.resampled:
        check_dealable(spec.counts, needed)


def validate_train_data(urls, *, dp_size: int, num_workers: int, resampled: bool = False) -> list[str]:
    """Preflight for launchers: the expanded shard list, or ValueError / FileNotFoundError with
    the reason it cannot feed ``dp_size x num_workers`` streams (no loader is built)."""
    expanded = expand_urls(urls)
    check_local_shards_exist(expanded)
    spec = StreamSpec(urls=tuple(expanded), tokenizer=None, image_size=1, context_length=2, batch_size=1,
                      dp_rank=0, dp_size=dp_size, num_workers=num_workers, seed=0, shuffle_buffer=0,
                      resampled=resampled, start_batch=0, epoch=0, counts=read_sample_counts(expanded))
    _validate(spec)
    return expanded


def build_train_loader(urls, tokenizer: Tokenizer, *, image_size: int, context_length: int, batch_size: int,
                       dp_rank: int, dp_size: int, num_workers: int, seed: int, shuffle_buffer: int = 2000,
                       resampled: bool = False, start_batch: int = 0, epoch: int = 0,
                       pin_memory: bool = False, prefetch_factor: int = 2, resume: dict | None = None,
                       shuffle_initial: int | None = None, jpeg_draft: bool = True,
                       shuffle_buffer_bytes: int = SHUFFLE_BUFFER_BYTES) -> TimedLoader:
    """Infinite loader of this data-parallel rank's batches (see the module docstring).

    Each batch: ``images`` uint8 ``[B, S, S, 3]`` (channels-last, not normalised: pass them
    through ``transforms.prepare_images`` on the device), ``token_ids`` int64 ``[B, L]``,
    ``keys``, ``skipped`` (reason -> count since this stream's previous batch), ``data_epoch``.

    Resume: ``resume`` is the loader state saved with the checkpoint (``loader_state.
    read_loader_states``: DP rank -> ``TimedLoader.state_dict()``); ``loader_state.plan_resume``
    picks exact / re-deal / new-epoch, or replays ``start_batch`` batches when it is None.
    Raises ValueError / FileNotFoundError before any work when the shards cannot feed every
    stream or are missing.
    """
    from .loader_state import plan_resume
    expanded = tuple(expand_urls(urls))
    counts = None if resampled else read_sample_counts(expanded)
    plan = plan_resume(resume, urls=expanded, counts=counts, dp_rank=dp_rank, dp_size=dp_size,
                       num_workers=max(1, num_workers), seed=seed, resampled=resampled, start_batch=start_batch,
                       epoch=epoch)
    spec = StreamSpec(urls=expanded, tokenizer=tokenizer, image_size=image_size,
                      context_length=context_length, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size,
                      num_workers=num_workers, seed=seed, shuffle_buffer=shuffle_buffer, resampled=resampled,
                      start_batch=start_batch, epoch=plan.epoch, counts=counts, shuffle_initial=shuffle_initial,
                      states=plan.states, jpeg_draft=jpeg_draft, shuffle_buffer_bytes=shuffle_buffer_bytes)
    _validate(spec)
    check_local_shards_exist(spec.urls)
    # batch_size=None: workers already batch. The stream never ends, so DataLoader epochs (and
    # persistent_workers) play no role; epochs advance inside the streams.
    loader = DataLoader(TrainStream(spec), batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                        prefetch_factor=prefetch_factor if num_workers > 0 else None,
                        worker_init_fn=_worker_init if num_workers > 0 else None)
    timed = TimedLoader(loader, start_batch=start_batch, spec=spec)
    timed.resume_mode = plan.mode
    return timed


def _worker_init(worker_id: int) -> None:
    """Signals in DataLoader workers: never outlive the rank, never block its exit.

    * PR_SET_PDEATHSIG (Linux): the kernel kills the worker when its rank process dies, however
      it dies.
    * SIGTERM: launchers (deepspeed's, Slurm) signal the whole process tree on preemption; the
      rank must finish its step and write its checkpoint (which needs no worker: the loader
      state rides in consumed batches), so the worker keeps serving for at most
      ``WORKER_SIGTERM_GRACE_S`` and then exits (SIGALRM's default action). multiprocessing's
      exit handler SIGTERMs and joins its children: an ignored SIGTERM there was the hang of
      issue 13; with the grace it is bounded, and ``TimedLoader.close`` kills at once anyway.
    * SIGUSR1 (Slurm's warning before the time limit) is for the rank only: ignored here.
    """
    import signal
    import sys
    if sys.platform.startswith("linux"):
        import os
        parent = os.getppid()
        try:
            import ctypes
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent:  # the rank died before the call above took effect
            os._exit(1)
    signal.signal(signal.SIGTERM, lambda *_: signal.alarm(WORKER_SIGTERM_GRACE_S))
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class EvalLoader:
    """Ordered, finite, re-iterable batches of evaluation shards (main process, no shuffling).

    Each batch: ``images`` (eval transform), ``token_ids`` (when a tokenizer is given),
    ``captions``, ``keys``, ``json`` (list of metadata dicts, ``{}`` when absent) and
    ``skipped``. The last batch may be smaller. Bad samples are skipped and counted as in
    training, plus ``bad_json`` for malformed metadata.
    """

    def __init__(self, urls: Sequence[str], tokenizer: Tokenizer | None, image_size: int, batch_size: int,
                 context_length: int, layout: str = "laion"):
        self.urls, self.tokenizer, self.batch_size, self.context_length = urls, tokenizer, batch_size, context_length
        self.transform = eval_transform(image_size)
        self.layout = layout  # "laion" (KEY.txt + KEY.json) | "clip_benchmark" (KEY.cls label, no caption)
        self.skipped_total: Counter = Counter()  # the last iteration's counts, trailing skips included

    def _samples(self, skipped: Counter) -> Iterator[tuple]:
        cb = self.layout == "clip_benchmark"
        for url in self.urls:
            for sample in iter_tar_samples(url, lambda reason: skipped.update((reason,)),
                                           extensions=USED_EXTENSIONS | {"cls"} if cb else USED_EXTENSIONS):
                try:
                    if SKIP_KEY in sample:
                        raise BadSample(sample[SKIP_KEY])
                    image_ext = find_image_member(sample)
                    if image_ext is None:
                        raise BadSample(MISSING_IMAGE)
                    caption, meta = ("", decode_cls_label(sample)) if cb else (decode_caption(sample),
                                                                                 decode_json(sample))
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
        self.skipped_total.update(skipped)
        skipped.clear()
        return batch

    def __iter__(self) -> Iterator[dict]:
        skipped: Counter = Counter()
        self.skipped_total = Counter()
        items: list = []
        for item in self._samples(skipped):
            items.append(item)
            if len(items) == self.batch_size:
                yield self._collate(items, skipped)
                items = []
        if items:
            yield self._collate(items, skipped)
        self.skipped_total.update(skipped)  # bad samples after the last good one


def build_eval_loader(urls, tokenizer: Tokenizer | None, image_size: int, batch_size: int, *,
                      context_length: int = 77, layout: str = "laion") -> EvalLoader:
    """Ordered evaluation batches over ``urls`` (same URL forms as ``build_train_loader``);
    ``layout="clip_benchmark"`` reads CLIP_benchmark's ``KEY.cls`` labels (no captions)."""
    if batch_size < 1 or image_size < 1:
        raise ValueError("batch_size and image_size must be >= 1")
    expanded = expand_urls(urls)
    check_local_shards_exist(expanded)
    return EvalLoader(expanded, tokenizer, image_size, batch_size, context_length, layout)
