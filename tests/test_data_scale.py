"""Issue 13: O(1) exact resume, re-deal on other layouts, img2dataset output, pipe: braces,
bounded memory on hostile shards, and a raising rank that ends the job."""
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from rils_scale.data import ShardWriter, Tokenizer, build_eval_loader, build_train_loader, expand_urls, train_tokenizer
from rils_scale.data import transforms as transforms_module
from rils_scale.data.dealing import deal_indices, read_sample_counts
from rils_scale.data.decode import MAX_CAPTION_BYTES, decode_caption
from rils_scale.data.loader_state import read_loader_states, write_loader_state
from rils_scale.data.shards import add_member, encode_image
from rils_scale.data.sources import iter_tar_samples

IMAGE_SIZE, CONTEXT = 16, 12
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    words = "a photo of the number one two three red green blue cat dog sample caption".split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    return Tokenizer.load(train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "tok", vocab_size=64))


def _image(i, size=12):
    return Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def _shards(out_dir, num_shards, per_shard):
    with ShardWriter(out_dir, per_shard) as writer:
        for i in range(num_shards * per_shard):
            writer.write(_image(i), f"sample caption {i % 3}", {"label": i % 3}, ext="jpg")
    return writer.shard_paths


def _kwargs(**overrides):
    kw = dict(image_size=IMAGE_SIZE, context_length=CONTEXT, batch_size=3, dp_rank=0, dp_size=1, num_workers=0,
              seed=7, shuffle_buffer=6)
    kw.update(overrides)
    return kw


def _saved(loader, tmp_path, name):
    """Round-trip a loader's state through the checkpoint file format."""
    tag = tmp_path / name
    write_loader_state(str(tag), loader.state_dict())
    return read_loader_states(str(tag), loader.spec.dp_rank)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_resume_is_exact_and_does_not_replay(tmp_path, tokenizer, monkeypatch, num_workers):
    paths = _shards(tmp_path, num_shards=4, per_shard=6)  # 24 samples = 8 batches per epoch
    full = build_train_loader(paths, tokenizer, **_kwargs(num_workers=num_workers))
    reference, states = [], {}
    for step in range(1, 129):
        reference.append(next(full))
        if step in (10, 120):
            states[step] = _saved(full, tmp_path, f"step{step}")
    full.close()
    assert {b["data_epoch"] for b in reference} == set(range(16))
    calls = Counter()
    original = transforms_module.CropResize.__call__
    monkeypatch.setattr(transforms_module.CropResize, "__call__",
                        lambda self, *a, **k: (calls.update(("n",)), original(self, *a, **k))[1])
    first_batch_s = {}
    for step, saved in states.items():
        resumed = build_train_loader(paths, tokenizer, start_batch=step, resume=saved,
                                     **_kwargs(num_workers=num_workers))
        assert resumed.resume_mode == "exact"
        calls.clear()
        start = time.perf_counter()
        for i, expected in enumerate(reference[step:step + 8]):
            got = next(resumed)
            if i == 0:
                first_batch_s[step] = time.perf_counter() - start
                if num_workers == 0:  # no replay: only the first batch's samples were transformed
                    assert calls["n"] == 3
            assert got["keys"] == expected["keys"] and got["data_epoch"] == expected["data_epoch"]
            assert torch.equal(got["images"], expected["images"])
            assert torch.equal(got["token_ids"], expected["token_ids"])
        resumed.close()
    # O(1): resuming 12x later is not much slower (generous: a noisy shared machine)
    assert first_batch_s[120] < 5 * first_batch_s[10] + 2.0


def _epoch_keys(batches, epoch):
    return [k for b in batches if b["data_epoch"] == epoch for k in b["keys"]]


def test_redeal_on_other_dp_size_covers_the_epoch_without_duplicates(tmp_path, tokenizer):
    paths = _shards(tmp_path, num_shards=6, per_shard=5)
    all_keys = {k for p in paths for s in iter_tar_samples(p, lambda r: None) for k in [s["__key__"]]}
    kw = _kwargs(batch_size=1, dp_size=2)
    before, saved = [], {}
    for rank in range(2):
        loader = build_train_loader(paths, tokenizer, **{**kw, "dp_rank": rank})
        before += [next(loader) for _ in range(7)]
        write_loader_state(str(tmp_path / "ck"), loader.state_dict())
    seen = _epoch_keys(before, 0)
    after = []
    for rank in range(3):
        loader = build_train_loader(paths, tokenizer, start_batch=7,
                                    resume=read_loader_states(str(tmp_path / "ck"), rank),
                                    **{**kw, "dp_size": 3, "dp_rank": rank})
        assert loader.resume_mode == "redeal"
        batches = [next(loader) for _ in range(12)]
        # each rank finishes epoch 0's remaining work before any epoch-1 sample
        epochs = [b["data_epoch"] for b in batches]
        assert epochs == sorted(epochs)
        after += batches
    rest = _epoch_keys(after, 0)
    assert len(seen) + len(rest) == len(set(seen) | set(rest)) == len(all_keys)  # no duplicate, full coverage


