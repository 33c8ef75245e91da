"""Process-independent seeds: every random choice in the data side derives from named parts."""
from __future__ import annotations

import hashlib


def sample_seed(*parts) -> int:
    """A 64-bit seed from any parts (ints, strings), stable across processes and Python runs.

    Python's ``hash`` of a string is salted per process, so it cannot be used for this.
    """
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")
