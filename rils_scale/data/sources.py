"""Where samples come from: shard URL expansion and a fault-tolerant, seekable tar sample reader.

We read tars ourselves (``tarfile`` in streaming mode) rather than through webdataset's
``tarfile_to_samples`` so that a truncated or corrupt archive is counted and the stream moves
on to the next shard with exact, testable semantics, and so that member bytes are never
handed to an automatic decoder. Sample grouping follows the webdataset convention: members
``dir/KEY.EXT`` with the same ``dir/KEY`` (up to the first dot of the basename) that are
adjacent in the archive form one sample ``{"__key__": KEY, "__url__": url, EXT: bytes, ...}``.

The reader reports each sample's byte offset (its first member's header) and the offset where
the next sample starts, so a resumed stream re-opens a shard and seeks straight to its position
(O(1) in the steps already trained; see ``pipeline``). Memory per sample is bounded: members of
extensions nobody reads are skipped without being read, and a read member larger than
``MAX_MEMBER_BYTES`` drops its sample (``oversized_member``).
"""
from __future__ import annotations

import glob
import os
import subprocess
import tarfile
from collections.abc import Callable, Iterator, Sequence

import braceexpand

from .decode import (EMPTY_SHARD, LINK_MEMBER, OVERSIZED_MEMBER, TRUNCATED_SAMPLE, TRUNCATED_SHARD,
                     UNREADABLE_SHARD, USED_EXTENSIONS)

SkipCounter = Callable[[str], None]
"""Called with a skip reason each time something is dropped."""

MAX_MEMBER_BYTES = 64 << 20
"""Largest member that is read (64 MiB). A bigger image/caption/json drops its sample."""

SKIP_KEY = "__skip__"
"""Set in a sample dict when one of its members made it unusable (value: the skip reason)."""


def _is_remote(spec: str) -> bool:
    return spec.startswith("pipe:") or ("://" in spec and not spec.startswith("file://"))


def local_path(url: str) -> str | None:
    """The file path of a local shard URL (plain path or ``file://``), else None."""
    if _is_remote(url):
        return None
    return url[len("file://"):] if url.startswith("file://") else url