def test_redeal_on_other_worker_count(tmp_path, tokenizer):
    paths = _shards(tmp_path, num_shards=4, per_shard=4)
    loader = build_train_loader(paths, tokenizer, **_kwargs(batch_size=1, num_workers=2))
    before = [next(loader) for _ in range(5)]
    saved = _saved(loader, tmp_path, "ck")
    loader.close()
    resumed = build_train_loader(paths, tokenizer, start_batch=5, resume=saved, **_kwargs(batch_size=1))
    assert resumed.resume_mode == "redeal"
    after = [next(resumed) for _ in range(16)]
    keys = _epoch_keys(before, 0) + _epoch_keys(after, 0)
    assert len(keys) == len(set(keys)) == 16


def _img2dataset_folder(tmp_path, counts):
    """Shards as img2dataset 1.47 writes them: NNNNN.tar + NNNNN_stats.json (+ parquet, unused)."""
    paths, index = [], 0
    for shard, count in enumerate(counts):
        path = tmp_path / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as archive:
            for _ in range(count):
                key = f"{shard:05d}{index:04d}"
                add_member(archive, f"{key}.jpg", encode_image(_image(index), "jpg"))
                add_member(archive, f"{key}.txt", b"a photo of a cat")
                add_member(archive, f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())
                index += 1
        (tmp_path / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 10, "successes": count}))
        (tmp_path / f"{shard:05d}.parquet").write_bytes(b"PAR1")
        paths.append(str(path))
    return paths


def test_img2dataset_folder_with_an_empty_shard_feeds_two_workers(tmp_path, tokenizer):
    paths = _img2dataset_folder(tmp_path, [3, 4, 0, 1, 4])
    assert read_sample_counts(paths) == (3, 4, 0, 1, 4)
    loader = build_train_loader(str(tmp_path), tokenizer, **_kwargs(batch_size=2, num_workers=2, shuffle_buffer=0))
    batches = [next(loader) for _ in range(12)]  # 12 samples per epoch; two epochs
    loader.close()
    skips = sum((Counter(b["skipped"]) for b in batches), Counter())
    assert skips["empty_shard"] >= 1 and set(skips) == {"empty_shard"}
    assert len({k for b in batches for k in b["keys"]}) == 12
    # the same counts dealt to 4 streams: each gets samples (greedy, largest first)
    loads = [sum([3, 4, 0, 1, 4][i] for i in d) for d in deal_indices([2, 0, 4, 1, 3], [3, 4, 0, 1, 4], 2, 2)]
    assert min(loads) > 0
    with pytest.raises(ValueError, match="only 4 of 5 shard"):
        build_train_loader(str(tmp_path), tokenizer, **_kwargs(num_workers=5))


def test_no_valid_sample_is_decided_over_the_whole_shard_list(tmp_path, tokenizer):
    (tmp_path / "00000.tar").write_bytes(b"")
    with tarfile.open(tmp_path / "00001.tar", "w"):
        pass
    loader = build_train_loader(str(tmp_path), tokenizer, **_kwargs())
    with pytest.raises(RuntimeError, match="no valid sample in any of the 2 shard"):
        next(loader)


def test_pipe_and_file_urls_are_brace_expanded(tmp_path):
    paths = _shards(tmp_path, num_shards=3, per_shard=2)
    pattern = f"pipe:cat {tmp_path}/{{00000..00002}}.tar"
    assert expand_urls(pattern) == [f"pipe:cat {p}" for p in paths]
    assert expand_urls(f"file://{tmp_path}/{{00000..00001}}.tar") == [f"file://{p}" for p in paths[:2]]
    assert expand_urls(f"file://{tmp_path}") == paths
    keys = [k for b in build_eval_loader(pattern, None, IMAGE_SIZE, batch_size=4) for k in b["keys"]]
    assert keys == [f"{i:09d}" for i in range(6)]


