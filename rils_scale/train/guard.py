"""The non-finite guard: a step whose loss or global gradient norm is not finite is not applied.

How it works with DeepSpeed. ZeRO-3 computes the global gradient norm (over DP and TP, through
the ``mpu``) inside ``optimizer.step`` and, when it is not finite, discards the gradients and
skips the update: weights, fp32 masters, Adam moments and the LR schedule stay untouched, and
``engine.was_step_applied()`` is ``False``. A NaN/inf loss on any rank makes that norm NaN, so one
mechanism covers both terms. The guard then

- agrees over all ranks (``comm.any_rank_async``) which term was non-finite: ``loss`` (on some rank)
  or, if every loss was finite, ``grad_norm``;
- undoes DeepSpeed's ``global_steps`` increment, so DeepSpeed's step, the LR scheduler's position
  and the trainer's step stay equal (the trainer's step does not advance either: the batch is
  consumed, the step number is not);
- counts it (``nonfinite_steps``: total over the run, resumed runs included) and logs it once
  with the step and the term;
- raises :class:`NonFiniteAbort` after ``max_consecutive`` non-finite steps in a row; the
  trainer exits with :data:`EXIT_NONFINITE` without writing a checkpoint, so the newest
  checkpoint stays the last good one.

If DeepSpeed *applied* a step whose loss was non-finite (a ZeRO stage / optimizer that does not
check the norm), the state is already corrupt: the guard raises instead of training on.

Cost: one 1-element all-reduce per micro-step (the loss flag), next to the hundreds ZeRO-3
issues per step, and no host sync of its own: the flag is all-reduced on the device and copied to
the host behind the loss (``comm.any_rank_async``); after the optimizer step, whose gradient-norm
check has already synchronised past it, reading it waits for nothing.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..parallel import comm

log = logging.getLogger("rils_scale.train")

EXIT_NONFINITE = 3
"""Exit status of a run stopped by ``--max-nonfinite-steps``."""


class NonFiniteAbort(RuntimeError):
    """Too many consecutive non-finite steps: stop without checkpointing the bad state."""


class NonFiniteGuard:
    def __init__(self, max_consecutive: int, is_main: bool, total_before: int = 0):
        self.max_consecutive = max_consecutive
        self.is_main = is_main
        self.total = int(total_before)
        self.consecutive = 0
        self._loss_bad: Optional[torch.Tensor] = None
        self._pending: Optional[comm.PendingValues] = None
        self._applied = True

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Record one micro-step's loss: a device flag, agreed over all ranks on the device (every
        rank calls this each micro-step); no host sync here."""
        bad = ~torch.isfinite(loss.detach())
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad
        self._pending = comm.any_rank_async(self._loss_bad.reshape(1))

    def after_step(self, engine, step: int) -> bool:
        """Call after the optimizer step (gradient-accumulation boundary). Returns whether the
        update was applied; ``step`` is the trainer's step the update would have produced."""
        loss_bad = self._pending is not None and self._pending.host_values()[0] > 0
        self._loss_bad = self._pending = None
        applied = bool(engine.was_step_applied()) if hasattr(engine, "was_step_applied") else True
        if applied and loss_bad:
            raise NonFiniteAbort(f"step {step}: the loss was not finite but DeepSpeed applied the update "
                                 "(this ZeRO stage/optimizer does not check the gradient norm); "
                                 "the weights are no longer trustworthy")
        self._applied = applied
        if applied:
            self.consecutive = 0
            return True
        engine.global_steps -= 1  # DeepSpeed counted the discarded step; the scheduler did not
        self.total += 1
        self.consecutive += 1
        term = "loss" if loss_bad else "grad_norm"
        if self.is_main:
            print(f"[rils_scale] step {step}: non-finite {term}, update skipped "
                  f"({self.consecutive} in a row, {self.total} in total)", flush=True)
        if self.max_consecutive > 0 and self.consecutive >= self.max_consecutive:
            raise NonFiniteAbort(f"{self.consecutive} consecutive non-finite steps (--max-nonfinite-steps "
                                 f"{self.max_consecutive}) at step {step}, last term: {term}; stopping "
                                 "without a checkpoint, the newest checkpoint is the last good state")
        return False

    def was_step_applied(self) -> bool:
        """Whether the last optimizer step changed the weights (post-step hooks run only then)."""
        return self._applied
