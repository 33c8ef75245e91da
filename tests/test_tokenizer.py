"""SentencePiece tokenizer: id layout, truncation, vocabulary shrinking, determinism."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rils_scale.data import Tokenizer, train_tokenizer
from rils_scale.data.tokenizer import EOT_ID, PAD_ID, SOT_ID

REPO = Path(__file__).resolve().parents[1]
CORPUS = [f"a photo of the number {w} in {c}" for w in ("one", "two", "three", "four", "five")
          for c in ("red", "green", "blue", "black")] + ["a handwritten seven", "the digit nine on white"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    with pytest.warns(RuntimeWarning, match="too small for vocab_size=5000"):
        return train_tokenizer(CORPUS, tmp_path_factory.mktemp("tok") / "captions", vocab_size=5000)


@pytest.fixture(scope="module")
def tok(model_path):
    return Tokenizer.load(model_path)


def test_special_ids(tok):
    assert (tok.pad_id, tok.sot_id, tok.eot_id) == (0, SOT_ID, EOT_ID) == (PAD_ID, 2, 3)
    assert 8 <= tok.vocab_size < 5000  # shrunk to what the corpus supports


def test_layout_sot_tokens_eot_pad(tok):
    ids = tok(["a photo of the number two in red", "nine"], context_length=20)
    assert ids.dtype == torch.int64 and ids.shape == (2, 20)
    for row, text in zip(ids, ["a photo of the number two in red", "nine"]):
        n = len(tok.encode(text))
        assert row[0] == tok.sot_id and row[n + 1] == tok.eot_id
        assert (row[1:n + 1] > EOT_ID).all()  # real tokens: never pad, unk, sot or eot
        assert (row[n + 2:] == PAD_ID).all()
    assert tok.decode(ids[0]) == "a photo of the number two in red"
    assert tok.decode(ids) == ["a photo of the number two in red", "nine"]


def test_truncation_keeps_eot_last(tok):
    long_caption = " ".join(CORPUS)
    ids = tok(long_caption, context_length=9)
    assert ids.shape == (1, 9)
    assert ids[0, 0] == tok.sot_id and ids[0, -1] == tok.eot_id
    assert (ids[0, 1:-1] != PAD_ID).all()
    assert ids[0, 1:-1].tolist() == tok.encode(long_caption)[:7]
    with pytest.raises(ValueError):
        tok("x", context_length=1)


def test_lowercase_and_whitespace_normalised(tok):
    assert torch.equal(tok("A  PHOTO of the\tNumber One"), tok("a photo of the number one"))


def test_empty_caption_is_sot_eot(tok):
    assert tok("", context_length=4).tolist() == [[SOT_ID, EOT_ID, PAD_ID, PAD_ID]]


def test_training_is_deterministic(tmp_path, model_path):
    with pytest.warns(RuntimeWarning):
        again = train_tokenizer(CORPUS, tmp_path / "again", vocab_size=5000)
    # The .model also records its own output path (trainer spec), so compare the vocabularies:
    # pieces and their scores, in id order.
    assert Path(again).with_suffix(".vocab").read_text() == Path(model_path).with_suffix(".vocab").read_text()
    a, b = Tokenizer.load(again), Tokenizer.load(model_path)
    assert torch.equal(a(CORPUS), b(CORPUS))


def test_train_from_text_file_and_copy(tmp_path, tok):
    text_file = tmp_path / "captions.txt"
    text_file.write_text("\n".join(CORPUS) + "\n\n")
    with pytest.warns(RuntimeWarning):
        path = train_tokenizer(text_file, tmp_path / "from_file", vocab_size=5000)
    assert Tokenizer.load(path).vocab_size == tok.vocab_size
    clone = copy.deepcopy(tok)  # DataLoader workers under spawn copy the tokenizer this way
    assert torch.equal(clone("the digit nine"), tok("the digit nine"))


def test_empty_corpus_and_missing_model_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer(["", "   "], tmp_path / "x", vocab_size=100)
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing.model")


def test_cli(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CORPUS))
    script = str(REPO / "launchers" / "train_tokenizer.py")
    ok = subprocess.run([sys.executable, script, "--input", str(captions), "--vocab-size", "3000",
                         "--output", str(tmp_path / "cli")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "warning" in ok.stderr and (tmp_path / "cli.model").is_file() and (tmp_path / "cli.vocab").is_file()
    missing = subprocess.run([sys.executable, script, "--input", str(tmp_path / "nope.txt"), "--output",
                              str(tmp_path / "x")], capture_output=True, text=True)
    assert missing.returncode == 2 and "not found" in missing.stderr