def _png_header_only(width, height):
    """A PNG whose header claims width x height (its data is one row): enough for a header check."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b""))


def _big_member(archive, name, size):
    """A member of ``size`` zero bytes written as a sparse hole (fast; no RAM)."""
    info = tarfile.TarInfo(name)
    info.size = size
    archive.fileobj.write(info.tobuf(archive.format, archive.encoding, archive.errors))
    padded = -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    archive.fileobj.seek(padded, os.SEEK_CUR)
    archive.offset += tarfile.BLOCKSIZE + padded
    archive.members.append(info)


PEAK_RSS_CHILD = textwrap.dedent("""
    import json, sys
    def peak_mb():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
    from collections import Counter
    from rils_scale.data.decode import BadSample
    from rils_scale.data.sources import iter_tar_samples
    from rils_scale.data.transforms import CropResize
    base = peak_mb()
    skipped, kept = Counter(), 0
    crop = CropResize(32)
    for sample in iter_tar_samples(sys.argv[1], lambda r: skipped.update((r,)), max_member_bytes=4 << 20):
        if "__skip__" in sample:
            skipped[sample["__skip__"]] += 1
            continue
        for ext in ("png", "jpg"):
            if ext in sample:
                try:
                    crop(sample[ext]); kept += 1
                except BadSample as bad:
                    skipped[bad.reason] += 1
    print(json.dumps({"grew_mb": peak_mb() - base, "skipped": skipped, "kept": kept}))
""")


def _peak_rss(shard):
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, str(shard)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


RSS_BOUND_MB = 64
"""Peak RSS growth of a stream reading the crafted shards below (stated bound, docs/data.md)."""


def test_hostile_members_are_skipped_unread_or_capped_with_bounded_memory(tmp_path):
    shard = tmp_path / "hostile.tar"
    sixteen = (np.arange(1500 * 1500, dtype=np.uint32) * 29 % 65536).astype(np.uint16).reshape(1500, 1500)
    with tarfile.open(shard, "w") as archive:
        _big_member(archive, "a.npy", 128 << 20)        # unused extension: never read
        add_member(archive, "a.txt", b"caption")
        _big_member(archive, "b.txt", 5 << 20)           # over the member cap (4 MiB here): dropped
        add_member(archive, "b.jpg", encode_image(_image(1), "jpg"))
        add_member(archive, "c.png", _png_header_only(6000, 6000))  # 36 Mpx > cap, refused from the header
        add_member(archive, "d.png", encode_image(Image.fromarray(sixteen), "png"))    # 16-bit, 4 Mpx
        link = tarfile.TarInfo("e.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    result = _peak_rss(shard)
    assert result["skipped"] == {"oversized_member": 1, "oversized_image": 1, "link_member": 1}
    assert result["kept"] == 1  # the 16-bit PNG, decoded in integer types
    assert result["grew_mb"] < RSS_BOUND_MB, result


def test_big_images_are_transformed_at_once_so_a_stream_holds_no_full_size_image(tmp_path, tokenizer):
    Image.new("RGB", (600, 600), (1, 2, 3)).save(tmp_path / "warm.png")
    with ShardWriter(tmp_path, 100) as writer:
        for i in range(12):  # 12 x 3.24 Mpx single-colour PNGs (a few KB each); decoded RGB 9.7 MB each
            writer.write(Image.new("RGB", (1800, 1800), (i * 20, 0, 0)), f"red {i}", ext="png")
    child = textwrap.dedent(f"""
        import json
        def peak_mb():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
        from rils_scale.data import Tokenizer, build_train_loader
        tok = Tokenizer.load({str(tokenizer_path(tokenizer, tmp_path))!r})
        loader = build_train_loader({str(tmp_path)!r}, tok, image_size=32, context_length=12, batch_size=12,
                                    dp_rank=0, dp_size=1, num_workers=0, seed=0, shuffle_buffer=0)
        from rils_scale.data.transforms import CropResize
        CropResize(32)({str(tmp_path / "warm.png")!r} and open({str(tmp_path / "warm.png")!r}, "rb").read())
        base = peak_mb()  # after torch's first resize (its code pages and buffers)
        batch = next(loader)
        print(json.dumps({{"grew_mb": peak_mb() - base, "n": len(batch["keys"])}}))
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    # holding the batch's full-size decodes (as before) would be 12 x 9.7 = 117 MB
    assert result["n"] == 12 and result["grew_mb"] < 4 * 9.7 + 16, result


def tokenizer_path(tokenizer, tmp_path):
    path = tmp_path / "tok.model"
    path.write_bytes(tokenizer.serialized())
    return path


def test_long_caption_truncated_before_tokenizing(tokenizer):
    caption = decode_caption({"txt": "é".encode() * (8 << 20)})  # 16 MB; cut inside a 2-byte character
    assert len(caption.encode()) <= MAX_CAPTION_BYTES and set(caption) == {"é"}
    start = time.perf_counter()
    tokenizer(["word " * (4 << 20)], CONTEXT)  # 20 MB string
    assert time.perf_counter() - start < 30


