"""Crash-consistent checkpoint directories: a completeness marker, an atomic ``latest``, safe pruning.

A tag directory (``checkpoints/global_stepN``) is *complete* when it holds
``rils_complete.json``, written by rank 0 last: after every rank has written (and fsynced) its
files, including the extra per-rank files of :func:`rils_scale.train.checkpointing.save`
(loader state). ``latest`` is replaced atomically (temp file, fsync, ``os.replace``) after every
rank's files are on disk and *before* the marker. So a job killed at any point of a save leaves
either the previous state or the new complete one; ``latest`` may name a tag whose marker is
missing (killed between the two), never lag behind a complete tag. That makes ``latest`` naming
an *older* complete tag a deliberate choice (a roll back: :func:`resume_tag`).

``--resume`` loads :func:`resume_tag`: the tag ``latest`` names when it is complete (what
DeepSpeed's ``load_checkpoint(tag=None)`` reads), else the newest complete one.

A roll back (resuming a tag while newer ones exist) moves the newer tags into
``checkpoints/abandoned/<UTC time>/`` (:func:`abandon_tags_after`), so they are never resumed by
accident nor overwritten by the new lineage's tags of the same step.

Pruning keeps the newest ``keep`` complete tags and never deletes the tag ``latest`` names or
the newest complete one; an incomplete tag older than the newest complete one is crash debris
and goes. An abandoned tag goes when ``keep`` live complete tags are newer than it (when it
would have been pruned had it stayed in the lineage).
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import time
from typing import List, Optional, Tuple

COMPLETE_MARKER = "rils_complete.json"
ABANDONED = "abandoned"
ROLLBACK_RECORD = "rollback.json"
_TAG_RE = re.compile(r"^global_step(\d+)$")


def tag_step(tag: str) -> Optional[int]:
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def list_tags(checkpoints_dir: str) -> List[str]:
    """``global_stepN`` tags, oldest first."""
    if not os.path.isdir(checkpoints_dir):
        return []
    tags = [t for t in os.listdir(checkpoints_dir)
            if tag_step(t) is not None and os.path.isdir(os.path.join(checkpoints_dir, t))]
    return sorted(tags, key=tag_step)


def is_complete(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(tag_dir, COMPLETE_MARKER))


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str) -> None:
    """fsync every file of ``directory`` and the directory itself (data on disk before the marker).

    Ranks call this while their peers still write into the same tag: a peer's temporary file
    (``*.tmp<pid>``) may be renamed between listing and opening; its writer fsyncs it, so a
    file that vanished is skipped, not an error."""
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                fsync_path(os.path.join(root, name))
            except FileNotFoundError:
                pass
        fsync_path(root)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def mark_complete(tag_dir: str, info: dict) -> None:
    """fsync the tag's files, then write the marker (the last file of a tag)."""
    fsync_tree(tag_dir)
    files = sorted(os.path.relpath(os.path.join(r, n), tag_dir) for r, _, ns in os.walk(tag_dir) for n in ns)
    _atomic_write(os.path.join(tag_dir, COMPLETE_MARKER),
                  json.dumps({**info, "files": files, "time": time.time()}, indent=2, sort_keys=True) + "\n")


def write_latest(checkpoints_dir: str, tag: str) -> None:
    _atomic_write(os.path.join(checkpoints_dir, "latest"), tag)


