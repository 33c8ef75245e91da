"""The JIT build's lock: a killed build can never make a later load wait.

torch up to 2.11 guards ``cpp_extension.load`` with a ``FileBaton``: the file ``<build dir>/lock``
is created with ``O_EXCL`` and removed when the build ends; a process that finds it waits until it
is gone. A build killed midway (a time budget, the OOM killer, Slurm) leaves the file, and every
later load of that extension waits forever (the file holds no PID: torch cannot tell a live build
from a dead one). Newer torch holds an advisory lock instead; either way this module makes the
question moot for the project's own loader (:mod:`._extension`):

* every project build of a directory first takes :func:`build_lock`: an ``flock`` on
  ``<build dir>/rils_build.lock`` (the kernel drops it when its holder dies, however it dies), and
  writes the owner's PID, host and start time into that file for the messages below;
* so whoever holds it is the only project process inside torch's ``load`` for that directory, and a
  ``lock`` file it finds there was left by a builder that no longer runs: it is removed, with a
  message naming its age and last owner (:func:`clear_stale_baton`);
* waiting for a *live* builder is bounded (``$RILS_KERNELS_LOCK_WAIT_S``, default 900 s: eight ranks
  waiting for one 1-2 minute build is normal; a builder stuck for 15 minutes is not): past it the
  load raises with the owner's PID instead of waiting on (``auto`` then uses another backend).

The build directory is node-local and keyed by this project (``_extension.jit_cache_dir``), so no
other program creates ``lock`` there.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

__all__ = ["build_lock", "clear_stale_baton", "BuildLockTimeout", "DEFAULT_WAIT_S", "OWNER_FILE", "BATON_FILE"]

OWNER_FILE = "rils_build.lock"   # ours: flock + owner record
BATON_FILE = "lock"              # torch's FileBaton (torch <= 2.11) / FileLock (newer)
DEFAULT_WAIT_S = 900.0
_POLL_S = 0.2


class BuildLockTimeout(RuntimeError):
    """A live process has held the build lock for longer than the wait bound."""


def _say(msg: str) -> None:
    print(f"rils_scale: {msg}", file=sys.stderr, flush=True)


def _wait_bound() -> float:
    try:
        return float(os.environ.get("RILS_KERNELS_LOCK_WAIT_S", DEFAULT_WAIT_S))
    except ValueError:
        return DEFAULT_WAIT_S


def read_owner(build_dir: Path) -> dict:
    """The last recorded owner of the build lock ({} when none or unreadable)."""
    try:
        data = json.loads((Path(build_dir) / OWNER_FILE).read_text() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _owner_text(owner: dict) -> str:
    if not owner:
        return "no owner recorded"
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {when}"


def clear_stale_baton(build_dir: Path, say: Callable[[str], None] = _say) -> Optional[str]:
    """Remove torch's ``lock`` from ``build_dir``; call only while holding :func:`build_lock` (then no
    live project build can own it). Returns the message said, or None when there was no lock."""
    path = Path(build_dir) / BATON_FILE
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    msg = (f"removed a stale JIT build lock {path} (age {age:.0f} s; last builder: "
           f"{_owner_text(read_owner(build_dir))}, no longer running): a build was killed midway, and "
           "torch's cpp_extension would have waited on this file forever")
    say(msg)
    return msg


@contextlib.contextmanager
def build_lock(build_dir: os.PathLike | str, wait_s: Optional[float] = None,
               say: Callable[[str], None] = _say) -> Iterator[None]:
    """Hold the project's build lock for ``build_dir`` (see the module docstring), after removing a
    stale torch ``lock``. Raises :class:`BuildLockTimeout` after ``wait_s`` (default
    ``$RILS_KERNELS_LOCK_WAIT_S`` or 900 s) while a live process holds it."""
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    wait_s = _wait_bound() if wait_s is None else wait_s
    fd = os.open(build_dir / OWNER_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        t0, announced = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
            waited = time.monotonic() - t0
            if waited >= wait_s:
                raise BuildLockTimeout(
                    f"the JIT build lock {build_dir / OWNER_FILE} has been held by a live process "
                    f"({_owner_text(read_owner(build_dir))}) for more than {wait_s:.0f} s; not waiting longer "
                    "(raise $RILS_KERNELS_LOCK_WAIT_S, or stop that process)")
            if not announced:
                say(f"waiting for another build of {build_dir.name} ({_owner_text(read_owner(build_dir))}; "
                    f"at most {wait_s:.0f} s)")
                announced = True
            time.sleep(_POLL_S)
        clear_stale_baton(build_dir, say)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock; the owner record stays for the next message