def test_deep_json_and_unreadable_shards_are_counted(tmp_path):
    good = tmp_path / "00000.tar"
    with tarfile.open(good, "w") as archive:
        add_member(archive, "a.jpg", encode_image(_image(0), "jpg"))
        add_member(archive, "a.txt", b"ok")
        add_member(archive, "a.json", b"[" * 200_000 + b"]" * 200_000)
        add_member(archive, "b.jpg", encode_image(_image(1), "jpg"))
        add_member(archive, "b.txt", b"ok")
    (tmp_path / "00001.tar").write_bytes(b"")
    (tmp_path / "00002.tar").write_bytes(b"not a tar at all" * 100)
    batches = list(build_eval_loader(str(tmp_path), None, IMAGE_SIZE, batch_size=2))
    skips = sum((Counter(b["skipped"]) for b in batches), Counter())
    assert skips == {"bad_json": 1, "unreadable_shard": 2}
    assert [k for b in batches for k in b["keys"]] == ["b"]


RAISING_RANK = textwrap.dedent("""
    import os, sys, time
    import torch, torch.distributed as dist
    import deepspeed
    from rils_scale.data import Tokenizer, build_train_loader
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    loader = build_train_loader(sys.argv[-2], Tokenizer.load(sys.argv[-1]), image_size=16, context_length=12,
                                batch_size=2, dp_rank=rank, dp_size=2, num_workers=1, seed=0)
    try:
        next(loader)
        if rank == 1:
            raise ValueError("rank 1 broke on purpose")
        dist.all_reduce(torch.ones(1))  # rank 0 waits here for a peer that is gone
    finally:
        loader.close()
""")


def test_a_raising_rank_ends_the_job_with_its_error(tmp_path, tokenizer):
    shards = tmp_path / "shards"
    _shards(shards, num_shards=2, per_shard=2)
    script = tmp_path / "job.py"
    script.write_text(RAISING_RANK)
    start = time.perf_counter()
    out = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", "29613", str(script), str(shards),
                          str(tokenizer_path(tokenizer, tmp_path))], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert out.returncode != 0
    assert "rank 1 broke on purpose" in out.stdout + out.stderr
    assert time.perf_counter() - start < 180


def test_make_shards_reads_file_urls_and_explains_missing_pyarrow(tmp_path):
    image = tmp_path / "cat.jpg"
    _image(0, 32).save(image)
    listing = tmp_path / "listing.csv"
    listing.write_text(f"url,caption\nfile://{image},a cat\n")
    run = lambda *args: subprocess.run([sys.executable, os.path.join(REPO, "launchers", "make_shards.py"), *args],
                                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
    out = run("--input", str(listing), "--image-column", "url", "--output", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    assert [s["__key__"] for s in iter_tar_samples(str(tmp_path / "out" / "00000.tar"), print)] == ["000000000"]
    (tmp_path / "l.parquet").write_bytes(b"PAR1")
    out = run("--input", str(tmp_path / "l.parquet"), "--output", str(tmp_path / "out2"))
    try:
        import pyarrow  # noqa: F401
        assert out.returncode != 0 and "parquet" in out.stderr
    except ImportError:
        assert out.returncode == 2 and "pyarrow" in out.stderr


def test_prepare_images_matches_the_float_transform_normalisation():
    from torchvision.transforms import functional as TF
    from rils_scale.data.transforms import CLIP_MEAN, CLIP_STD, prepare_images
    pil = _image(3, 8)
    expected = TF.normalize(TF.to_tensor(pil), CLIP_MEAN, CLIP_STD)
    got = prepare_images(torch.from_numpy(np.asarray(pil).copy())[None], "cpu", torch.float32)[0]
    assert got.shape == (3, 8, 8) and torch.allclose(got, expected, atol=1e-6)


def test_make_shards_reads_an_img2dataset_parquet_listing(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.jpg")
        _image(i, 32).save(paths[-1])
    table = pa.table({"url": [f"file://{p}" for p in paths] + [str(tmp_path / "missing.jpg")],
                      "caption": ["a red cat", "a blue dog", "a green bird", "gone"]})
    pq.write_table(table, tmp_path / "listing.parquet")
    out = subprocess.run([sys.executable, os.path.join(REPO, "launchers", "make_shards.py"), "--input",
                          str(tmp_path / "listing.parquet"), "--image-column", "url", "--output", str(tmp_path / "out")],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr
    samples = list(iter_tar_samples(str(tmp_path / "out" / "00000.tar"), print))
    assert [s["txt"].decode() for s in samples] == ["a red cat", "a blue dog", "a green bird"]
    assert "skipped 1: {'missing_file': 1}" in out.stdout  # the missing image is skipped and counted
