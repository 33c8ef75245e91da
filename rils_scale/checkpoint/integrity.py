"""Crash-consistent checkpoint directories: a completeness marker, an atomic ``latest``, safe pruning.

A tag directory (``checkpoints/global_stepN``) is *complete* when it holds
``rils_complete.json``, written by rank 0 last: after every rank has written (and fsynced) its
files, including the extra per-rank files of :func:`rils_scale.train.checkpointing.save`
(loader state). ``latest`` is replaced atomically (temp file, fsync, ``os.replace``) only after
the marker. So a job killed at any point of a save leaves either the previous state or the new
complete one, and :func:`newest_complete_tag` is what ``--resume`` loads.

Pruning keeps the newest ``keep`` complete tags and never deletes the tag ``latest`` names or
the newest complete one; an incomplete tag older than the newest complete one is crash debris
and goes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import List, Optional

COMPLETE_MARKER = "rils_complete.json"
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
    """The tag to resume from: the newest complete ``global_stepN``.

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
    return deleted