def read_latest(checkpoints_dir: str) -> Optional[str]:
    path = os.path.join(checkpoints_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def newest_complete_tag(checkpoints_dir: str) -> Optional[str]:
    """The newest complete ``global_stepN`` (``--resume`` itself loads :func:`resume_tag`).

    A tag without marker is ignored, except that ``latest`` naming a directory without a marker
    but with ``rils_weights.json`` (a converter output, written atomically by the converter) or
    from before markers existed is accepted when no complete tag exists (old runs stay resumable).
    """
    complete = [t for t in list_tags(checkpoints_dir) if is_complete(os.path.join(checkpoints_dir, t))]
    if complete:
        return complete[-1]
    latest = read_latest(checkpoints_dir)
    if latest and os.path.isdir(os.path.join(checkpoints_dir, latest)) \
            and not any(is_complete(os.path.join(checkpoints_dir, t)) for t in list_tags(checkpoints_dir)):
        return latest
    return None


def utc_stamp() -> str:
    """A UTC time usable as a directory name, e.g. ``20261207T051502Z``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def unique_dir(parent: str, name: str) -> str:
    """Create and return ``parent/name``, or ``parent/name-1``, ``-2``, ... if taken."""
    os.makedirs(parent, exist_ok=True)
    candidate, n = os.path.join(parent, name), 0
    while True:
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            n += 1
            candidate = os.path.join(parent, f"{name}-{n}")


def read_marker(tag_dir: str) -> dict:
    """The completeness marker's JSON ({} when absent or unreadable)."""
    try:
        with open(os.path.join(tag_dir, COMPLETE_MARKER)) as f:
            value = json.load(f)
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def normalize_tag(tag_or_step: str) -> str:
    """``"4"`` or ``"global_step4"`` -> ``"global_step4"``; other names are returned as given."""
    text = str(tag_or_step).strip().rstrip("/")
    return f"global_step{int(text)}" if text.isdigit() else text


def resume_tag(checkpoints_dir: str, requested: Optional[str] = None) -> Tuple[Optional[str], str]:
    """``(tag, why)``: the tag ``--resume`` loads, or ``(None, why)`` when there is none.

    ``requested`` (``--resume-from``): that tag or step, which must be complete (ValueError
    otherwise, listing the complete ones). Else ``latest`` when it names a complete tag — as
    DeepSpeed users expect, and the way to roll back by hand — else the newest complete tag.
    Runs from before completeness markers existed: ``latest`` as before (see
    :func:`newest_complete_tag`).
    """
    tags = list_tags(checkpoints_dir)
    complete = [t for t in tags if is_complete(os.path.join(checkpoints_dir, t))]
    if requested:
        tag = normalize_tag(requested)
        if tag in complete or (not complete and tag in tags):  # a run from before markers
            return tag, f"--resume-from {requested}"
        state = "incomplete (no rils_complete.json)" if tag in tags else "not there"
        raise ValueError(f"--resume-from {requested}: {os.path.join(checkpoints_dir, tag)} is {state}; "
                         f"complete tags: {', '.join(complete) or 'none'}")
    latest = read_latest(checkpoints_dir)
    if latest in complete:
        return latest, "latest"
    if complete:
        note = f" (latest names {latest!r}, which is not a complete tag)" if latest else ""
        return complete[-1], "newest complete tag" + note
    legacy = newest_complete_tag(checkpoints_dir)
    return legacy, "latest (a run without completeness markers)" if legacy else "no checkpoint"


def newer_tags(checkpoints_dir: str, tag: str) -> List[str]:
    """Tags (complete or not) of a higher step than ``tag``."""
    step = tag_step(tag)
    return [t for t in list_tags(checkpoints_dir) if step is not None and tag_step(t) > step]


def abandon_tags_after(checkpoints_dir: str, tag: str, record: dict) -> Optional[str]:
    """Roll back to ``tag``: move every newer tag into ``abandoned/<UTC time>/`` (with
    ``rollback.json`` = ``record`` + the moved tags), point ``latest`` at ``tag``. Returns the
    new directory, or None when nothing was newer. Nothing is deleted."""
    newer = newer_tags(checkpoints_dir, tag)
    if not newer:
        if read_latest(checkpoints_dir) != tag:
            write_latest(checkpoints_dir, tag)
        return None
    dest = unique_dir(os.path.join(checkpoints_dir, ABANDONED), utc_stamp())
    _atomic_write(os.path.join(dest, ROLLBACK_RECORD),
                  json.dumps({**record, "rolled_back_to": tag, "tags": newer, "time": time.time()},
                             indent=2, sort_keys=True) + "\n")
    write_latest(checkpoints_dir, tag)  # first: a crash mid-move must not resume an abandoned tag
    for t in newer:
        os.rename(os.path.join(checkpoints_dir, t), os.path.join(dest, t))
    fsync_path(checkpoints_dir)
    return dest


def _prune_abandoned(checkpoints_dir: str, keep: int, live_complete_steps: List[int]) -> List[str]:
    root = os.path.join(checkpoints_dir, ABANDONED)
    deleted = []
    for group in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        group_dir = os.path.join(root, group)
        if not os.path.isdir(group_dir):
            continue
        for t in list_tags(group_dir):
            if sum(1 for s in live_complete_steps if s > tag_step(t)) >= keep:
                shutil.rmtree(os.path.join(group_dir, t), ignore_errors=True)
                deleted.append(f"{ABANDONED}/{group}/{t}")
        if not list_tags(group_dir):  # only the rollback record is left
            shutil.rmtree(group_dir, ignore_errors=True)
    return deleted


def prune(checkpoints_dir: str, keep: int) -> List[str]:
    """Delete old tags; returns the deleted ones. ``keep <= 0`` keeps everything."""
    if keep <= 0:
        return []
    tags = list_tags(checkpoints_dir)
    complete = [t for t in tags if is_complete(os.path.join(checkpoints_dir, t))]
    protected = set(complete[-keep:])
    latest = read_latest(checkpoints_dir)
    if latest:
        protected.add(latest)
    if complete:
        protected.add(complete[-1])
    newest_step = tag_step(complete[-1]) if complete else None
    deleted = []
    for t in tags:
        if t in protected:
            continue
        if t not in complete and (newest_step is None or tag_step(t) > newest_step):
            continue  # possibly being written, or the only trace of a newer run: not ours to judge
        shutil.rmtree(os.path.join(checkpoints_dir, t), ignore_errors=True)
        deleted.append(t)
    live = [tag_step(t) for t in list_tags(checkpoints_dir) if is_complete(os.path.join(checkpoints_dir, t))]
    return deleted + _prune_abandoned(checkpoints_dir, keep, live)
