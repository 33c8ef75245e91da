"""Training the SentencePiece caption tokenizer (no torch needed: the CLI stays light).

Why SentencePiece BPE (not unigram):
  * CLIP's text tower was designed around a BPE vocabulary; BPE merges are a deterministic
    greedy procedure, so the same corpus (in the same order) always gives the same model.
  * On small caption corpora (the built-in demo, smoke tests) BPE reaches a much larger
    vocabulary before running out of merges than unigram does (e.g. 98 vs 25 pieces on a
    three-caption corpus), so frequent words become single tokens.
  Unigram remains available through ``model_type="unigram"``.

Normalisation: captions are NFKC-normalised and case-folded by SentencePiece's own
``nmt_nfkc_cf`` rule, which is stored inside the ``.model`` file. Training and encoding
therefore always agree, and CLIP's lower-casing is reproduced without a Python-side step
that could drift from the model. Whitespace runs are collapsed before training and encoding.

Special ids are fixed so the text tower can rely on them: ``pad = 0`` (the model pools at the
last non-pad position), ``unk = 1``, ``sot = 2`` (SentencePiece's bos), ``eot = 3`` (eos).
"""
from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

PAD_ID = 0
UNK_ID = 1
SOT_ID = 2
EOT_ID = 3

_TOO_HIGH = re.compile(r"value\s*<=\s*(\d+)")
_MAX_SHRINK_ATTEMPTS = 12


def normalize_caption(text: str) -> str:
    """Strip and collapse whitespace; case and Unicode folding happen inside SentencePiece."""
    return " ".join(text.split())


def _read_corpus(texts_or_files: Iterable[str | os.PathLike] | str | os.PathLike) -> list[str]:
    """Materialise the corpus once, in input order, so retries see exactly the same sentences.

    A single ``str``/``PathLike`` argument is a text file (one caption per line). Inside an
    iterable, ``PathLike`` items are such files and ``str`` items are captions: a caption is
    never mistaken for a file name.
    """
    if isinstance(texts_or_files, (str, os.PathLike)):
        texts_or_files = [Path(texts_or_files)]
    corpus: list[str] = []
    for item in texts_or_files:
        if isinstance(item, os.PathLike):
            with open(item, encoding="utf-8") as f:
                corpus.extend(normalize_caption(line) for line in f)
        else:
            corpus.append(normalize_caption(str(item)))
    return [c for c in corpus if c]


def train_tokenizer(texts_or_files: Iterable[str] | str | os.PathLike, output_prefix: str | os.PathLike,
                    vocab_size: int = 32000, *, model_type: str = "bpe", character_coverage: float = 1.0,
                    byte_fallback: bool = False, max_sentence_length: int = 4096, seed: int = 0) -> str:
    """Train a SentencePiece model and return the path of ``{output_prefix}.model``.

    ``vocab_size`` counts every id, the four specials included. When the corpus cannot support
    that many pieces, SentencePiece refuses; we then warn and retry with the largest size it
    reports (or a geometrically smaller one when it reports none), so small corpora never fail.

    Deterministic: one training thread, no input sampling or shuffling, fixed RNG seed.
    ``byte_fallback=True`` (recommended for web-scale multilingual captions) maps characters
    outside the vocabulary to byte pieces instead of ``unk``, at the cost of 256 extra ids.
    """
    corpus = _read_corpus(texts_or_files)
    if not corpus:
        raise ValueError("tokenizer corpus is empty: no non-blank captions were found")
    if vocab_size < 8:
        raise ValueError(f"vocab_size={vocab_size} is too small (4 ids are reserved for specials)")
    output_prefix = str(output_prefix)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)

    spm.set_random_generator_seed(seed)
    requested, size = vocab_size, vocab_size
    for _ in range(_MAX_SHRINK_ATTEMPTS):
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(corpus), model_prefix=output_prefix, vocab_size=size,
                model_type=model_type, character_coverage=character_coverage,
                byte_fallback=byte_fallback, normalization_rule_name="nmt_nfkc_cf",
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=SOT_ID, eos_id=EOT_ID,
                pad_piece="<pad>", unk_piece="<unk>", bos_piece="<sot>", eos_piece="<eot>",
                num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
                max_sentence_length=max_sentence_length, minloglevel=2)
            break
        except RuntimeError as err:
            match = _TOO_HIGH.search(str(err))
            if match is None and "too high" not in str(err).lower():
                raise
            new_size = int(match.group(1)) if match else size // 2
            new_size = min(new_size, size - 1)
            if new_size < 8:
                raise ValueError(f"corpus too small to train a tokenizer (largest vocabulary "
                                 f"SentencePiece allows: {new_size})") from err
            size = new_size
    else:
        raise RuntimeError(f"could not find a vocabulary size the corpus supports (last tried {size})")
    if size != requested:
        warnings.warn(f"tokenizer corpus ({len(corpus)} captions) too small for vocab_size={requested}; "
                      f"trained with vocab_size={size} instead", RuntimeWarning, stacklevel=2)
    return output_prefix + ".model"
