"""The position of one loader stream after a batch, shared by the pipeline (which produces it)
and ``loader_state`` (which stores and re-deals it on resume), so neither imports the other."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StreamState:
    """Position of one stream after a batch; JSON-serialisable (``vars`` / ``from_json``; per batch the
    loader serialises ``vars(snapshot)``: ``asdict``'s recursive deep copy cost 0.2 ms per sample)."""

    epoch: int
    cursor: int = 0
    """Index of the current work item (shard) in this epoch's list."""
    offset: int | None = None
    """Byte offset of the next sample inside the current item; None: the item's start."""
    taken: int = 0
    """Samples already taken from the current item (for items with a limit)."""
    buffer: list = field(default_factory=list)
    """Shuffle buffer contents, in buffer order, as ``[shard url, sample offset]`` references."""
    rng: list | None = None
    """``random.Random.getstate()`` of the shuffle RNG; None: the epoch's fresh seed."""
    items: list | None = None
    """``[[url, start offset, max samples or None], ...]`` of this epoch; None: the regular deal."""

    @classmethod
    def from_json(cls, value: dict) -> "StreamState":
        return cls(**value)
