"""One writer per run directory: an exclusive ``flock`` on ``<output_dir>/.lock``.

Rank 0 takes the lock before anything is written into the run directory and holds it for the
whole run. ``flock`` belongs to the open file, so the kernel releases it however the holder
ends (clean exit, exception, ``os._exit``, SIGKILL): a crashed job never leaves it held. The
holder writes who it is (host, PID, job id, start time, command) into the file, so that a
refused job can say who holds the directory.

Forked children (DataLoader workers) inherit the descriptor and with it the lock; they close
their copy right after the fork (``os.register_at_fork``), so a worker outliving its rank for a
moment never keeps the directory locked. ``subprocess`` children never see it (Python opens
files close-on-exec).

Shared filesystems (docs/checkpoints.md, "Run directory"): on Linux NFS clients ``flock`` is
carried out as a POSIX lock on the server (NFSv4, or NFSv3 with lockd), so it excludes a job on
another host too; a lock held by a host that crashed (kernel gone, not just the process) stays
until the server's lease expires (NFSv4: 90 s by default). Lustre honours ``flock`` across
clients only when mounted with ``-o flock``; with ``-o localflock`` each client sees only its own
locks (a job on another host is *not* refused), and without either option ``flock`` fails with
``ENOSYS``: then the run goes on without the lock and says so.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Optional

LOCK_NAME = ".lock"
_JOB_ID_VARS = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID")
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_HELD_FDS: set = set()  # descriptors this process holds a run lock on (closed in forked children)


def _close_in_child() -> None:
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)  # only this process's reference: the parent keeps the lock
        except OSError:
            pass
    _HELD_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def job_id() -> str:
    """The batch scheduler's job id (Slurm keeps it across a requeue), or '' outside one."""
    for var in _JOB_ID_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return ""


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock; ``holder`` is what it recorded."""

    def __init__(self, path: str, holder: dict):
        self.path, self.holder = path, holder
        super().__init__(f"{os.path.dirname(path) or '.'} is in use by another job: {describe_holder(holder)}; "
                         f"one run directory has one writer (lock file {path}). Wait for that job to end, "
                         "stop it, or use another --output-dir")


def describe_holder(holder: dict) -> str:
    if not holder:
        return "holder unknown (it has not written its details yet)"
    parts = [f"pid {holder.get('pid')} on host {holder.get('host')}"]
    if holder.get("job_id"):
        parts.append(f"job {holder['job_id']}")
    if holder.get("started"):
        parts.append(f"since {holder['started']}")
    if holder.get("command"):
        parts.append(f"command: {holder['command']}")
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
            and not _pid_alive(holder["pid"]):
        parts.append("(that pid is gone: a process it started may still hold the lock)")
    return ", ".join(parts)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_holder(path: str) -> dict:
    """What the current (or last) holder recorded; {} when unreadable or not written yet."""
    try:
        with open(path) as f:
            value = json.loads(f.read() or "{}")
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """Exclusive lock on ``<output_dir>/.lock``; :meth:`acquire`, then :meth:`release` (or exit)."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.fd: Optional[int] = None
        self.supported = True

    def acquire(self, same_job_wait_s: float = 120.0, poll_s: float = 1.0) -> "RunLock":
        """Take the lock or raise :class:`RunDirBusy` naming the holder.

        If the holder recorded this process's own scheduler job id, it is the previous
        incarnation of a requeued job, which the scheduler is still tearing down (or whose
        host's lock lease has not expired yet): wait up to ``same_job_wait_s`` for it.
        """
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = read_holder(self.path)
                mine = job_id()
                if mine and holder.get("job_id") == mine:
                    if deadline is None:
                        deadline = time.monotonic() + same_job_wait_s
                        print(f"[rils_scale] {self.path} is held by an earlier run of this job ({describe_holder(holder)}): "
                              f"waiting up to {same_job_wait_s:.0f} s for it to end", flush=True)
                    if time.monotonic() < deadline:
                        time.sleep(poll_s)
                        continue
                os.close(fd)
                raise RunDirBusy(self.path, holder) from None
            except OSError as err:
                if err.errno not in _UNSUPPORTED:
                    os.close(fd)
                    raise
                os.close(fd)
                self.supported = False
                print(f"[rils_scale] WARNING: the filesystem of {self.path} does not support flock ({err.strerror}): "
                      "this run holds no lock, a second job on this directory would not be refused "
                      "(Lustre: mount with -o flock; docs/checkpoints.md)", file=sys.stderr, flush=True)
                return self
        self.fd = fd
        _HELD_FDS.add(fd)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": job_id(),
                  "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                  "command": " ".join(sys.argv)[:400]}
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        return self

    def release(self) -> None:
        """Release the lock (the holder record stays in the file: it only matters while locked)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        _HELD_FDS.discard(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
