"""Saving and resuming the trainer's checkpoints, crash-consistently and without pickle code.

``save`` (every rank):

1. a tag directory left half written by a crash (no completeness marker) is removed first;
2. ``engine.save_checkpoint(..., save_latest=False)`` writes DeepSpeed's files; then
   ``write_extra(tag_dir)`` (the per-rank hook, e.g. the loader state of each DP rank) writes
   extra files *inside the tag*, before the tag is declared complete; every rank fsyncs;
3. after a barrier rank 0 writes ``latest`` atomically, then ``rils_complete.json`` (after
   fsync; it also carries the run's identity: tokenizer digest, model config, data position,
   skip windows), then prunes (``rils_scale.checkpoint.integrity``). ``latest`` goes first so
   that it never names an older tag than the newest complete one unless a user (or a roll
   back) chose so; a ``latest`` naming a tag without marker is passed over on resume.

Any failure while writing raises :class:`CheckpointWriteError` naming the tag and the cause
(:func:`failure_cause`: a full disk only when the error says so, or torch's errno-less writer
error on a disk with < 64 MiB free; a broken collective is a peer's failure, never "disk full");
the trainer exits non-zero; the previous tag and ``latest`` are untouched.

``resume`` loads the tag chosen by ``integrity.resume_tag`` (``latest`` when complete, else the
newest complete tag, or ``--resume-from``): weights-only tags (converter outputs) through
``checkpoint.resume``, DeepSpeed tags through ``engine.load_checkpoint`` with the allowlisting
reader of ``checkpoint.safe_load`` installed first (``--trust-pickle`` to opt out), and ZeRO-3
tags written on another DP size (a lost node) through ``checkpoint.resume.load_zero3_on_another_dp``.
"""
from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Optional

from ..checkpoint import integrity
from ..parallel import comm

EXIT_CHECKPOINT_WRITE = 4
"""Exit status of a run whose checkpoint could not be written."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (the previous one is intact)."""


@dataclass
class ResumePoint:
    """Where a run resumed: the tag directory (per-rank extra files live there) and its step."""
    path: str
    tag: str
    step: int
    client_state: dict


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_TORCH_WRITE_FAILURE = ("PytorchStreamWriter failed", "basic_ios::clear", "file write failed", "unexpected pos")
_PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
                 "Socket Timeout", "Timed out", "timed out", "NCCL", "ProcessGroup", "gloo")


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _free_bytes(directory: str) -> Optional[int]:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def failure_cause(err: BaseException, directory: str) -> str:
    """Why a save failed, in words: only an error that says so is a full disk.

    - ``ENOSPC`` / ``EDQUOT`` (errno or text) anywhere in the exception chain: the disk is full;
    - a collective that failed (``torch.distributed`` errors, gloo/NCCL connection errors): a
      peer rank failed (it dropped out; its own log says why), whatever the free space is;
    - torch's writer errors, which carry no errno ("PytorchStreamWriter failed writing file",
      "basic_ios::clear", inline_container's "unexpected pos" on a real full tmpfs): a full disk
      only when the disk has less than 64 MiB free;
    - anything else: a write failed.
    """
    import torch.distributed as dist
    chain = list(_chain(err))
    text = " | ".join(str(e) for e in chain)
    if any(isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS for e in chain) or \
            "No space left" in text or "ENOSPC" in text or "Disk quota exceeded" in text:
        return "the disk is full (ENOSPC)"
    dist_error = getattr(dist, "DistError", ())
    if any(isinstance(e, dist_error) for e in chain) or any(k in text for k in _PEER_FAILURE):
        return "a peer rank failed during the save (a collective broke off; see that rank's error)"
    if any(k in text for k in _TORCH_WRITE_FAILURE):
        free = _free_bytes(directory)
        if free is not None and free < 64 * 2 ** 20:
            return f"the disk is full ({free >> 20} MiB free)"
    return "a write failed"


MARKER_KEYS = ("batches_consumed", "tokenizer_sha256", "model_config", "tensor_parallel", "skip_batches", "rollbacks")
"""Client-state entries copied into ``rils_complete.json``: readable (JSON) before any engine exists."""


