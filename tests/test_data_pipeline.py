"""Training / evaluation loaders: bad-sample policy, DP splitting, epochs, exact resume."""
import os
import pickle
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from rils_scale.data import (ShardWriter, Tokenizer, build_eval_loader, build_train_loader, decode_image,
                             expand_urls, to_rgb, train_tokenizer)
from rils_scale.data.pipeline import StreamSpec, batches_before, shards_for_stream, stream_of_worker
from rils_scale.data.shards import add_member, encode_image

IMAGE_SIZE = 16
CONTEXT = 12


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    words = "a photo of the number one two three red green blue cat dog sample caption".split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    path = train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "tok", vocab_size=64)
    return Tokenizer.load(path)


def _png(image):
    return encode_image(image, "png")


def _jpg(image):
    return encode_image(image, "jpg")


def _colour_image(seed, size=12):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def _write_synthetic_shards(out_dir, num_shards, per_shard):
    """num_shards shards of per_shard valid samples; keys are unique and ordered."""
    with ShardWriter(out_dir, per_shard) as writer:
        for i in range(num_shards * per_shard):
            writer.write(_colour_image(i), f"sample caption {i % 3}", {"label": i % 3}, ext="png")
    return writer.shard_paths


class _PickleTrap:
    """Unpickling this creates ``path`` — the test asserts the directory never appears."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _tar(path, members):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            add_member(archive, name, data)


@pytest.fixture
def bad_shards(tmp_path):
    """Two shards covering every bad-sample case; returns (paths, expected keys, expected counts, trap dir)."""
    trap = str(tmp_path / "UNPICKLED")
    good = _jpg(_colour_image(0))
    truncated_png = _png(_colour_image(1))
    truncated_png = truncated_png[: len(truncated_png) // 2]
    palette = Image.new("P", (10, 10))
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.paste(1, (0, 0, 10, 10))
    rgba = Image.new("RGBA", (10, 10), (0, 0, 255, 0))
    sixteen_bit = Image.fromarray(np.full((10, 10), 65535, dtype=np.uint16))
    shard_a = [
        ("s00.jpg", good), ("s00.txt", b"a good sample"),
        ("s01.jpg", b"this is not a jpeg"), ("s01.txt", b"corrupt image"),
        ("s02.png", truncated_png), ("s02.txt", b"truncated png"),
        ("s03.jpg", good), ("s03.txt", b"  \n\t "),
        ("s04.jpg", good), ("s04.txt", b"\xff\xfe bad utf8"),
        ("s05.jpg", good), ("s05.txt", b"sample with pickles"),
        ("s05.pyd", pickle.dumps(_PickleTrap(trap))), ("s05.pickle", pickle.dumps(_PickleTrap(trap))),
        ("s06.txt", b"no image here"), ("s06.pickle", pickle.dumps(_PickleTrap(trap))),
        ("s12.jpg", good),  # no caption
        ("s07.png", _png(Image.new("L", (10, 10), 77))), ("s07.txt", b"grayscale"),
        ("s08.png", _png(palette)), ("s08.txt", b"palette"),
        ("s09.png", _png(rgba)), ("s09.txt", b"rgba"),
        ("s10.jpg", _jpg(Image.new("CMYK", (10, 10), (0, 255, 255, 0)))), ("s10.txt", b"cmyk"),
        ("s11.png", _png(sixteen_bit)), ("s11.txt", b"sixteen bit"),
    ]
    path_a, path_b = str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")
    _tar(path_a, shard_a)
    _tar(path_b, [("s13.jpg", good), ("s13.txt", b"ok 13"), ("s14.jpg", good), ("s14.txt", b"ok 14"),
                  ("s15.jpg", _jpg(_colour_image(5, 64))), ("s15.txt", b"cut off")])
    data = open(path_b, "rb").read()
    cut = data.index(b"cut off") - 1024 - 300  # inside s15.jpg's data (members precede their payload)
    with open(path_b, "wb") as f:
        f.write(data[:cut])
    expected_keys = ["s00", "s05", "s07", "s08", "s09", "s10", "s11", "s13", "s14"]
    expected_counts = {"corrupt_image": 2, "empty_caption": 1, "bad_utf8": 1, "missing_image": 1,
                       "missing_caption": 1, "truncated_shard": 1, "truncated_sample": 1}
    return [path_a, path_b], expected_keys, expected_counts, trap


def test_unusual_modes_become_rgb():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white background
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)  # not clipped garbage
    cmyk = decode_image(_jpg(Image.new("CMYK", (8, 8), (0, 255, 255, 0))))
    r, g, b = cmyk.getpixel((4, 4))
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60
    assert decode_image(_png(Image.new("L", (4, 4), 77))).getpixel((0, 0)) == (77, 77, 77)


def test_eval_loader_skips_and_counts_every_bad_case(bad_shards, tokenizer, monkeypatch):
    paths, expected_keys, expected_counts, trap = bad_shards
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    batches = list(build_eval_loader(paths, tokenizer, IMAGE_SIZE, batch_size=4))
    assert [k for b in batches for k in b["keys"]] == expected_keys
    assert sum((Counter(b["skipped"]) for b in batches), Counter()) == Counter(expected_counts)
    assert all(b["images"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE) for b in batches)
    assert not os.path.exists(trap)


def test_train_loader_skips_and_counts_every_bad_case(bad_shards, tokenizer):
    paths, expected_keys, expected_counts, trap = bad_shards
    # Pick a seed whose epoch-0 shard order is [truncated, other] so every epoch-0 skip event
    # happens before epoch 0's last valid sample (shard A ends with a valid sample).
    seed = next(s for s in range(100) if shards_for_stream(_spec(paths, seed=s), 0, 0) == [paths[1], paths[0]])
    loader = build_train_loader(paths, tokenizer, image_size=IMAGE_SIZE, context_length=CONTEXT, batch_size=1,
                                dp_rank=0, dp_size=1, num_workers=0, seed=seed, shuffle_buffer=0)
    epoch0 = []
    for batch in loader:
        if batch["data_epoch"] != 0:
            break
        epoch0.append(batch)
    assert [b["keys"][0] for b in epoch0] == ["s13", "s14", "s00", "s05", "s07", "s08", "s09", "s10", "s11"]
    assert sorted(b["keys"][0] for b in epoch0) == sorted(expected_keys)
    assert sum((Counter(b["skipped"]) for b in epoch0), Counter()) == Counter(expected_counts)
    batch = epoch0[0]
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch["token_ids"].dtype == torch.int64 and batch["token_ids"].shape == (1, CONTEXT)
    assert not os.path.exists(trap)
    assert loader.last_wait_s >= 0 and loader.batches_consumed == len(epoch0) + 1


def _spec(urls, **overrides):
    fields = dict(urls=tuple(urls), tokenizer=None, image_size=IMAGE_SIZE, context_length=CONTEXT, batch_size=2,
                  dp_rank=0, dp_size=1, num_workers=0, seed=0, shuffle_buffer=0, resampled=False, start_batch=0,
                  epoch=0)
    fields.update(overrides)
    return StreamSpec(**fields)


def test_shards_split_disjointly_over_dp_ranks_and_workers(tmp_path):
    urls = [f"/data/{i:05d}.tar" for i in range(10)]
    for epoch in (0, 1):
        seen = [shards_for_stream(_spec(urls, dp_rank=r, dp_size=2, num_workers=2), epoch, w)
                for r in range(2) for w in range(2)]
        flat = [u for s in seen for u in s]
        assert sorted(flat) == urls and all(seen)  # each shard exactly once, no stream empty


def test_dp_ranks_read_disjoint_samples(tmp_path, tokenizer):
    paths = _write_synthetic_shards(tmp_path, num_shards=4, per_shard=3)
    keys_by_rank = []
    for rank in range(2):
        loader = build_train_loader(paths, tokenizer, image_size=IMAGE_SIZE, context_length=CONTEXT, batch_size=2,
                                    dp_rank=rank, dp_size=2, num_workers=0, seed=3, shuffle_buffer=4)
        keys_by_rank.append({k for _ in range(3) for k in next(loader)["keys"]})  # 6 samples = one epoch
    assert not keys_by_rank[0] & keys_by_rank[1]
    assert len(keys_by_rank[0] | keys_by_rank[1]) == 12


def test_too_few_shards_is_a_clear_error(tmp_path, tokenizer):
    paths = _write_synthetic_shards(tmp_path, num_shards=3, per_shard=2)
    kwargs = dict(image_size=IMAGE_SIZE, context_length=CONTEXT, batch_size=2, dp_rank=0, dp_size=2,
                  num_workers=2, seed=0)
    with pytest.raises(ValueError, match=r"3 shard\(s\).*4 streams.*--resampled"):
        build_train_loader(paths, tokenizer, **kwargs)
    with pytest.raises(FileNotFoundError, match="99999.tar"):
        build_train_loader([*paths, str(tmp_path / "99999.tar")], tokenizer, **{**kwargs, "dp_size": 1,
                                                                                "num_workers": 0})
    resampled = build_train_loader(paths, tokenizer, resampled=True, **{**kwargs, "num_workers": 0})
    assert len(next(resampled)["keys"]) == 2


def test_resampled_shards_depend_on_seed_epoch_and_rank():
    urls = [f"/data/{i:05d}.tar" for i in range(50)]
    draw = lambda **kw: shards_for_stream(_spec(urls, resampled=True, dp_size=2, **kw), kw.pop("epoch", 0), 0)
    assert draw(dp_rank=0) == draw(dp_rank=0)
    assert draw(dp_rank=0) != draw(dp_rank=1)
    assert shards_for_stream(_spec(urls, resampled=True, dp_size=2), 0, 0) != \
        shards_for_stream(_spec(urls, resampled=True, dp_size=2), 1, 0)


def test_epoch_advances_and_changes_the_order(tmp_path, tokenizer):
    paths = _write_synthetic_shards(tmp_path, num_shards=3, per_shard=4)
    loader = build_train_loader(paths, tokenizer, image_size=IMAGE_SIZE, context_length=CONTEXT, batch_size=4,
                                dp_rank=0, dp_size=1, num_workers=0, seed=0, shuffle_buffer=6)
    batches = [next(loader) for _ in range(6)]
    assert [b["data_epoch"] for b in batches] == [0, 0, 0, 1, 1, 1]
    order0 = [k for b in batches[:3] for k in b["keys"]]
    order1 = [k for b in batches[3:] for k in b["keys"]]
    assert sorted(order0) == sorted(order1) and len(set(order0)) == 12
    assert order0 != order1
    # the same sample is augmented differently in another epoch (seed mixes the epoch)
    key = order0[0]
    img0 = batches[0]["images"][0]
    img1 = next(b["images"][b["keys"].index(key)] for b in batches[3:] if key in b["keys"])
    assert not torch.equal(img0, img1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_start_batch_resume_reproduces_batches_exactly(tmp_path, tokenizer, num_workers):
    paths = _write_synthetic_shards(tmp_path, num_shards=4, per_shard=5)
    kwargs = dict(image_size=IMAGE_SIZE, context_length=CONTEXT, batch_size=3, dp_rank=0, dp_size=1,
                  num_workers=num_workers, seed=11, shuffle_buffer=4)
    full = build_train_loader(paths, tokenizer, **kwargs)
    reference = [next(full) for _ in range(12)]  # crosses epoch boundaries (20 samples per epoch)
    full.close()
    assert {b["data_epoch"] for b in reference} == {0, 1}
    for start in (5, 7):
        resumed = build_train_loader(paths, tokenizer, start_batch=start, **kwargs)
        for expected in reference[start:]:
            got = next(resumed)
            assert got["keys"] == expected["keys"] and got["data_epoch"] == expected["data_epoch"]
            assert torch.equal(got["images"], expected["images"])
            assert torch.equal(got["token_ids"], expected["token_ids"])
        assert resumed.batches_consumed == 12
        resumed.close()


def test_resume_worker_rotation():
    spec = _spec(["a"], num_workers=3, start_batch=7)
    # global batch 7 + j comes from stream (7 + j) % 3; DataLoader worker j % 3 serves it
    assert [stream_of_worker(w, spec) for w in range(3)] == [1, 2, 0]
    assert [batches_before(7, s, 3) for s in range(3)] == [3, 2, 2]


def test_eval_loader_order_and_metadata(tmp_path, tokenizer):
    paths = _write_synthetic_shards(tmp_path, num_shards=2, per_shard=3)
    batches = list(build_eval_loader(str(tmp_path), tokenizer, IMAGE_SIZE, batch_size=4, context_length=CONTEXT))
    assert [len(b["keys"]) for b in batches] == [4, 2]
    assert [k for b in batches for k in b["keys"]] == [f"{i:09d}" for i in range(6)]
    assert [m["label"] for b in batches for m in b["json"]] == [i % 3 for i in range(6)]
    assert batches[0]["token_ids"].shape == (4, CONTEXT)


def test_url_forms(tmp_path):
    paths = _write_synthetic_shards(tmp_path, num_shards=3, per_shard=1)
    assert expand_urls(str(tmp_path)) == paths
    assert expand_urls(str(tmp_path / "{00000..00002}.tar")) == paths
    assert expand_urls([paths[0], paths[2]]) == [paths[0], paths[2]]
    assert expand_urls(f"pipe:cat {paths[0]}") == [f"pipe:cat {paths[0]}"]
    samples = list(build_eval_loader(f"pipe:cat {paths[1]}", None, IMAGE_SIZE, batch_size=2))
    assert samples[0]["keys"] == ["000000001"]


def test_pickle_trap_would_fire(tmp_path):
    """Guards the guard: unpickling a trap member really would leave a trace."""
    trap = str(tmp_path / "FIRED")
    pickle.loads(pickle.dumps(_PickleTrap(trap)))
    assert os.path.isdir(trap)
