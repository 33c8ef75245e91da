"""Shard writer layout, the built-in digits dataset and the make_shards launcher."""
import io
import json
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rils_scale.data import ShardWriter, class_names, iter_tar_samples, write_builtin_dataset, zero_shot_templates
from rils_scale.data.builtin import HELDOUT_EVERY, load_digit_images

REPO = Path(__file__).resolve().parents[1]
MAKE_SHARDS = str(REPO / "launchers" / "make_shards.py")


def _samples(path):
    return list(iter_tar_samples(str(path), lambda reason: pytest.fail(f"unexpected skip {reason}")))


def test_shard_writer_layout(tmp_path):
    image = Image.new("RGB", (6, 6), (10, 200, 30))
    with ShardWriter(tmp_path, shard_size=3) as writer:
        keys = [writer.write(image, f"caption {i}", {"i": i} if i % 2 == 0 else None, ext="png") for i in range(7)]
    assert keys == [f"{i:09d}" for i in range(7)]
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(tmp_path / "00000.tar") as archive:
        assert archive.getnames() == ["000000000.png", "000000000.txt", "000000000.json",
                                      "000000001.png", "000000001.txt",
                                      "000000002.png", "000000002.txt", "000000002.json"]
    stats = json.loads((tmp_path / "_stats.json").read_text())
    assert stats["count"] == 7 and [s["count"] for s in stats["shards"]] == [3, 3, 1]
    assert json.loads((tmp_path / "00002_stats.json").read_text())["count"] == 1
    sample = _samples(tmp_path / "00002.tar")[0]
    assert sample["txt"].decode() == "caption 6" and json.loads(sample["json"]) == {"i": 6}
    assert Image.open(io.BytesIO(sample["png"])).getpixel((0, 0)) == (10, 200, 30)
    with pytest.raises(FileExistsError):
        ShardWriter(tmp_path, 3)


def test_shards_are_reproducible(tmp_path):
    for name in ("a", "b"):
        with ShardWriter(tmp_path / name, 2) as writer:
            for i in range(3):
                writer.write(Image.new("RGB", (4, 4), (i, i, i)), f"c{i}", ext="jpg")
    assert (tmp_path / "a/00001.tar").read_bytes() == (tmp_path / "b/00001.tar").read_bytes()


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    return write_builtin_dataset(tmp_path_factory.mktemp("builtin"), image_size=24, shard_size=400)


def _read_split(info):
    return [s for path in info["shards"] for s in _samples(path)]


def test_builtin_split_is_disjoint_and_labelled(builtin):
    _, labels = load_digit_images()
    train, heldout = _read_split(builtin["train"]), _read_split(builtin["heldout"])
    assert (len(train), len(heldout)) == (builtin["train"]["count"], builtin["heldout"]["count"]) == (1437, 360)
    assert [Path(p).name for p in builtin["train"]["shards"]] == [f"{i:05d}.tar" for i in range(4)]
    train_meta = [json.loads(s["json"]) for s in train]
    heldout_meta = [json.loads(s["json"]) for s in heldout]
    train_sources = {m["source_index"] for m in train_meta}
    heldout_sources = {m["source_index"] for m in heldout_meta}
    assert not train_sources & heldout_sources
    assert all(i % HELDOUT_EVERY == 0 for i in heldout_sources) and len(heldout_sources) == 360
    names = class_names()
    for sample, meta in zip(train + heldout, train_meta + heldout_meta):
        assert meta["label"] == labels[meta["source_index"]]
        assert meta["class_name"] == names[meta["label"]]
        words = set(re.findall(r"[a-z0-9]+", sample["txt"].decode()))
        assert {names[meta["label"]], str(meta["label"])} & words  # names its own digit ...
        assert not (set(names) | set("0123456789")) - {names[meta["label"]], str(meta["label"])} & words  # ... only
    assert Counter(m["label"] for m in heldout_meta).keys() == set(range(10))


