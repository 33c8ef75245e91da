"""Write image–caption shards in the LAION / img2dataset layout.

Each shard ``NNNNN.tar`` holds, per sample, ``KEY.jpg|png|webp`` (encoded image), ``KEY.txt``
(UTF-8 caption) and optionally ``KEY.json`` (metadata). Keys are the global sample index
zero-padded to 9 digits (``000000001``), as img2dataset names them, so keys are unique across
shards. Next to each shard, ``NNNNN_stats.json`` holds its count; ``_stats.json`` summarises
the whole set. Members are written with ``tarfile`` (ustar-compatible, mtime 0, root owner)
so the same input always gives byte-identical shards. Nothing is pickled.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from PIL import Image

_PIL_FORMAT = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def encode_image(image: Image.Image, ext: str = "jpg", quality: int = 95) -> bytes:
    """Encode a PIL image for a shard member (JPEG/WebP need RGB; PNG keeps the mode)."""
    fmt = _PIL_FORMAT.get(ext.lower())
    if fmt is None:
        raise ValueError(f"unsupported image extension {ext!r}; use one of {sorted(_PIL_FORMAT)}")
    if fmt == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))
    return buffer.getvalue()


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append one regular file with fixed metadata (reproducible archives)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    archive.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Streams samples into ``out_dir/00000.tar, 00001.tar, ...`` of ``shard_size`` samples each.

    Use as a context manager; ``close()`` returns the summary written to ``_stats.json``.
    """

    def __init__(self, out_dir: str | os.PathLike, shard_size: int = 10000, *, key_digits: int = 9,
                 name_digits: int = 5):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.out_dir.glob("*.tar"))
        if existing:
            raise FileExistsError(f"{self.out_dir} already holds shards ({existing[0].name}, ...); "
                                  "choose an empty output directory")
        self.shard_size, self.key_digits, self.name_digits = shard_size, key_digits, name_digits
        self.count = 0
        self.shards: list[dict] = []
        self._archive: tarfile.TarFile | None = None
        self.summary: dict | None = None
        """Set by ``close()``: the contents of ``_stats.json``."""

    def _next_archive(self) -> tarfile.TarFile:
        if self._archive is not None:
            self._finish_shard()
        name = f"{len(self.shards):0{self.name_digits}d}.tar"
        self.shards.append({"name": name, "count": 0})
        self._archive = tarfile.open(self.out_dir / name, "w", format=tarfile.USTAR_FORMAT)
        return self._archive

    def _finish_shard(self) -> None:
        self._archive.close()
        self._archive = None
        shard = self.shards[-1]
        stats_path = self.out_dir / shard["name"].replace(".tar", "_stats.json")
        stats_path.write_text(json.dumps({"count": shard["count"], "successes": shard["count"]}) + "\n")

    def write(self, image: bytes | Image.Image, caption: str, meta: dict | None = None, *,
              ext: str = "jpg") -> str:
        """Add one sample; returns its key. ``image`` is encoded bytes or a PIL image."""
        if self.summary is not None:
            raise ValueError("ShardWriter is closed")
        ext = ext.lower()
        if ext not in _PIL_FORMAT:
            raise ValueError(f"unsupported image extension {ext!r}")
        if isinstance(image, Image.Image):
            image = encode_image(image, ext)
        if self._archive is None or self.shards[-1]["count"] >= self.shard_size:
            self._next_archive()
        key = f"{self.count:0{self.key_digits}d}"
        add_member(self._archive, f"{key}.{ext}", image)
        add_member(self._archive, f"{key}.txt", caption.encode("utf-8"))
        if meta is not None:
            add_member(self._archive, f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        self.shards[-1]["count"] += 1
        self.count += 1
        return key

    def close(self) -> dict:
        """Finish the open shard and write ``_stats.json``; returns the summary. Idempotent."""
        if self.summary is not None:
            return self.summary
        if self._archive is not None:
            self._finish_shard()
        self.summary = {"count": self.count, "shard_size": self.shard_size, "num_shards": len(self.shards),
                        "shards": self.shards}
        (self.out_dir / "_stats.json").write_text(json.dumps(self.summary, indent=1) + "\n")
        return self.summary

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._archive is not None:
            self._archive.close()
            self._archive = None

    @property
    def shard_paths(self) -> list[str]:
        return [str(self.out_dir / s["name"]) for s in self.shards]
