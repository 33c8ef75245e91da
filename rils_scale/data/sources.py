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
extensions nobody reads are skipped without being read, and a sample whose read members would
exceed ``MAX_MEMBER_BYTES`` together is dropped (``oversized_member``).

Compressed shards (gzip, bzip2, xz; recognised by their magic bytes) are inflated here, in chunks
of at most ``tarfile.RECORDSIZE`` bytes per read, not by ``tarfile``: skipping a member of a
compressed stream means inflating all of it (a 2 GiB caption in a 2 MB ``.tar.gz`` cost 46 s),
so a compressed shard with a member over the cap is abandoned at that member's header
(``oversized_member`` + ``abandoned_shard``; the samples before it are used). A bomb then costs
no more than reading the cap. ``ShardStream.bytes_out`` counts the inflated bytes handed out.
"""
from __future__ import annotations

import bz2
import glob
import gzip
import lzma
import os
import subprocess
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence

import braceexpand

from .decode import (ABANDONED_SHARD, EMPTY_SHARD, LINK_MEMBER, OVERSIZED_MEMBER, TRUNCATED_SAMPLE,
                     TRUNCATED_SHARD, UNREADABLE_SHARD, USED_EXTENSIONS)

SkipCounter = Callable[[str], None]
"""Called with a skip reason each time something is dropped."""

MAX_MEMBER_BYTES = 64 << 20
"""Most bytes read for one sample (64 MiB, all its read members together). A bigger
image/caption/json drops its sample; in a compressed shard any bigger member ends the shard."""

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


_COMPRESSED_MAGIC = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
                     (b"BZh", lambda f: bz2.BZ2File(f, "rb")),
                     (b"\xfd7zXZ\x00", lambda f: lzma.LZMAFile(f, "rb")))


class ShardStream:
    """The tar bytes of one shard: inflated here when the shard is compressed (see the module
    docstring), passed through otherwise. ``read(n)`` returns at most ``n`` bytes (decompressors
    never produce more than asked; tarfile reads ``RECORDSIZE`` at a time), ``bytes_out`` counts
    what it returned."""

    def __init__(self, raw, detect: bool = True):
        self.raw = raw
        head = raw.read(6) if detect else b""
        self._head = head
        self.compressed = False
        self._inner = None
        for magic, opener in _COMPRESSED_MAGIC:
            if head.startswith(magic):
                self.compressed = True
                self._inner = opener(_RawView(self))  # reads the peeked head first
                break
        self.bytes_out = 0

    def _read_raw(self, size: int = -1) -> bytes:
        if self._head:
            head, self._head = (self._head, b"") if size < 0 or size >= len(self._head) else \
                (self._head[:size], self._head[size:])
            return head if size < 0 or len(head) == size else head + self.raw.read(size - len(head))
        return self.raw.read(size)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = tarfile.RECORDSIZE  # never an unbounded read (tarfile always passes a size)
        try:  # read1: what one decompression step gives, so the bytes before a truncation are kept
            data = self._inner.read1(size) if self._inner is not None else self._read_raw(size)
        except (zlib.error, lzma.LZMAError, EOFError) as err:  # damaged or truncated compressed data
            raise tarfile.ReadError(f"compressed stream: {err}") from None
        self.bytes_out += len(data)
        return data

    def close(self) -> None:
        try:
            if self._inner is not None:
                self._inner.close()
        finally:
            self.raw.close()


class _RawView:
    """What the decompressors read from: the peeked head, then the raw stream."""

    def __init__(self, stream: ShardStream):
        self.read = stream._read_raw


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


_READ_CHUNK = 1 << 20


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A member's bytes, read in 1 MiB chunks: at most twice its size in memory at once
    (``extractfile(...).read()`` of a streamed tar held three to four copies while joining)."""
    reader = archive.extractfile(member)
    chunks = []
    while True:
        chunk = reader.read(_READ_CHUNK)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def iter_tar_samples(url: str, count_skip: SkipCounter, start: int = 0,
                     extensions: frozenset[str] | None = USED_EXTENSIONS,
                     max_member_bytes: int = MAX_MEMBER_BYTES,
                     on_open: Callable[[ShardStream], None] | None = None) -> Iterator[dict]:
    """Yield the samples of one shard from byte offset ``start``; never raises on bad data.

    Each sample dict has ``__offset__`` (its first member's header offset) and ``__next__``
    (where the next sample starts; None for the shard's last sample). ``start`` must be such
    an offset. A plain local tar is seeked; compressed or streamed shards are read and skipped
    up to ``start`` (cost: one shard, never the run). Only members whose extension is in
    ``extensions`` (None: all) are read. ``on_open`` sees the shard's :class:`ShardStream`
    (tests count its inflated bytes).

    Counted: ``unreadable_shard`` (cannot be opened, or is not a tar: zero bytes, garbage),
    ``empty_shard`` (a valid tar without members), ``truncated_shard`` once for a read error
    after the first member (the sample being read is dropped as ``truncated_sample``),
    ``link_member`` (symlink / hard-link members), ``oversized_member`` (a sample over
    ``max_member_bytes``), ``abandoned_shard`` (a compressed shard ended at a member over
    ``max_member_bytes``, which would have to be inflated to be skipped).
    """
    seek = start > 0 and _seekable_plain_tar(url)
    try:
        raw = open_shard(url)
        if seek:
            raw.seek(start)
    except OSError:
        count_skip(UNREADABLE_SHARD)
        return
    base = start if seek else 0
    current: dict | None = None
    held = 0  # bytes of the members read into ``current``
    failed = unreadable = False
    members = 0
    stream = None
    try:
        try:
            stream = ShardStream(raw, detect=not seek)
            if on_open is not None:
                on_open(stream)
            archive = tarfile.open(fileobj=stream, mode="r|")
        except (tarfile.TarError, OSError, EOFError, ValueError):
            unreadable = True
            return
        with archive:
            for member in archive:
                members += 1
                offset = base + member.offset
                if member.size > max_member_bytes and stream.compressed:
                    count_skip(OVERSIZED_MEMBER)
                    count_skip(ABANDONED_SHARD)  # skipping it would inflate all of it
                    current = None
                    break
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
                    current, held = {"__key__": key, "__url__": url, "__offset__": offset}, 0
                if member.issym() or member.islnk():
                    count_skip(LINK_MEMBER)
                    continue
                if not member.isfile() or (extensions is not None and ext not in extensions):
                    continue  # tarfile skips the payload by reading in blocks: no whole-member read
                if SKIP_KEY in current:
                    continue  # already dropped: read nothing more of it
                if held + member.size > max_member_bytes:
                    current = {k: v for k, v in current.items() if k.startswith("__")}  # free what it held
                    current[SKIP_KEY] = OVERSIZED_MEMBER
                    continue
                data = _read_member(archive, member)
                if len(data) != member.size:
                    raise tarfile.ReadError(f"short read of {member.name}")
                current[ext] = data
                held += len(data)
    except (tarfile.TarError, OSError, EOFError, ValueError):
        if members == 0 and start == 0:
            unreadable = True
        else:
            failed = True
    finally:
        try:
            (stream if stream is not None else raw).close()
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
