"""The training loader's state in a checkpoint, and how a resumed loader uses it.

Files: ``<checkpoint tag dir>/loader_state_dp<r>.json``, one per data-parallel rank ``r``, each
``TimedLoader.state_dict()`` of that rank (written by its TP rank 0; TP peers read the same
data). ``plan_resume`` turns the saved states into the resumed streams' start states:

* ``exact``: same shard list, seed, DP size and workers per rank. Every stream restarts from
  its saved position (seek into the shard, re-read the shuffle buffer's samples), so batches
  and losses equal the uninterrupted run's. Cost: O(shuffle buffer), not O(steps).
* ``redeal``: other DP size or worker count. The current epoch ``E`` (the lowest saved stream
  epoch) continues: its remaining work (buffered samples, the rest of the shard being read,
  shards not yet started) is dealt to the new streams; then epoch ``E + 1`` starts as usual.
  No sample of ``E`` is delivered twice before every remaining sample of ``E`` has been;
  samples that streams already ahead in ``E + 1`` delivered are delivered again in ``E + 1``.
  The order is not the uninterrupted run's (it cannot be: the streams differ).
* ``new-epoch``: the shard list or seed changed, the layout changed on ``--resampled`` data,
  or nothing of ``E`` remains: every stream starts epoch ``max saved epoch + 1``.
* ``replay``: no loader state (a checkpoint written before this existed), or one whose
  ``batches_consumed`` is not the checkpoint's: each stream replays and drops its first
  batches (cost O(steps)).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .dealing import deal_indices, stream_shards
from .stream_state import StreamState

LOADER_STATE_VERSION = 1
_FILE = "loader_state_dp{}.json"


def shard_list_digest(urls: Sequence[str]) -> str:
    return f"{len(urls)}:" + hashlib.blake2b("\n".join(urls).encode(), digest_size=8).hexdigest()


def write_loader_state(tag_dir: str, state: dict | None) -> str | None:
    """Write one DP rank's ``TimedLoader.state_dict()`` atomically; None writes nothing."""
    if state is None:
        return None
    path = os.path.join(tag_dir, _FILE.format(state["dp_rank"]))
    os.makedirs(tag_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(state, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_loader_states(tag_dir: str, dp_rank: int | None = None) -> dict[int, dict] | None:
    """DP rank -> saved state from a checkpoint tag dir; None when it holds none.

    With ``dp_rank``, only that rank's file is parsed when the files match the saved DP size
    (the exact case); the others are parsed only for a re-deal.
    """
    paths = {}
    for path in glob.glob(os.path.join(glob.escape(tag_dir), "loader_state_dp*.json")):
        match = re.fullmatch(r"loader_state_dp(\d+)\.json", os.path.basename(path))
        if match:
            paths[int(match.group(1))] = path
    if not paths:
        return None

    if dp_rank is not None and dp_rank in paths:
        own = _load(paths[dp_rank])
        if own["dp_size"] == len(paths):
            return {dp_rank: own, **{r: {"lazy": paths[r]} for r in paths if r != dp_rank}}
    return {r: _load(paths[r]) for r in paths}


def _load(path: str) -> dict:
    with open(path) as f:
        value = json.load(f)
    if value.get("version") != LOADER_STATE_VERSION:
        raise ValueError(f"{path}: loader state version {value.get('version')} is not {LOADER_STATE_VERSION}")
    return value


def _materialised(saved: dict[int, dict]) -> dict[int, dict]:
    return {r: _load(v["lazy"]) if "lazy" in v else v for r, v in saved.items()}


@dataclass(frozen=True)
class ResumePlan:
    mode: str
    """``fresh``, ``exact``, ``redeal``, ``new-epoch`` or ``replay`` (module docstring)."""
    epoch: int
    """Epoch for streams without a state."""
    states: tuple[dict | None, ...] | None
    """Start state per stream of this rank; None: replay ``start_batch`` batches."""


def plan_resume(saved: dict[int, dict] | None, *, urls: Sequence[str], counts: Sequence[int] | None,
                dp_rank: int, dp_size: int, num_workers: int, seed: int, resampled: bool, start_batch: int,
                epoch: int = 0) -> ResumePlan:
    """Start states of this rank's ``num_workers`` streams (see the module docstring)."""
    if saved is None:
        return ResumePlan("fresh" if start_batch == 0 else "replay", epoch, None if start_batch else
                          (None,) * num_workers)
    any_state = next(v for v in saved.values() if "lazy" not in v)
    if any_state["batches_consumed"] != start_batch:  # not written with this checkpoint's step
        return ResumePlan("replay", epoch, None)
    saved_dp, saved_workers = any_state["dp_size"], any_state["num_workers"]
    same_data = any_state["shards"] == shard_list_digest(urls) and any_state["seed"] == seed \
        and any_state.get("resampled", False) == resampled
    complete = sorted(saved) == list(range(saved_dp))
    if saved_dp == dp_size and saved_workers == num_workers and same_data and complete:
        return ResumePlan("exact", epoch, tuple(saved[dp_rank]["streams"]))
    saved = _materialised(saved)  # every other mode needs every rank's state (all ranks agree)
    if not same_data or not complete or resampled:
        return ResumePlan("new-epoch", max(_epochs(saved)) + 1, (None,) * num_workers)
    return _redeal(saved, urls, counts, dp_rank, dp_size, num_workers, seed)


def _epochs(saved: dict[int, dict]) -> list[int]:
    return [s["epoch"] for v in saved.values() for s in v["streams"]]


def _remaining_work(saved: dict[int, dict], urls, counts, seed: int, epoch: int) -> list[list]:
    """Unseen work of ``epoch`` as ``[url, start, limit]`` items, in saved (rank, stream) order."""
    work = []
    for rank in sorted(saved):
        state = saved[rank]
        for stream, s in enumerate(state["streams"]):
            if s["epoch"] != epoch:
                continue
            items = s["items"] if s["items"] is not None else [[u, 0, None] for u in stream_shards(
                urls, counts, seed, epoch, rank, state["dp_size"], state["num_workers"], stream, False)]
            work.extend([url, offset, 1] for url, offset in s["buffer"])  # read, never delivered
            if s["cursor"] < len(items):
                url, start, limit = items[s["cursor"]]
                left = None if limit is None else limit - s["taken"]
                work.append([url, start if s["offset"] is None else s["offset"], left])
                work.extend(items[s["cursor"] + 1:])
    return work


def _redeal(saved, urls, counts, dp_rank, dp_size, num_workers, seed) -> ResumePlan:
    epochs = _epochs(saved)
    epoch = min(epochs)
    work = _remaining_work(saved, urls, counts, seed, epoch)
    if not work:
        return ResumePlan("new-epoch", max(epochs) + 1, (None,) * num_workers)
    index = {u: i for i, u in enumerate(urls)}
    weights = [float(limit) if limit is not None else float(counts[index[url]]) if counts else 1.0
               for url, _, limit in work]
    dealt = deal_indices(list(range(len(work))), weights, dp_size, num_workers)
    states = tuple(asdict(StreamState(epoch=epoch, items=[work[i] for i in dealt[dp_rank * num_workers + s]]))
                   for s in range(num_workers))
    return ResumePlan("redeal", epoch, states)
