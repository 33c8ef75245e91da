"""Checks that need no process group and no engine: run before the model is built, so a bad
input costs seconds, not a ZeRO-3 initialisation (and never leaves a half-written run dir)."""
from __future__ import annotations

import json
import os
import tarfile
from typing import List


class PreflightError(SystemExit):
    """A clear, non-zero exit before any compute."""


def check_shards(train_data) -> List[str]:
    """Expand ``--train-data``; every local shard must exist, be non-empty and hold a member."""
    from ..data.sources import check_local_shards_exist, expand_urls
    try:
        urls = expand_urls(train_data)
        check_local_shards_exist(urls)
    except (FileNotFoundError, ValueError) as err:
        raise PreflightError(f"--train-data: {err}") from None
    if not urls:
        raise PreflightError(f"--train-data {train_data!r} names no shard")
    empty = []
    for url in urls:
        if url.startswith("pipe:") or "://" in url:
            continue  # remote: read lazily; the loader counts what it cannot read
        if os.path.getsize(url) == 0:
            empty.append(url)
            continue
        try:
            with tarfile.open(url) as tar:
                if tar.next() is None:
                    empty.append(url)
        except tarfile.TarError:
            pass  # a corrupt shard is the loader's business: skipped and counted, not fatal
    if empty:
        more = f" (and {len(empty) - 3} more)" if len(empty) > 3 else ""
        raise PreflightError(f"--train-data: empty shard files (no sample): {', '.join(empty[:3])}{more}")
    return urls


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
