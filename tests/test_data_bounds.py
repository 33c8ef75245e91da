"""Issue 21 §3: small compressed shards that expand hugely cost memory and time bounded by the
member cap, not by what they expand to: junk members in the shuffle buffer (a per-worker bound
stated in docs/data.md) and a gzip bomb (abandoned at the oversized member's header)."""
import bz2
import io
import json
import lzma
import os
import struct
import subprocess
import sys
import tarfile
import textwrap
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from rils_scale.data import Tokenizer, build_train_loader, train_tokenizer
from rils_scale.data.pipeline import SHUFFLE_BUFFER_BYTES
from rils_scale.data.shards import encode_image
from rils_scale.data.sources import MAX_MEMBER_BYTES, iter_tar_samples

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20


class GzipTarWriter:
    """A ``.tar.gz`` with members of any size made of zeros, written without deflating them.

    A block of 1 MiB of zeros is deflated once (raw deflate, ended by a full flush: byte-aligned,
    no reference to earlier data) and repeated; the compressor is fully flushed before each run
    of such blocks, so its later output never refers back across them. 2 GiB of zeros cost
    ~2 MB on disk and a CRC pass, not 2 GiB of deflate work.
    """

    _ZERO = bytes(MIB)

    def __init__(self, path):
        self.file = open(path, "wb")
        self.file.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")  # gzip header, no name, mtime 0
        self.deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        block = zlib.compressobj(6, zlib.DEFLATED, -15)
        self.zero_block = block.compress(self._ZERO) + block.flush(zlib.Z_FULL_FLUSH)
        self.zero_crc = None
        self.crc, self.size = 0, 0

    def _data(self, data: bytes) -> None:
        self.file.write(self.deflate.compress(data))
        self.crc, self.size = zlib.crc32(data, self.crc), self.size + len(data)

    def _zeros(self, mib: int) -> None:
        self.file.write(self.deflate.flush(zlib.Z_FULL_FLUSH))
        for _ in range(mib):
            self.file.write(self.zero_block)
            self.crc = zlib.crc32(self._ZERO, self.crc)
        self.size += mib * MIB

    def add(self, name: str, data: bytes = b"", zero_mib: int = 0) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data) + zero_mib * MIB
        self._data(info.tobuf(tarfile.GNU_FORMAT))
        self._data(data)
        if zero_mib:
            self._zeros(zero_mib)
        self._data(bytes(-info.size % tarfile.BLOCKSIZE))

    def close(self) -> None:
        self._data(bytes(2 * tarfile.BLOCKSIZE))
        self.file.write(self.deflate.flush())
        self.file.write(struct.pack("<II", self.crc, self.size & 0xFFFFFFFF))
        self.file.close()


def _image(i):
    return Image.fromarray(np.random.default_rng(i).integers(0, 256, (12, 12, 3), dtype=np.uint8), "RGB")


def _sample(writer, key, caption=b"a small caption"):
    writer.add(f"{key}.jpg", encode_image(_image(int(key[-2:])), "jpg"))
    writer.add(f"{key}.txt", caption)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    corpus = ["a small caption", "a photo of a cat", "the number one two three"] * 4
    return train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "tok", vocab_size=48)


# ------------------------------------------------------------------------------- gzip bomb
def test_gzip_bomb_costs_the_cap_not_the_bomb(tmp_path, tokenizer_file):
    """A 2 GiB caption inside a ~2 MB .tar.gz: the shard is abandoned at that member's header,
    after inflating less than one member cap; the samples before it are used."""
    bomb = tmp_path / "bomb.tar.gz"
    writer = GzipTarWriter(bomb)
    for i in range(3):
        _sample(writer, f"s{i:02d}")
    writer.add("s03.jpg", encode_image(_image(3), "jpg"))
    writer.add("s03.txt", zero_mib=2048)  # the bomb: 2 GiB of caption
    for i in range(4, 7):
        _sample(writer, f"s{i:02d}")
    writer.close()
    assert bomb.stat().st_size < 3 * MIB

    streams, skipped = [], Counter()
    samples = list(iter_tar_samples(str(bomb), lambda r: skipped.update((r,)), on_open=streams.append))
    assert [s["__key__"] for s in samples] == ["s00", "s01", "s02"]
    assert skipped == {"oversized_member": 1, "abandoned_shard": 1}
    inflated = streams[0].bytes_out
    assert streams[0].compressed and inflated < MAX_MEMBER_BYTES, inflated  # reading the whole bomb: 2 GiB
    assert inflated < MIB  # in fact: the three samples before it and the bomb's header

    # The training stream moves on to the next shard and reports both counts.
    good = tmp_path / "good.tar.gz"
    writer = GzipTarWriter(good)
    for i in range(10, 16):
        _sample(writer, f"g{i:02d}")
    writer.close()
    loader = build_train_loader([str(bomb), str(good)], Tokenizer.load(tokenizer_file), image_size=8,
                                context_length=8, batch_size=9, dp_rank=0, dp_size=1, num_workers=0, seed=0,
                                shuffle_buffer=4)
    batch = next(loader)
    assert sorted(batch["keys"]) == ["g10", "g11", "g12", "g13", "g14", "g15", "s00", "s01", "s02"]
    assert batch["skipped"] == {"oversized_member": 1, "abandoned_shard": 1}
    loader.close()


