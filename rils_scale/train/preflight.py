"""Checks that need no process group and no engine: run before the model is built, so a bad
input costs seconds, not a ZeRO-3 initialisation (and never leaves a half-written run dir)."""
from __future__ import annotations

import json
import os
import tarfile
from typing import List


class PreflightError(SystemExit):
    """A clear, non-zero exit before any compute."""


def check_shards(train_data, *, dp_size: int = 1, num_workers: int = 1, resampled: bool = False,
                 announce: bool = True) -> List[str]:
    """Expand ``--train-data`` and check, before any engine, that it can feed every stream.

    Missing local shards, a list with no sample at all, and a list that cannot feed
    ``dp_size x num_workers`` streams are errors. Some empty shards are not: img2dataset writes
    a legitimately empty tar when every row of a shard failed, and the loader skips it and counts
    ``empty_shard``; they are announced here.
    """
    from ..data.pipeline import validate_train_data
    try:
        urls = validate_train_data(train_data, dp_size=dp_size, num_workers=max(1, num_workers),
                                   resampled=resampled)
    except (FileNotFoundError, ValueError) as err:
        raise PreflightError(f"--train-data: {err}{shard_size_hint(train_data, dp_size * max(1, num_workers))}") \
            from None
    if not urls:
        raise PreflightError(f"--train-data {train_data!r} names no shard")
    local = [u for u in urls if not (u.startswith("pipe:") or "://" in u)]  # remote: read lazily
    empty = [u for u in local if _is_empty_shard(u)]
    if empty and len(empty) == len(urls):
        more = f" (and {len(empty) - 3} more)" if len(empty) > 3 else ""
        raise PreflightError(f"--train-data: every shard is empty (no sample): {', '.join(empty[:3])}{more}")
    if empty and announce:
        print(f"[rils_scale] --train-data: {len(empty)} of {len(urls)} shards are empty; they are skipped "
              "and counted as empty_shard", flush=True)
    return urls


def shard_size_hint(train_data, streams: int) -> str:
    """When the shards are fewer than the streams: the rule, and the ``make_shards.py
    --shard-size`` that would give every stream a shard (from the shards' ``_stats.json``)."""
    from ..data.dealing import read_sample_counts
    from ..data.sources import expand_urls
    try:
        urls = expand_urls(train_data)
        counts = read_sample_counts(urls)
    except (FileNotFoundError, ValueError, OSError):
        return ""
    if len(urls) >= streams:
        return ""
    hint = (f" Rule: shards >= nodes x GPUs per node x --num-workers (here {streams}); choose make_shards.py "
            "--shard-size <= samples / that number")
    if counts:
        total = sum(counts)
        hint += f": these {len(urls)} shard(s) hold {total} samples, so --shard-size {max(1, total // streams)}"
    return hint + "."


def _is_empty_shard(url: str) -> bool:
    if os.path.getsize(url) == 0:
        return True
    try:
        with tarfile.open(url) as tar:
            return tar.next() is None
    except tarfile.TarError:
        return False  # a corrupt shard is the loader's business: skipped and counted, not fatal


def check_resume_vocabulary(output_dir: str, vocab_size: int, tokenizer_path: str) -> None:
    """On ``--resume``, the tokenizer must give the vocabulary the checkpoint was trained with."""
    config_path = os.path.join(output_dir, "config.json")
    if not os.path.isfile(config_path):
        return
    with open(config_path) as f:
        stored = json.load(f).get("model", {}).get("text", {}).get("vocab_size")
    if stored is not None and int(stored) != int(vocab_size):
        raise PreflightError(
            f"--tokenizer {tokenizer_path} has a vocabulary of {vocab_size} tokens, the checkpoint in "
            f"{output_dir} was trained with {stored}: resume with the run's own tokenizer "
            f"({os.path.join(output_dir, 'tokenizer.model')})")
