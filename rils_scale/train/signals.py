"""Signals and stalls seen by the training loop: an agreed stop, a warning while data is late."""
from __future__ import annotations

import os
import signal
import threading
import time

from ..parallel import comm


LAUNCHER_EXITED = "launcher exited"


class StopRequest:
    """SIGTERM / SIGUSR1 set a flag; the loop checkpoints at the next step boundary and exits.

    All ranks agree through a MAX all-reduce of the flag, so a signal that reached only some
    ranks (or reached them at different steps) still stops everyone at the same step.
    """

    REASONS = ("SIGTERM", "SIGUSR1", LAUNCHER_EXITED)
    """Stop reasons in the order of the code all-reduced by :meth:`agreed` (the highest wins)."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self.agreed_reason = None  # what the ranks agreed on (maybe another rank's reason)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def _code(self) -> int:
        if not self.requested:
            return 0
        return 1 + (self.REASONS.index(self.signal_name) if self.signal_name in self.REASONS else len(self.REASONS))

    def agreed(self) -> bool:
        """One MAX all-reduce of a reason code: every rank learns that, and why, some rank stops."""
        code = int(comm.all_reduce_values([self._code()], comm.world_group(), "max")[0])
        if code:
            self.agreed_reason = self.REASONS[code - 1] if code <= len(self.REASONS) else "stop request"
        return code > 0

    def describe(self) -> str:
        """For the final log line: ``signal SIGUSR1``, ``launcher exited``, ``... on another rank``."""
        reason = self.signal_name if self.requested else self.agreed_reason
        text = reason if reason == LAUNCHER_EXITED else f"signal {reason}"
        return text if self.requested else f"{text} on another rank"


class DataWaitWatchdog:
    """Says so, every ``interval`` seconds, while a rank waits for its next batch: a stalled
    loader (an unreachable pipe: URL, a dead NFS mount) shows in the log instead of a silent hang."""

    def __init__(self, rank: int, interval: float):
        self.rank, self.interval, self.timer, self.start = rank, interval, None, 0.0

    def _warn(self):
        waited = time.perf_counter() - self.start
        print(f"[rils_scale] rank {self.rank}: still waiting for data after {waited:.0f}s "
              "(check the shards, the workers and the storage)", flush=True)
        self._arm()

    def _arm(self):
        self.timer = threading.Timer(self.interval, self._warn)
        self.timer.daemon = True
        self.timer.start()

    def __enter__(self):
        self.start = time.perf_counter()
        if self.interval > 0:
            self._arm()
        return self

    def __exit__(self, *exc):
        if self.timer is not None:
            self.timer.cancel()


def _launcher_ancestors(max_depth: int = 4) -> list:
    """PIDs of the launcher processes above this rank (deepspeed runner / launch, torchrun, srun)."""
    out, pid = [], os.getppid()
    for _ in range(max_depth):
        if pid <= 1:
            break
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if any(k in cmd for k in ("deepspeed", "torchrun", "torch.distributed", "srun", "mpirun")):
            out.append(pid)
        pid = parent
    return out


class LauncherWatch:
    """Requests a stop when a launcher process above this rank dies (killed, crashed, SIGKILLed).

    A signalled ``deepspeed`` runner does not always take its ranks with it; without this they
    train on unsupervised. Polled every ``interval`` seconds by a daemon thread; the loop then
    checkpoints at the next step boundary and exits (within one step + ``interval`` seconds).
    Linux only (reads /proc); elsewhere it watches nothing.
    """

    def __init__(self, stop: "StopRequest", interval: float = 1.0):
        self.stop, self.interval = stop, interval
        self.pids = _launcher_ancestors() if os.path.isdir("/proc") else []
        self.ppid = os.getppid()
        if self.pids:
            threading.Thread(target=self._watch, daemon=True, name="rils-launcher-watch").start()

    def _alive(self, pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def _watch(self):
        while True:
            time.sleep(self.interval)
            if os.getppid() != self.ppid or not all(self._alive(p) for p in self.pids):
                self.stop.requested = True
                self.stop.signal_name = self.stop.signal_name or LAUNCHER_EXITED
                return
