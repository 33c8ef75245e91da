"""Where samples come from: shard URL expansion and a fault-tolerant tar sample reader.

We read tars ourselves (``tarfile`` in streaming mode) rather than through webdataset's
``tarfile_to_samples`` so that a truncated or corrupt archive is counted and the stream moves
on to the next shard with exact, testable semantics, and so that member bytes are never
handed to an automatic decoder. Sample grouping follows the webdataset convention: members
``dir/KEY.EXT`` with the same ``dir/KEY`` (up to the first dot of the basename) that are
adjacent in the archive form one sample ``{"__key__": KEY, "__url__": url, EXT: bytes, ...}``.
"""
from __future__ import annotations

import glob
import os
import subprocess
import tarfile
from collections.abc import Callable, Iterator, Sequence

import braceexpand

from .decode import TRUNCATED_SAMPLE, TRUNCATED_SHARD, UNREADABLE_SHARD

SkipCounter = Callable[[str], None]
"""Called with a skip reason each time something is dropped."""


def expand_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand shard specs to a flat list of URLs.

    Accepts a path, a brace pattern (``/data/{00000..00099}.tar``), a ``pipe:`` command, a
    ``scheme://`` URL, a directory (its ``*.tar`` files, sorted), or a list of any of these.
    ``::`` separates several specs in one string (webdataset convention).
    """
    if isinstance(urls, (str, os.PathLike)):
        urls = str(urls).split("::")
    expanded: list[str] = []
    for spec in urls:
        spec = str(spec)
        if not spec:
            continue
        if spec.startswith("pipe:") or "://" in spec:
            expanded.append(spec)
            continue
        for url in braceexpand.braceexpand(spec):
            if os.path.isdir(url):
                tars = sorted(glob.glob(os.path.join(glob.escape(url), "*.tar")))
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
    missing = [u for u in urls if not (u.startswith("pipe:") or "://" in u) and not os.path.isfile(u)]
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
        if self._proc.wait() != 0:
            raise OSError(f"{self.command!r} exited with status {self._proc.returncode}")


def open_shard(url: str):
    """Open a shard for sequential binary reading (local path, ``pipe:`` or remote URL)."""
    if url.startswith("pipe:"):
        return _PipeStream(url[len("pipe:"):])
    if "://" in url and not url.startswith("file://"):
        from webdataset.gopen import gopen  # remote schemes (http, s3 via curl/aws) as webdataset does
        return gopen(url, "rb")
    return open(url.removeprefix("file://"), "rb")


def split_member_name(name: str) -> tuple[str, str] | None:
    """``dir/KEY.EXT`` -> (``dir/KEY``, lower-cased ``EXT``); None for names without an extension."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def iter_tar_samples(url: str, count_skip: SkipCounter) -> Iterator[dict]:
    """Yield the samples of one shard; never raises on bad data.

    An unopenable shard counts ``unreadable_shard``. A read error mid-archive (truncation,
    corrupt header, failing ``pipe:``) counts ``truncated_shard`` once; the samples completed
    before the error are yielded, and the sample being read when it happened — which may be
    missing members — is dropped and counted as ``truncated_sample``.
    """
    try:
        stream = open_shard(url)
    except OSError:
        count_skip(UNREADABLE_SHARD)
        return
    current: dict | None = None
    failed = False
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                parts = split_member_name(member.name)
                if parts is None:
                    continue
                key, ext = parts
                if current is not None and current["__key__"] != key:
                    yield current  # a new key starts: the previous sample is complete
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                data = archive.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"short read of {member.name}")
                current[ext] = data
    except (tarfile.TarError, OSError, EOFError, ValueError):
        failed = True
    finally:
        try:
            stream.close()
        except OSError:
            failed = True
    if failed:
        count_skip(TRUNCATED_SHARD)
        if current is not None:
            count_skip(TRUNCATED_SAMPLE)
        return
    if current is not None:
        yield current