@pytest.mark.parametrize("compress", ["gz", "bz2", "xz"])
def test_compressed_shards_are_read_like_plain_ones_and_truncation_is_counted(tmp_path, compress):
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as archive:
        for i in range(5):
            for ext, data in (("jpg", encode_image(_image(i), "jpg")), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"k{i:02d}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    raw = plain.getvalue()
    packed = {"gz": lambda b: __import__("gzip").compress(b), "bz2": bz2.compress, "xz": lzma.compress}[compress](raw)
    (tmp_path / "plain.tar").write_bytes(raw)
    (tmp_path / f"s.tar.{compress}").write_bytes(packed)
    expect = list(iter_tar_samples(str(tmp_path / "plain.tar"), pytest.fail))
    got = list(iter_tar_samples(str(tmp_path / f"s.tar.{compress}"), pytest.fail))
    strip = lambda samples: [{k: v for k, v in s.items() if k != "__url__"} for s in samples]  # noqa: E731
    assert strip(got) == strip(expect) and len(got) == 5
    # resume inside a compressed shard: read up to the offset, then the same samples
    assert strip(iter_tar_samples(str(tmp_path / f"s.tar.{compress}"), pytest.fail,
                                  start=expect[2]["__offset__"])) == strip(expect[2:])

    (tmp_path / f"cut.tar.{compress}").write_bytes(packed[:len(packed) * 2 // 3])
    skipped = Counter()
    cut = list(iter_tar_samples(str(tmp_path / f"cut.tar.{compress}"), lambda r: skipped.update((r,))))
    assert len(cut) < 5 and strip(cut) == strip(expect[:len(cut)])
    if compress == "gz":  # deflate streams: what precedes the cut is used
        assert len(cut) >= 1 and skipped["truncated_shard"] == 1
    else:  # bzip2 / xz decode whole blocks: this small shard is one, unreadable once cut
        assert skipped["truncated_shard"] + skipped["unreadable_shard"] == 1


# ------------------------------------------------------------------------------- junk members
JUNK_MEMBERS, JUNK_MIB = 32, 63  # the shard: 32 x 63 MiB junk .jpg members (under the 64 MiB cap)

WORKER_RSS_BOUND = SHUFFLE_BUFFER_BYTES + 3 * MAX_MEMBER_BYTES
"""docs/data.md, per-worker bound for encoded data: the shuffle buffer's bytes plus one sample
over it, plus one sample being read (at most two copies of it while its chunks are joined)."""

_CHILD = textwrap.dedent("""
    import json, sys
    def status(field):
        return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) << 10
    from rils_scale.data import Tokenizer, build_train_loader
    tok = Tokenizer.load(sys.argv[2])
    kw = dict(image_size=8, context_length=8, batch_size=4, dp_rank=0, dp_size=1, num_workers=0, seed=0,
              shuffle_buffer=1000)  # the trainer's default buffer
    warm = build_train_loader(sys.argv[3], tok, **kw)
    next(warm); warm.close()  # code pages, PIL, the tokenizer, torch's resize
    base = status("VmRSS:")
    loader = build_train_loader(sys.argv[1], tok, **kw)
    batches = [next(loader) for _ in range(2)]
    skipped = dict(loader.skipped_total)
    print(json.dumps({"grew": status("VmHWM:") - base, "skipped": skipped,
                      "keys": sorted(k for b in batches for k in b["keys"])}))
""")


def test_junk_members_keep_a_worker_within_the_documented_bound(tmp_path, tokenizer_file):
    """32 x 63 MiB zero-filled .jpg members (~2 MB as .tar.gz) ahead of 8 good samples: the
    stream's peak RSS grows by less than WORKER_RSS_BOUND (it held all 2 GiB before)."""
    junk = tmp_path / "junk.tar.gz"
    writer = GzipTarWriter(junk)
    for i in range(JUNK_MEMBERS):
        writer.add(f"j{i:02d}.jpg", zero_mib=JUNK_MIB)
        writer.add(f"j{i:02d}.txt", b"junk")
    for i in range(8):
        _sample(writer, f"g{i:02d}")
    writer.close()
    assert junk.stat().st_size < 3 * MIB
    warm = tmp_path / "warm.tar.gz"
    writer = GzipTarWriter(warm)
    for i in range(4):
        _sample(writer, f"w{i:02d}")
    writer.close()
    out = subprocess.run([sys.executable, "-c", _CHILD, str(junk), str(tokenizer_file), str(warm)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["keys"] == [f"g{i:02d}" for i in range(8)]
    assert 0 < result["skipped"].get("corrupt_image", 0) <= JUNK_MEMBERS
    assert result["grew"] < WORKER_RSS_BOUND, (result["grew"] / MIB, WORKER_RSS_BOUND / MIB)
