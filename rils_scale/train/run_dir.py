"""Who may write a run directory, and what a fresh start may find there.

:func:`claim` runs on every rank right after the process group exists and before anything is
written into ``--output-dir``. Rank 0 decides, every rank learns the verdict (one broadcast),
so a refused job ends on every rank at once instead of leaving peers in a collective:

1. rank 0 takes the run lock (:mod:`.run_lock`) and holds it until it exits;
2. a fresh start (no ``--resume``) in a directory that holds a previous run's files
   (:data:`RUN_FILES`) is refused, unless ``--start-over`` asks to move that run into
   ``<output_dir>/previous_runs/<UTC time>/`` first. Nothing is ever deleted: the move is a
   rename of each entry on the same filesystem. The old run stays readable there (TensorBoard
   shows it as its own run, ``consolidate`` and ``load_model`` accept that directory).

A subdirectory (not a sibling ``runs/x.old``) because the lock file stays where it is and
holds for the move too, and because the user's path keeps everything of the run.
"""
from __future__ import annotations

import hashlib
import os
from typing import List, Optional

from ..checkpoint import integrity
from ..checkpoint.integrity import unique_dir, utc_stamp
from ..parallel import comm
from .run_lock import LOCK_NAME, RunDirBusy, RunLock

PREVIOUS_RUNS = "previous_runs"
RUN_FILES = ("checkpoints", "metrics.jsonl", "metrics.discarded.jsonl", "config.json", "tokenizer.model",
             "tensorboard")
"""Entries that make a directory hold a run: a fresh start into it needs --start-over."""
RUN_TOKENIZER = "tokenizer.model"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def previous_run_files(output_dir: str) -> List[str]:
    """The :data:`RUN_FILES` entries present (empty files and directories do not count)."""
    found = []
    for name in RUN_FILES:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and os.listdir(path):
            found.append(name + "/")
        elif os.path.isfile(path) and os.path.getsize(path) > 0:
            found.append(name)
    return found


def move_previous_run(output_dir: str) -> Optional[str]:
    """Move every entry except the lock and ``previous_runs/`` into a new
    ``previous_runs/<UTC time>/``; returns it (None when there was nothing to move)."""
    entries = sorted(e for e in os.listdir(output_dir) if e not in (LOCK_NAME, PREVIOUS_RUNS))
    if not entries:
        return None
    dest = unique_dir(os.path.join(output_dir, PREVIOUS_RUNS), utc_stamp())
    for entry in entries:
        os.rename(os.path.join(output_dir, entry), os.path.join(dest, entry))
    return dest


def _describe(output_dir: str, files: List[str]) -> str:
    parts = []
    for name in files:
        if name == "checkpoints/":
            tags = integrity.list_tags(os.path.join(output_dir, "checkpoints"))
            parts.append(f"checkpoints/ ({', '.join(tags) if tags else 'no tag'})")
        elif name == "metrics.jsonl":
            with open(os.path.join(output_dir, name), "rb") as f:
                parts.append(f"metrics.jsonl ({sum(1 for _ in f)} rows)")
        else:
            parts.append(name)
    return ", ".join(parts)


def _decide(cfg, lock: RunLock) -> Optional[str]:
    """Rank 0: lock, then the fresh-start rule. Returns the refusal message, or None."""
    try:
        lock.acquire()
    except RunDirBusy as err:
        return str(err)
    if cfg.resume:
        return None
    files = previous_run_files(cfg.output_dir)
    if files and not cfg.start_over:
        return (f"--output-dir {cfg.output_dir} holds a previous run ({_describe(cfg.output_dir, files)}); "
                "a fresh start would mix the two. Pass --resume to continue it (--resume-from TAG|STEP to roll "
                f"it back), or --start-over to move it into {os.path.join(cfg.output_dir, PREVIOUS_RUNS)}/<time>/ "
                "and start fresh (nothing is deleted), or choose another --output-dir")
    if cfg.start_over:
        moved = move_previous_run(cfg.output_dir)
        if moved:
            print(f"[rils_scale] --start-over: the previous run's files were moved to {moved}", flush=True)
    return None


def claim(cfg, is_main: bool) -> Optional[RunLock]:
    """Every rank: rank 0 locks and checks the run directory, all ranks share the verdict.

    Raises ``SystemExit`` on every rank when refused (rank 0's names the reason and the holder).
    Returns rank 0's held :class:`RunLock` (None on other ranks).
    """
    check_run_options(cfg)  # (parse_args did; a TrainConfig built in code too)
    lock, refusal = None, None
    if is_main:
        lock = RunLock(cfg.output_dir)
        try:
            refusal = _decide(cfg, lock)
        except Exception as err:  # noqa: BLE001 (e.g. no permission): refuse on every rank, never hang them
            refusal = f"--output-dir {cfg.output_dir}: {type(err).__name__}: {err}"
        if refusal:
            lock.release()
    refused = comm.broadcast_values([1.0 if refusal else 0.0], src=0)[0] > 0
    if refused:
        raise SystemExit(refusal or f"--output-dir {cfg.output_dir}: refused by rank 0 (see its message)")
    return lock


def check_run_options(cfg) -> None:
    """CLI consistency of the run-management options (SystemExit); ``--resume-from`` implies ``--resume``."""
    from .rollback import parse_skip_batches
    try:
        parse_skip_batches(cfg.skip_batches)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if cfg.resume_from:
        cfg.resume = True
    if cfg.start_over and cfg.resume:
        raise SystemExit("--start-over starts a new run: it cannot be combined with --resume or --resume-from")


def resolve_tokenizer(cfg) -> None:
    """``--resume`` without ``--tokenizer``: the run's own copy."""
    if not cfg.tokenizer and cfg.resume:
        own = os.path.join(cfg.output_dir, RUN_TOKENIZER)
        if os.path.isfile(own):
            cfg.tokenizer = own


def install_run_tokenizer(output_dir: str, tokenizer_path: str, digest: str) -> Optional[str]:
    """Copy the tokenizer into the run unless the run has one (never overwritten).

    Returns a warning when the run's copy differs from ``digest`` (left as it is), else None.
    """
    dest = os.path.join(output_dir, RUN_TOKENIZER)
    if os.path.isfile(dest):
        if os.path.abspath(dest) == os.path.abspath(tokenizer_path) or file_sha256(dest) == digest:
            return None
        return (f"{dest} (sha256 {file_sha256(dest)}) is not the tokenizer this run trains with "
                f"({tokenizer_path}, sha256 {digest}); it is left as it is")
    import shutil
    tmp = f"{dest}.tmp{os.getpid()}"
    shutil.copyfile(tokenizer_path, tmp)
    os.replace(tmp, dest)
    return None
