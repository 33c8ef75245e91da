"""Named RNG states for tensor parallelism, shared by forward and activation recompute.

- The default generator is seeded identically on every rank of a TP group, so dropout in
  replicated regions (and anything else drawn from it) agrees across TP peers.
- ``tensor-parallel`` state: seed + offset + TP rank, used under :meth:`RNGStatesTracker.fork`
  for dropout on sharded activations (attention probabilities of this rank's heads), so
  different shards get independent masks while TP = k stays reproducible.
- :func:`checkpoint` saves the default generator *and* every tracked state before the
  forward and restores them for the recompute, so recomputed dropout equals the original
  (``torch.utils.checkpoint`` alone only restores the default generator; we add the tracker
  states through its ``context_fn``).
"""
from __future__ import annotations

import contextlib
from typing import Dict

import torch
import torch.utils.checkpoint

TENSOR_PARALLEL_RNG = "tensor-parallel"
_TP_SEED_OFFSET = 2718


def _get_state(device_type: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device_type == "cuda" else torch.get_rng_state()


def _set_state(state: torch.Tensor, device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Holds named generator states; ``fork(name)`` swaps one in for a region."""

    def __init__(self, device_type: str = "cpu"):
        self.device_type = device_type
        self.states: Dict[str, torch.Tensor] = {}

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"RNG state {name!r} already exists")
        saved = _get_state(self.device_type)
        if self.device_type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self.states[name] = _get_state(self.device_type)
        _set_state(saved, self.device_type)

    def get_states(self) -> Dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states.items()}

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self.states = {k: v.clone() for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = TENSOR_PARALLEL_RNG):
        if name not in self.states:  # single process: the default generator serves
            yield
            return
        saved = _get_state(self.device_type)
        _set_state(self.states[name], self.device_type)
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device_type)
            _set_state(saved, self.device_type)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def model_parallel_seed(seed: int, tp_rank: int, tp_size: int, device_type: str = "cpu") -> None:
    """Seed the default generator (same on all ranks) and the TP state (per TP rank)."""
    global _TRACKER
    _TRACKER = RNGStatesTracker(device_type)
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
    if tp_size > 1:
        _TRACKER.add(TENSOR_PARALLEL_RNG, seed + _TP_SEED_OFFSET + tp_rank)


def _tracker_contexts():
    """``context_fn`` for ``torch.utils.checkpoint``: the recompute runs with the tracker states
    of the original forward, and the live states are put back afterwards."""
    tracker = get_rng_tracker()
    forward_states = tracker.get_states()

    @contextlib.contextmanager
    def recompute():
        live = tracker.get_states()
        tracker.set_states(forward_states)
        try:
            yield
        finally:
            tracker.set_states(live)

    return contextlib.nullcontext(), recompute()


def checkpoint(function, *args):
    """Activation checkpointing that replays the same RNG draws in the recompute.

    Built on ``torch.utils.checkpoint`` in its non-reentrant form: the default generator (and
    CUDA's, for CUDA inputs) is restored by torch, the named tracker states by our
    ``context_fn``. Non-reentrant matters for ZeRO-3 and for RILS: the vision encoder runs
    twice per step, and the reentrant form runs one nested backward per checkpointed call, so
    each parameter would reach ZeRO's gradient hooks twice per step (ZeRO-3 asserts on a
    parameter reduced twice in one bucket). Here the recomputed tensors are swapped into the
    main graph and autograd sums both passes before a parameter's gradient is accumulated
    once. It also keeps parameter gradients when no input requires grad. Under ZeRO-3,
    ``function`` (a module) has its parameters gathered again by DeepSpeed's module hooks
    when it runs in the recompute.
    """
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True,
                                             context_fn=_tracker_contexts)
