"""Interop pieces that need no training run: the trainer stays free of the interop packages,
and ``make_shards.py --layout clip_benchmark`` writes the harness's layout from a listing.
(Exports to timm / OpenCLIP and the CLIP_benchmark run are in test_checkpoint_export.py.)"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTEROP_MODULES = ("open_clip", "transformers", "tokenizers", "clip_benchmark", "ftfy")


def test_trainer_and_exporters_do_not_import_interop_packages():
    code = ("import sys, rils_scale, rils_scale.train, rils_scale.checkpoint.export, rils_scale.eval.runner, "
            "rils_scale.data.pipeline\n"
            f"print(sorted(m for m in {INTEROP_MODULES!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def _listing(tmp_path, rows):
    from PIL import Image
    lines = ["image,label"]
    for i, (colour, label) in enumerate(rows):
        Image.new("RGB", (12, 10), colour).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{label}")
    (tmp_path / "val.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "classes.txt").write_text("red\ngreen\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na {c} thing\n")


def _make_shards(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "launchers", "make_shards.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO})


def test_make_shards_clip_benchmark_layout_from_listing(tmp_path):
    _listing(tmp_path, [((255, 0, 0), 0), ((0, 255, 0), 1), ((250, 5, 5), 0), ((0, 0, 0), 7), ((1, 2, 3), "x")])
    out = tmp_path / "wds"
    proc = _make_shards("--input", str(tmp_path / "val.csv"), "--layout", "clip_benchmark", "--class-names",
                        str(tmp_path / "classes.txt"), "--templates", str(tmp_path / "templates.txt"),
                        "--shard-size", "2", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "wrote 3 samples in 2 shard(s)" in proc.stdout and "label_out_of_range" in proc.stdout
    assert (out / "classnames.txt").read_text().splitlines() == ["red", "green"]
    assert (out / "zeroshot_classification_templates.txt").read_text().splitlines() == ["a photo of a {c}.",
                                                                                       "a {c} thing"]
    assert (out / "test" / "nshards.txt").read_text().strip() == "2"
    labels = []
    for shard in ("0.tar", "1.tar"):
        with tarfile.open(out / "test" / shard) as tf:
            names = tf.getnames()
            assert all(n.endswith((".png", ".cls")) for n in names)
            labels += [int(tf.extractfile(n).read()) for n in names if n.endswith(".cls")]
    assert labels == [0, 1, 0]

    # CLIP_benchmark reads it back: same images, labels, class names, templates
    pytest.importorskip("clip_benchmark")
    from clip_benchmark.datasets.builder import build_dataset
    dataset = build_dataset("wds/mine", root=str(out), transform=lambda im: im.getpixel((0, 0)), split="test")
    assert [(pixel, int(label)) for pixel, label in dataset] == [((255, 0, 0), 0), ((0, 255, 0), 1),
                                                                 ((250, 5, 5), 0)]
    assert dataset.classes == ["red", "green"] and dataset.templates == ["a photo of a {c}.", "a {c} thing"]

    # errors: no class names; the output split already holds shards
    proc = _make_shards("--input", str(tmp_path / "val.csv"), "--layout", "clip_benchmark", "--output", str(out))
    assert proc.returncode == 2 and "--class-names" in proc.stderr
    proc = _make_shards("--input", str(tmp_path / "val.csv"), "--layout", "clip_benchmark", "--class-names",
                        str(tmp_path / "classes.txt"), "--output", str(out))
    assert proc.returncode == 2 and "already holds shards" in proc.stderr


@pytest.mark.parametrize("byte_fallback", [False, True])
def test_hf_tokenizer_conversion_gives_the_same_ids(tmp_path, byte_fallback):
    """SentencePiece -> tokenizer.json: same ids on captions and on text with unseen characters
    (fused <unk>, or byte pieces with byte_fallback), case, NFKC forms, truncation, and text that
    spells a special token (SentencePiece encodes it as characters)."""
    pytest.importorskip("tokenizers")
    import random
    from rils_scale.data.hf_tokenizer import build_hf_tokenizer
    from rils_scale.data.tokenizer import Tokenizer, train_tokenizer
    rng = random.Random(0)
    words = ["red", "green", "blue", "circle", "square", "triangle", "left", "of", "a", "the", "two", "small",
             "large", "next", "to", "above", "below", "naïve", "café"]
    captions = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) for _ in range(600)]
    tok = Tokenizer.load(train_tokenizer(captions, tmp_path / "tok", vocab_size=300, byte_fallback=byte_fallback))
    hf = build_hf_tokenizer(tok.serialized())
    context = 16
    hf.enable_truncation(context)
    hf.enable_padding(length=context, pad_id=0, pad_token="<pad>")
    texts = captions[:300] + [c.upper() for c in captions[300:400]] + [
        "", "a", "emoji \U0001F600\U0001F600 中文 ÄÖÜ ß ﬁ", "ＲＥＤ ｃｉｒｃｌｅ", "e\u0301 cafe\u0301", "a\u00a0b",
        "red " * 30, "Ωmega ΣΊΣΥΦΟΣ", "①② ½", "a <sot> red <eot> circle <pad> <unk>", "<eot>"]
    ours = tok(texts, context).tolist()
    theirs = [e.ids for e in hf.encode_batch(texts)]
    assert [t for t, a, b in zip(texts, ours, theirs) if a != b] == []


def test_hf_tokenizer_refuses_non_bpe_models(tmp_path):
    pytest.importorskip("tokenizers")
    from rils_scale.data.hf_tokenizer import build_hf_tokenizer
    from rils_scale.data.tokenizer import Tokenizer, train_tokenizer
    captions = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square")] * 20
    tok = Tokenizer.load(train_tokenizer(captions, tmp_path / "uni", vocab_size=30, model_type="unigram"))
    with pytest.raises(ValueError, match="only SentencePiece BPE"):
        build_hf_tokenizer(tok.serialized())