def save(trainer, client_state: dict, write_extra: Optional[Callable[[str], None]] = None) -> str:
    """Write ``global_step{trainer.step}``; returns the tag directory."""
    directory = os.path.join(trainer.cfg.output_dir, "checkpoints")
    tag = f"global_step{trainer.step}"
    tag_dir = os.path.join(directory, tag)
    if trainer.is_main and os.path.isdir(tag_dir) and not integrity.is_complete(tag_dir):
        shutil.rmtree(tag_dir)  # debris of a crashed save of this same step
    comm.barrier()
    try:
        trainer.engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)
        if write_extra is not None:
            write_extra(tag_dir)
        integrity.fsync_tree(tag_dir)
    except Exception as err:
        cause = failure_cause(err, directory)
        raise CheckpointWriteError(
            f"rank {trainer.rank}: could not write checkpoint {tag_dir}: {cause}: {type(err).__name__}: "
            f"{str(err).strip()[:300]}. The previous checkpoint ({integrity.read_latest(directory)}) is intact; "
            "free space and resume with --resume.") from err
    comm.barrier()
    if trainer.is_main:
        try:
            integrity.write_latest(directory, tag)
            integrity.mark_complete(tag_dir, {"tag": tag, "step": trainer.step, "world_size": trainer.world,
                                              **{k: client_state[k] for k in MARKER_KEYS if k in client_state}})
        except OSError as err:
            raise CheckpointWriteError(f"could not complete checkpoint {tag_dir}: {err}") from err
        integrity.prune(directory, trainer.cfg.keep_checkpoints)
        print(f"[rils_scale] checkpoint saved: {tag_dir}", flush=True)
    comm.barrier()
    return tag_dir


def resume(trainer, tag: Optional[str] = None) -> Optional[ResumePoint]:
    """Load ``tag`` (default: ``integrity.resume_tag``) into ``trainer.engine``; ``None`` if there is none."""
    from ..checkpoint.resume import load_weights_only_checkpoint, load_zero3_on_another_dp, weights_only_tag_dir
    from ..checkpoint.safe_load import CheckpointError, install_safe_checkpoint_engine

    directory = os.path.join(trainer.cfg.output_dir, "checkpoints")
    tag = tag or integrity.resume_tag(directory)[0]
    if tag is None:
        partial = integrity.list_tags(directory)
        if partial and trainer.is_main:  # the first save was interrupted: nothing to resume from
            print(f"[rils_scale] --resume: ignoring incomplete checkpoints in {directory}: {', '.join(partial)}",
                  flush=True)
        return None
    tag_dir = os.path.join(directory, tag)
    if weights_only_tag_dir(tag_dir):  # written by convert_checkpoint.py --format deepspeed
        path, client = load_weights_only_checkpoint(trainer.engine, directory, trainer.state.tp_rank,
                                                    trainer.state.tp_size, tag=tag)
    elif _layout_differs(trainer, tag_dir):  # e.g. a lost node: DeepSpeed cannot re-partition ZeRO state
        path, client = load_zero3_on_another_dp(trainer.engine, tag_dir, trainer.state.tp_rank,
                                                trainer.state.tp_size, trusted=trainer.cfg.trust_pickle)
    else:
        install_safe_checkpoint_engine(trainer.engine, trusted=trainer.cfg.trust_pickle)
        try:
            path, client = trainer.engine.load_checkpoint(directory, tag=tag)
        except CheckpointError as err:  # refused (file_bounds) or unreadable: named, never a traceback
            raise SystemExit(f"--resume: {err}") from None
    if path is None:
        raise SystemExit(f"could not load the checkpoint {tag_dir}")
    return ResumePoint(path=tag_dir, tag=tag, step=int(client["step"]), client_state=client)


def _layout_differs(trainer, tag_dir: str) -> bool:
    """True (and says so) when ``tag_dir`` was written on another DP size than this run's.

    Another TP size is refused here with the converter's command (DeepSpeed would fail later with
    a less helpful message)."""
    from ..checkpoint.layout import CheckpointError, discover_files
    try:
        files = discover_files(tag_dir)
    except CheckpointError as err:
        raise SystemExit(f"--resume: {err}") from None
    if files.kind == "zero0":
        return False  # full weights and optimizer per TP rank: DeepSpeed loads them on any DP size
    if files.tp_size != trainer.state.tp_size:
        raise SystemExit(f"checkpoint {tag_dir} was written with --tensor-parallel {files.tp_size}, this run uses "
                         f"{trainer.state.tp_size}: convert it with launchers/convert_checkpoint.py --format deepspeed "
                         "--tensor-parallel N")
    if files.dp_size == trainer.state.dp_size:
        return False
    if trainer.is_main:
        print(f"[rils_scale] elastic resume: {os.path.basename(tag_dir)} was written by DP {files.dp_size} x TP "
              f"{files.tp_size}, this run is DP {trainer.state.dp_size} x TP {trainer.state.tp_size}: fp32 masters, "
              f"Adam moments and step are read from all {files.dp_size} old partitions; the data position is "
              "re-dealt (docs/clusters.md)", flush=True)
    return True
