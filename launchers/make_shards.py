#!/usr/bin/env python
"""Write image–caption tar shards in the LAION / img2dataset layout.

From a listing (CSV, TSV or JSONL; one row per sample):
    python launchers/make_shards.py --input data/listing.csv --output data/shards --shard-size 10000
    # listing.csv:   image,caption
    #                imgs/cat.jpg,a cat on a sofa          (paths relative to the listing's folder)

The built-in datasets (write OUTPUT/train, OUTPUT/heldout and OUTPUT/classes.json):
    python launchers/make_shards.py --builtin scenes --output data/scenes   # multi-object scenes + masks
    python launchers/make_shards.py --builtin shapes --output data/shapes   # one shape per image
    python launchers/make_shards.py --builtin digits --output data/digits   # handwritten digits

An evaluation set for CLIP_benchmark (its webdataset layout; evaluate it with
``python -m rils_scale.eval.clip_benchmark eval --dataset wds/NAME --dataset_root OUTPUT ...``,
which takes ``clip_benchmark eval``'s arguments, or with ``launchers/evaluate.py --data OUTPUT``):
    python launchers/make_shards.py --builtin shapes --layout clip_benchmark --output data/wds_shapes
    python launchers/make_shards.py --input val.csv --layout clip_benchmark --label-column label \\
        --class-names classes.txt --templates templates.txt --output data/wds_mine
writes OUTPUT/classnames.txt, OUTPUT/zeroshot_classification_templates.txt and
OUTPUT/<split>/{0.tar,...,nshards.txt} with KEY.<image> + KEY.cls (see docs/evaluation.md).
Without --shard-size a split is cut into 4 shards (at most 10000 samples each), one per
DataLoader worker of clip_benchmark's default --num_workers 4.

JPEG/PNG/WebP files are stored as they are; other formats PIL can read are re-encoded (JPEG,
or PNG when they have transparency). The row's other columns (image path included) go to
``KEY.json``. Rows whose image
is missing or unreadable, or whose caption is empty, are skipped, counted and reported.
Exit status: 0 on success, 2 on bad arguments or an unusable listing, 1 when nothing could be
written (or, with --strict, when any row was skipped).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections import Counter
from pathlib import Path

STORE_AS_IS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="listing file: .csv, .tsv, .jsonl or .parquet (img2dataset's input "
                                         "format; needs pyarrow: pip install '.[parquet]') with image and caption "
                                         "columns; image paths may be file:// URLs")
    source.add_argument("--builtin", nargs="?", const="scenes", choices=("scenes", "shapes", "digits"),
                        help="write a built-in dataset: scenes (2-3 objects per image, captions naming them, "
                             "per-object masks; the demo's, and the default when no name is given), shapes "
                             "(one object per image, compositional captions) or digits (scikit-learn's "
                             "handwritten digits, captioned); also writes classes.json for evaluation")
    parser.add_argument("--output", required=True, help="output directory (must not already hold shards)")
    parser.add_argument("--shard-size", type=int, default=None,
                        help="samples per shard (default: 10000 for a listing, 500 for --builtin scenes and shapes, "
                             "256 for --builtin digits; --layout clip_benchmark: a quarter of the split, at most "
                             "10000). Training reads at least one shard per DataLoader worker of every rank: "
                             "choose it so that shards >= nodes x GPUs x --num-workers")
    parser.add_argument("--image-column", default="image", help="listing column with the image path")
    parser.add_argument("--caption-column", default="caption", help="listing column with the caption")
    parser.add_argument("--format", choices=("csv", "tsv", "jsonl", "parquet"), default=None,
                        help="listing format (default: from the file extension)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any row was skipped")
    parser.add_argument("--layout", choices=("laion", "clip_benchmark"), default="laion",
                        help="laion: KEY.jpg + KEY.txt (+ KEY.json) training/eval shards (default); "
                             "clip_benchmark: labelled KEY.<image> + KEY.cls with classnames.txt, "
                             "zeroshot_classification_templates.txt, SPLIT/nshards.txt")
    parser.add_argument("--label-column", default="label", help="clip_benchmark layout: listing column with the "
                        "integer class id")
    parser.add_argument("--class-names", help="clip_benchmark layout: text file, line i = name of class i")
    parser.add_argument("--templates", help="clip_benchmark layout: text file, one prompt per line with {} or {c} "
                        "for the class name (default: 'a photo of a {c}.'; --builtin: the dataset's own)")
    parser.add_argument("--split", default="test", help="clip_benchmark layout: split directory (default: test)")
    parser.add_argument("--image-size", type=int, default=32, help="--builtin: image side in pixels")
    parser.add_argument("--augment-copies", type=int, default=1, help="--builtin: renderings per train image")
    parser.add_argument("--seed", type=int, default=0, help="--builtin: colour/offset/caption seed")
    return parser.parse_args(argv)


class ListingError(ValueError):
    """The listing itself is unusable (format, columns)."""


def read_listing(path: Path, fmt: str | None, image_column: str, caption_column: str) -> list[dict]:
    fmt = fmt or {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
                  ".parquet": "parquet"}.get(path.suffix.lower())
    if fmt is None:
        raise ListingError(f"cannot tell the format of {path.name}; use --format csv|tsv|jsonl|parquet")
    if fmt == "parquet":
        rows, columns = _read_parquet(path)
    else:
        rows, columns = _read_text_listing(path, fmt)
    missing = [c for c in (image_column, caption_column) if c not in columns]
    if missing:
        raise ListingError(f"{path.name} has no column(s) {missing}; found {sorted(columns)}. "
                           "Use --image-column / --caption-column")
    if not rows:
        raise ListingError(f"{path.name} lists no samples")
    return rows


def _read_text_listing(path: Path, fmt: str) -> tuple[list[dict], set]:
    with open(path, encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            rows = []
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as err:
                        raise ListingError(f"{path.name}:{line_no}: invalid JSON ({err})") from None
            columns = set().union(*(r.keys() for r in rows)) if rows else set()
        else:
            reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
            rows = list(reader)
            columns = set(reader.fieldnames or ())
    return rows, columns


def _read_parquet(path: Path) -> tuple[list[dict], set]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ListingError("reading a .parquet listing needs pyarrow: pip install 'rils_scale[parquet]' "
                           "(or pyarrow), or convert the listing to csv/jsonl") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid and friends on a bad file
        raise ListingError(f"{path.name}: unreadable parquet ({err})") from None
    return table.to_pylist(), set(table.column_names)


def load_image_for_shard(path: Path) -> tuple[bytes, str]:
    """(bytes, extension) to store; raises OSError/ValueError when PIL cannot decode the file."""
    from PIL import Image

    from rils_scale.data.shards import encode_image
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # verify the whole file decodes, so no broken image reaches a shard
        if image.format in STORE_AS_IS:
            return data, STORE_AS_IS[image.format]
        has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
        ext = "png" if has_alpha else "jpg"
        return encode_image(image if has_alpha else image.convert("RGB"), ext), ext


def write_from_listing(args) -> tuple[dict, Counter, list[str]]:
    from rils_scale.data.shards import ShardWriter

    listing = Path(args.input)
    rows = read_listing(listing, args.format, args.image_column, args.caption_column)
    skipped: Counter = Counter()
    examples: list[str] = []
    with ShardWriter(args.output, args.shard_size or 10000) as writer:
        for row_no, row in enumerate(rows, 1):
            caption = " ".join(str(row.get(args.caption_column) or "").split())
            image_ref = str(row.get(args.image_column) or "")
            image_path = Path(image_ref[len("file://"):] if image_ref.startswith("file://") else image_ref)
            if not caption:
                skipped["empty_caption"] += 1
                examples.append(f"row {row_no}: empty caption")
                continue
            if not image_path.is_absolute():
                image_path = listing.parent / image_path
            if not image_path.is_file():
                skipped["missing_file"] += 1
                examples.append(f"row {row_no}: missing image {image_path}")
                continue
            try:
                data, ext = load_image_for_shard(image_path)
            except Exception as err:  # PIL raises many types on bad files
                skipped["unreadable_image"] += 1
                examples.append(f"row {row_no}: unreadable image {image_path} ({type(err).__name__})")
                continue
            meta = {k: v for k, v in row.items() if k != args.caption_column}  # the row, image path included
            writer.write(data, caption, meta, ext=ext)
    return writer.summary, skipped, examples


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _note_few_shards(shards: int) -> None:
    from rils_scale.data.clip_benchmark import MIN_SHARDS
    if shards < MIN_SHARDS:
        print(f"note: {shards} shard(s): the stock `clip_benchmark eval` needs --num_workers {shards} or fewer "
              "(webdataset gives each worker whole shards); `python -m rils_scale.eval.clip_benchmark eval` "
              "lowers it for you")


def write_clip_benchmark(args) -> int:
    """--layout clip_benchmark: a labelled evaluation set in CLIP_benchmark's webdataset layout."""
    from rils_scale.data import clip_benchmark as cb
    if args.builtin:
        result = cb.write_builtin(args.builtin, args.output, image_size=args.image_size, seed=args.seed,
                                  shard_size=args.shard_size)
        for split, r in result.items():
            print(f"{split}: {r['count']} samples in {len(r['shards'])} shard(s) -> {r['dir']}")
        _note_few_shards(min(len(r["shards"]) for r in result.values()))
        return 0
    if not args.class_names:
        print("error: --layout clip_benchmark with --input needs --class-names FILE", file=sys.stderr)
        return 2
    names = _read_lines(args.class_names)
    templates = _read_lines(args.templates) if args.templates else list(cb.DEFAULT_TEMPLATES)
    listing = Path(args.input)
    rows = read_listing(listing, args.format, args.image_column, args.label_column)
    skipped: Counter = Counter()

    def samples():
        for row_no, row in enumerate(rows, 1):
            path = Path(str(row.get(args.image_column) or ""))
            path = path if path.is_absolute() else listing.parent / path
            try:
                label = int(str(row.get(args.label_column)).strip())
            except ValueError:
                skipped["bad_label"] += 1
                continue
            if not 0 <= label < len(names):
                skipped["label_out_of_range"] += 1
                continue
            try:
                data, ext = cb.read_image_bytes(str(path))
            except (OSError, ValueError):
                skipped["missing_or_unreadable_image"] += 1
                continue
            yield data, ext, label

    cb.check_split_free(args.output, args.split)
    cb.write_metadata(args.output, names, templates)
    result = cb.write_split(args.output, args.split, samples(), len(names),
                            args.shard_size or cb.default_shard_size(len(rows)))
    print(f"wrote {result['count']} samples in {len(result['shards'])} shard(s) to {result['dir']}"
          + (f"; skipped {sum(skipped.values())}: {dict(skipped)}" if skipped else ""))
    _note_few_shards(len(result["shards"]))
    if args.strict and skipped:
        print("error: rows were skipped and --strict is set", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.shard_size is not None and args.shard_size < 1:
        print(f"error: --shard-size must be >= 1, got {args.shard_size}", file=sys.stderr)
        return 2
    if args.layout == "clip_benchmark":
        if args.input and not os.path.isfile(args.input):
            print(f"error: listing not found: {args.input}", file=sys.stderr)
            return 2
        try:
            return write_clip_benchmark(args)
        except (ListingError, FileExistsError, UnicodeDecodeError, csv.Error, ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1 if type(err) is ValueError else 2  # 1: nothing usable to write; 2: bad arguments/listing
    if args.builtin:
        from rils_scale.data.builtin import write_named_builtin
        try:
            result = write_named_builtin(args.builtin, args.output, image_size=args.image_size,
                                         shard_size=args.shard_size, seed=args.seed,
                                         augment_copies=args.augment_copies)
        except (ValueError, FileExistsError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        for split in ("train", "heldout"):
            print(f"{split}: {result[split]['count']} samples in {len(result[split]['shards'])} shard(s) "
                  f"-> {result[split]['dir']}")
        return 0

    if not os.path.isfile(args.input):
        print(f"error: listing not found: {args.input}", file=sys.stderr)
        return 2
    try:
        summary, skipped, examples = write_from_listing(args)
    except (ListingError, FileExistsError, UnicodeDecodeError, csv.Error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in examples[:10]:
        print(f"skipped {line}", file=sys.stderr)
    if len(examples) > 10:
        print(f"... and {len(examples) - 10} more skipped rows", file=sys.stderr)
    print(f"wrote {summary['count']} samples in {summary['num_shards']} shard(s) to {args.output}"
          + (f"; skipped {sum(skipped.values())}: {dict(skipped)}" if skipped else ""))
    if 0 < summary["num_shards"] < 4:
        print(f"note: {summary['num_shards']} shard(s) feed at most {summary['num_shards']} loader stream(s); "
              "pretrain.py needs shards >= nodes x GPUs per node x --num-workers (2 ranks x 2 workers: 4), "
              f"e.g. --shard-size {max(1, summary['count'] // 4)}")
    if summary["count"] == 0:
        print("error: no sample could be written", file=sys.stderr)
        return 1
    if args.strict and skipped:
        print("error: rows were skipped and --strict is set", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
