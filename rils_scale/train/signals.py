"""Signals and stalls seen by the training loop: an agreed stop, a warning while data is late."""
from __future__ import annotations

import signal
import threading
import time

from ..parallel import comm


class StopRequest:
    """SIGTERM / SIGUSR1 set a flag; the loop checkpoints at the next step boundary and exits.

    All ranks agree through a MAX all-reduce of the flag, so a signal that reached only some
    ranks (or reached them at different steps) still stops everyone at the same step.
    """

    def __init__(self):
        self.requested = False
        self.signal_name = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        return comm.any_rank(self.requested)


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
