"""Rolling a run back: which tag to resume, and batches to skip (``--resume-from``, ``--skip-batches``).

**Which tag.** ``--resume`` loads ``checkpoints/latest`` when it names a complete tag, else the
newest complete tag (``integrity.resume_tag``); ``--resume-from TAG|STEP`` names one. Resuming
a tag while newer tags exist is a roll back: once the tag is loaded, rank 0 moves the newer
tags into ``checkpoints/abandoned/<UTC time>/`` and points ``latest`` at the resumed tag, so the
saves that follow (steps 5, 6, ... after a roll back to step 4) are the live lineage and never
meet a tag of the abandoned one. A roll back is recorded (``rollbacks`` in later checkpoints'
client state and marker). A requeued batch job runs the same command again: if the tag
``--resume`` would load already descends from a roll back to the same tag by the same scheduler
job, that roll back is done and is not repeated (see :func:`choose_resume_tag`).

**Skipped batches.** ``--skip-batches START:END[,START:END...]`` names batches by their index in
the run's consumed-batch numbering (``batches_consumed``: per data-parallel rank, one per
micro-batch, counted from the start of the run, skipped ones included), half-open like a
Python slice: ``100:110`` skips batches 100..109. When the trainer reaches ``START`` it reads
and drops ``END - START`` batches from the loader (no forward, no step, no mask drawn), so the
data position after the window is exactly that of a run that trained on them, and the masks of
the following batches (seeded by batch index) are unchanged. Windows are kept in every later
checkpoint (client state and marker) and in ``config.json``, so a later resume keeps skipping
them without repeating the option; a window that starts before the resumed position was
already trained on and is refused unless it is already recorded. Each skipped window writes an
event row to ``metrics.jsonl`` (``{"event": "skip_batches", "step": S + 1, "start", "end"}``).
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..checkpoint import integrity
from .run_lock import job_id

Window = Tuple[int, int]


def parse_skip_batches(text: str) -> List[Window]:
    """``"10:20,30:35"`` -> ``[(10, 20), (30, 35)]``; ValueError with the reason otherwise."""
    windows = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        start, sep, end = part.partition(":")
        if not sep or not start.strip().isdigit() or not end.strip().isdigit():
            raise ValueError(f"--skip-batches {text!r}: {part!r} is not START:END (batch indices, END exclusive)")
        a, b = int(start), int(end)
        if b <= a:
            raise ValueError(f"--skip-batches {text!r}: {part!r} is empty (END must be greater than START)")
        windows.append((a, b))
    return merge_windows(windows)


def merge_windows(windows: Sequence[Sequence[int]]) -> List[Window]:
    """Sorted union of half-open windows (overlapping or touching ones merged)."""
    out: List[List[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in windows):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def combine_windows(recorded: Sequence[Sequence[int]], requested: Sequence[Window], position: int,
                    where: str) -> List[Window]:
    """The run's windows after a resume at batch ``position``: recorded ones plus new ones.

    A new window (not inside a recorded one) that starts before ``position`` covers batches
    the resumed checkpoint was already trained on: SystemExit naming them.
    """
    recorded_set = merge_windows(recorded)
    for a, b in requested:
        covered = any(ra <= a and b <= rb for ra, rb in recorded_set)
        if a < position and not covered:
            raise SystemExit(f"--skip-batches {a}:{b}: batches before {position} were already trained on in {where} "
                             f"(it was saved after {position} batches); roll back to a checkpoint written before "
                             f"batch {a} with --resume-from")
    return merge_windows(list(recorded_set) + list(requested))


class SkippingBatches:
    """Iterator over ``batches`` that reads and drops the batches of ``windows``.

    ``position`` is the index of the next batch ``batches`` yields (``batches_consumed``).
    ``on_skip(start, end, skipped)`` is called after each window (``skipped``: the dropped
    batches' bad-sample counts, summed), before the next batch is returned, so the caller's
    counters can follow. Dropped batches are not kept.
    """

    def __init__(self, batches: Iterator[dict], windows: Sequence[Window], position: int,
                 on_skip: Optional[Callable[[int, int, Dict[str, int]], None]] = None, announce: bool = False):
        self.batches, self.position, self.on_skip, self.announce = batches, position, on_skip, announce
        self.windows = [(a, b) for a, b in merge_windows(windows) if b > position]

    def __iter__(self) -> "SkippingBatches":
        return self

    def __next__(self) -> dict:
        while self.windows and self.windows[0][0] <= self.position:
            start, end = self.windows.pop(0)
            start = max(start, self.position)
            if self.announce:
                print(f"[rils_scale] --skip-batches: reading and dropping batches {start}..{end - 1}", flush=True)
            skipped: Counter = Counter()
            for _ in range(start, end):
                skipped.update(next(self.batches).get("skipped") or {})
            self.position = end
            if self.on_skip is not None:
                self.on_skip(start, end, dict(skipped))
        batch = next(self.batches)
        self.position += 1
        return batch


def choose_resume_tag(checkpoints_dir: str, resume_from: str = "") -> Tuple[Optional[str], str, List[str]]:
    """``(tag, why, newer tags)``: what ``--resume`` / ``--resume-from`` loads and what a roll back moves.

    ``--resume-from X`` repeated by a requeued job (same scheduler job id) after its roll back to
    X: the tag plain ``--resume`` picks records that roll back, so it is resumed instead.
    """
    if resume_from:
        current, _ = integrity.resume_tag(checkpoints_dir)
        target = integrity.normalize_tag(resume_from)
        job = job_id()
        if current and current != target and job:
            records = integrity.read_marker(os.path.join(checkpoints_dir, current)).get("rollbacks") or []
            if any(isinstance(r, dict) and r.get("to") == target and r.get("job_id") == job for r in records):
                return current, (f"latest; --resume-from {resume_from} was already carried out by this job "
                                 f"({job}), and {current} continues from it"), []
    tag, why = integrity.resume_tag(checkpoints_dir, resume_from or None)
    newer = integrity.newer_tags(checkpoints_dir, tag) if tag else []
    if not any(integrity.is_complete(os.path.join(checkpoints_dir, t)) for t in newer):
        newer = []  # only the debris of a save killed midway: not a roll back (integrity.prune removes it)
    return tag, why, newer


def rollback_record(tag: str, step: int) -> dict:
    import socket
    import time
    return {"to": tag, "step": step, "job_id": job_id(), "host": socket.gethostname(), "time": time.time()}


def roll_back(trainer, point, newer: Sequence[str]) -> None:
    """After ``point`` (a tag with newer ones beside it) is loaded: rank 0 moves the newer tags
    into ``checkpoints/abandoned/<UTC time>/`` and points ``latest`` at ``point.tag``; the roll
    back is recorded in the lineage and as a ``rollback`` event row of metrics.jsonl."""
    from ..parallel import comm
    record = rollback_record(point.tag, trainer.step)
    trainer.rollbacks.append(record)
    moved = None
    if trainer.is_main:
        moved = integrity.abandon_tags_after(os.path.dirname(point.path), point.tag, record)
        print(f"[rils_scale] rolled back to {point.tag}: the newer tags {', '.join(newer)} were moved to {moved} "
              "(kept until pruning; move them back into checkpoints/ to undo)", flush=True)
    trainer.pending_events.append({"name": "rollback", "step": trainer.step, "to": point.tag,
                                   "abandoned": list(newer), "moved_to": moved})
    comm.barrier()
