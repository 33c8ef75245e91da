#!/usr/bin/env python
"""Train the SentencePiece caption tokenizer from shards and/or caption text files.

    python launchers/train_tokenizer.py --input data/train/{00000..00005}.tar --vocab-size 8000 \\
        --output runs/tok/captions           # writes runs/tok/captions.model and .vocab

Inputs are read in the order given (tar shards: their ``KEY.txt`` captions; other files: one
caption per line), so the same inputs give the same model. Exit status: 0 on success, 2 on
bad arguments or missing inputs, 1 when training fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="tar shards (paths, brace patterns, directories of .tar) and/or text files "
                             "with one caption per line")
    parser.add_argument("--vocab-size", type=int, default=32000,
                        help="ids in the vocabulary, 4 specials included; shrunk with a warning when the "
                             "corpus is too small (default: 32000)")
    parser.add_argument("--output", required=True, help="model prefix: writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--byte-fallback", action="store_true",
                        help="map unknown characters to byte pieces instead of <unk> (adds 256 ids)")
    parser.add_argument("--max-captions", type=int, default=0,
                        help="use at most this many captions (first ones, in input order); 0 = all")
    return parser.parse_args(argv)


def collect_captions(inputs: list[str], max_captions: int = 0) -> tuple[list[str], dict]:
    """Captions from every input, in order, and skip counts (bad captions, broken shards)."""
    from collections import Counter

    from rils_scale.data.decode import BadSample, decode_caption
    from rils_scale.data.sources import expand_urls, iter_tar_samples

    captions: list[str] = []
    skipped: Counter = Counter()
    for spec in inputs:
        is_shard = spec.startswith("pipe:") or os.path.isdir(spec) or "{" in spec or spec.endswith(TAR_SUFFIXES)
        if is_shard:
            for url in expand_urls(spec):
                if not (url.startswith("pipe:") or os.path.isfile(url)):
                    raise FileNotFoundError(f"input shard not found: {url}")
                for sample in iter_tar_samples(url, lambda reason: skipped.update((reason,))):
                    try:
                        captions.append(decode_caption(sample))
                    except BadSample as bad:
                        skipped[bad.reason] += 1
        else:
            if not os.path.isfile(spec):
                raise FileNotFoundError(f"input file not found: {spec}")
            with open(spec, encoding="utf-8", errors="strict") as f:
                captions.extend(line.strip() for line in f if line.strip())
        if max_captions and len(captions) >= max_captions:
            return captions[:max_captions], dict(skipped)
    return captions, dict(skipped)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.vocab_size < 8:
        print(f"error: --vocab-size must be >= 8, got {args.vocab_size}", file=sys.stderr)
        return 2
    try:
        captions, skipped = collect_captions(args.input, args.max_captions)
    except (FileNotFoundError, ValueError, UnicodeDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not captions:
        print(f"error: no captions found in {args.input} (skipped: {skipped})", file=sys.stderr)
        return 1

    import sentencepiece as spm

    from rils_scale.data.tokenizer_training import train_tokenizer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model_path = train_tokenizer(captions, args.output, args.vocab_size, model_type=args.model_type,
                                         byte_fallback=args.byte_fallback)
        except (ValueError, RuntimeError, OSError) as err:
            print(f"error: tokenizer training failed: {err}", file=sys.stderr)
            return 1
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    vocab_size = spm.SentencePieceProcessor(model_file=model_path).get_piece_size()
    print(f"trained on {len(captions)} captions; vocab_size={vocab_size}; wrote {model_path} "
          f"and {args.output}.vocab" + (f"; skipped: {skipped}" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