def expand_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand shard specs to a flat list of URLs.

    Accepts a path or ``file://`` URL, a brace pattern (``/data/{00000..00099}.tar``), a
    ``pipe:`` command or ``scheme://`` URL (brace-expanded too, as webdataset does:
    ``pipe:cat /data/{00000..00099}.tar`` is 100 shards), a directory (its ``*.tar`` files,
    sorted), or a list of any of these. ``::`` separates several specs in one string.
    """
    if isinstance(urls, (str, os.PathLike)):
        urls = str(urls).split("::")
    expanded: list[str] = []
    for spec in urls:
        spec = str(spec)
        if not spec:
            continue
        for url in braceexpand.braceexpand(spec):
            path = local_path(url)
            if path is not None and os.path.isdir(path):
                tars = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
                if not tars:
                    raise ValueError(f"directory {url!r} contains no .tar shards")
                expanded.extend(tars)
            else:
                expanded.append(url)
    if not expanded:
        raise ValueError(f"no shards in {urls!r}")
    return expanded


def check_local_shards_exist(urls: Sequence[str]) -> None:
    """Fail before any compute when local shard paths are missing (a typo, not a bad shard)."""
    missing = [u for u in urls if local_path(u) is not None and not os.path.isfile(local_path(u))]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(f"shard files not found: {', '.join(missing[:3])}{more}")


class _PipeStream:
    """File-like stdout of a ``pipe:`` command; a non-zero exit is reported on close."""

    def __init__(self, command: str):
        self._proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)
        self.command = command

    def read(self, size: int = -1) -> bytes:
        return self._proc.stdout.read(size)

    def close(self) -> None:
        self._proc.stdout.close()
        if self._proc.poll() is None:  # closed early (a seek-by-reading resume, a limit): stop it
            self._proc.kill()
            self._proc.wait()
            return
        if self._proc.returncode != 0:
            raise OSError(f"{self.command!r} exited with status {self._proc.returncode}")


def open_shard(url: str):
    """Open a shard for sequential binary reading (local path, ``file://``, ``pipe:`` or remote URL)."""
    if url.startswith("pipe:"):
        return _PipeStream(url[len("pipe:"):])
    path = local_path(url)
    if path is None:
        from webdataset.gopen import gopen  # remote schemes (http, s3 via curl/aws) as webdataset does
        return gopen(url, "rb")
    return open(path, "rb")


def split_member_name(name: str) -> tuple[str, str] | None:
    """``dir/KEY.EXT`` -> (``dir/KEY``, lower-cased ``EXT``); None for names without an extension."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _seekable_plain_tar(url: str) -> bool:
    path = local_path(url)
    return path is not None and not path.endswith((".gz", ".tgz", ".bz2", ".xz", ".zst"))


def iter_tar_samples(url: str, count_skip: SkipCounter, start: int = 0,
                     extensions: frozenset[str] | None = USED_EXTENSIONS,
                     max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict]:
    """Yield the samples of one shard from byte offset ``start``; never raises on bad data.

    Each sample dict has ``__offset__`` (its first member's header offset) and ``__next__``
    (where the next sample starts; None for the shard's last sample). ``start`` must be such
    an offset. A plain local tar is seeked; compressed or streamed shards are read and skipped
    up to ``start`` (cost: one shard, never the run). Only members whose extension is in
    ``extensions`` (None: all) are read.

    Counted: ``unreadable_shard`` (cannot be opened, or is not a tar: zero bytes, garbage),
    ``empty_shard`` (a valid tar without members), ``truncated_shard`` once for a read error
    after the first member (the sample being read is dropped as ``truncated_sample``),
    ``link_member`` (symlink / hard-link members), ``oversized_member``.
    """
    seek = start > 0 and _seekable_plain_tar(url)
    try:
        stream = open_shard(url)
        if seek:
            stream.seek(start)
    except OSError:
        count_skip(UNREADABLE_SHARD)
        return
    base = start if seek else 0
    current: dict | None = None
    failed = unreadable = False
    members = 0
    try:
        try:
            archive = tarfile.open(fileobj=stream, mode="r|" if seek else "r|*")
        except (tarfile.TarError, OSError, EOFError, ValueError):
            unreadable = True
            return
        with archive:
            for member in archive:
                members += 1
                offset = base + member.offset
                if offset < start:  # reading up to the resume point of a non-seekable shard
                    continue
                parts = split_member_name(member.name)
                if parts is None:
                    continue
                key, ext = parts
                if current is not None and current["__key__"] != key:
                    current["__next__"] = offset
                    yield current  # a new key starts: the previous sample is complete
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url, "__offset__": offset}
                if member.issym() or member.islnk():
                    count_skip(LINK_MEMBER)
                    continue
                if not member.isfile() or (extensions is not None and ext not in extensions):
                    continue  # tarfile skips the payload by reading in blocks: no whole-member read
                if member.size > max_member_bytes:
                    if SKIP_KEY not in current:
                        current[SKIP_KEY] = OVERSIZED_MEMBER
                    continue
                data = archive.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"short read of {member.name}")
                current[ext] = data
    except (tarfile.TarError, OSError, EOFError, ValueError):
        if members == 0 and start == 0:
            unreadable = True
        else:
            failed = True
    finally:
        try:
            stream.close()
        except OSError:
            failed = failed or not unreadable
        if unreadable:
            count_skip(UNREADABLE_SHARD)
        elif failed:
            count_skip(TRUNCATED_SHARD)
            if current is not None:
                count_skip(TRUNCATED_SAMPLE)
    if unreadable or failed:
        return
    if members == 0 and start == 0:
        count_skip(EMPTY_SHARD)
    if current is not None:
        current["__next__"] = None
        yield current