def test_builtin_images_and_captions_vary(builtin):
    train = _read_split(builtin["train"])[:300]
    captions = [s["txt"].decode() for s in train]
    assert len(set(captions)) > 100
    images = [np.asarray(Image.open(io.BytesIO(s["png"]))) for s in train[:50]]
    assert all(im.shape == (24, 24, 3) for im in images)
    assert len({im[0, 0].tobytes() for im in images}) > 5  # background colours vary
    assert class_names()[7] == "seven" and len(class_names()) == 10
    assert all("{}" in t for t in zero_shot_templates())


def test_builtin_is_deterministic(tmp_path, builtin):
    again = write_builtin_dataset(tmp_path, image_size=24, shard_size=400)
    assert Path(again["heldout"]["shards"][0]).read_bytes() == Path(builtin["heldout"]["shards"][0]).read_bytes()


def _run(*args):
    return subprocess.run([sys.executable, MAKE_SHARDS, *args], capture_output=True, text=True)


def test_make_shards_from_listing(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "imgs/a.jpg")
    Image.new("RGBA", (8, 8), (0, 0, 255, 128)).save(tmp_path / "imgs/b.png")
    Image.new("RGB", (8, 8), "green").save(tmp_path / "imgs/c.bmp")
    (tmp_path / "imgs/broken.jpg").write_bytes(b"not an image")
    listing = tmp_path / "list.tsv"
    listing.write_text("path\ttext\tsource\n"
                       "imgs/a.jpg\ta red square\tweb\n"
                       f"{tmp_path / 'imgs/b.png'}\ta blue square\tweb\n"
                       "imgs/c.bmp\ta green square\tweb\n"
                       "imgs/missing.jpg\tgone\tweb\n"
                       "imgs/broken.jpg\tbroken\tweb\n"
                       "imgs/a.jpg\t   \tweb\n")
    out = tmp_path / "shards"
    result = _run("--input", str(listing), "--image-column", "path", "--caption-column", "text",
                  "--output", str(out), "--shard-size", "2")
    assert result.returncode == 0, result.stderr
    assert "wrote 3 samples in 2 shard(s)" in result.stdout
    assert "missing_file" in result.stdout and "missing.jpg" in result.stderr
    samples = _samples(out / "00000.tar") + _samples(out / "00001.tar")
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002"]
    assert [sorted(k for k in s if not k.startswith("__")) for s in samples] == [
        ["jpg", "json", "txt"], ["json", "png", "txt"], ["jpg", "json", "txt"]]  # bmp re-encoded as jpg
    assert json.loads(samples[0]["json"]) == {"path": "imgs/a.jpg", "source": "web"}
    assert Image.open(io.BytesIO(samples[2]["jpg"])).getpixel((4, 4))[1] > 100  # the green bmp
    strict = _run("--input", str(listing), "--image-column", "path", "--caption-column", "text",
                  "--output", str(tmp_path / "strict"), "--strict")
    assert strict.returncode == 1


def test_make_shards_errors(tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("image,caption\n")
    assert _run("--help").returncode == 0
    no_rows = _run("--input", str(listing), "--output", str(tmp_path / "o1"))
    assert no_rows.returncode == 2 and "lists no samples" in no_rows.stderr
    listing.write_text("file,caption\nx.jpg,hello\n")
    bad_columns = _run("--input", str(listing), "--output", str(tmp_path / "o2"))
    assert bad_columns.returncode == 2 and "--image-column" in bad_columns.stderr
    listing.write_text("image,caption\nx.jpg,hello\n")
    nothing = _run("--input", str(listing), "--output", str(tmp_path / "o3"))
    assert nothing.returncode == 1 and "no sample" in nothing.stderr
    assert _run("--input", str(tmp_path / "nope.csv"), "--output", str(tmp_path / "o4")).returncode == 2
    assert _run("--output", str(tmp_path / "o5")).returncode == 2  # neither --input nor --builtin


def test_train_tokenizer_cli_reads_shards(builtin, tmp_path):
    pattern = str(Path(builtin["heldout"]["dir"]) / "{00000..00000}.tar")
    result = subprocess.run([sys.executable, str(REPO / "launchers" / "train_tokenizer.py"), "--input", pattern,
                             "--vocab-size", "200", "--output", str(tmp_path / "tok")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "trained on 360 captions" in result.stdout and (tmp_path / "tok.model").is_file()
