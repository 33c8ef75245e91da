#!/usr/bin/env python
"""Patch-sentence probability maps of a RILS model, as a PNG grid.

    # your images and sentences
    python launchers/visualize.py --model exports/b16 --images cat.jpg dog.jpg \\
        --sentences "a cat" "a dog" "grass" --output maps.png
    # the first N samples of shards, against their own captions
    python launchers/visualize.py --model runs/tiny --shards data/digits/heldout --num 4 --output maps.png

    # the built-in scenes: each image against its objects' phrases and its background
    python launchers/visualize.py --model runs/demo/exported --shards runs/demo/data/heldout \\
        --object-phrases --background-phrase "the {} background" --num 6 --output maps.png

Each row: the image; the image split into regions by the sentence each patch is closest to
(argmax), each region labelled with its sentence's number (legend below: number, sentence,
share of patches; numbers rather than colours, which the sentences themselves name); one heat
map per sentence of softmax_s(patch . sentence / tau), tau = 0.04 (RILS's teacher
temperature), and a colour bar for their 0-1 scale. Exit status: 0 on success, 2 on bad
arguments, 1 on failure.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="rils export dir, or run / checkpoints / tag dir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="image files")
    src.add_argument("--shards", help="shards to take the first --num samples (and captions) from")
    p.add_argument("--num", type=int, default=4, help="samples taken from --shards")
    p.add_argument("--sentences", nargs="+", help="sentences (default with --shards: the samples' captions)")
    p.add_argument("--sentences-file", help="one sentence per line")
    p.add_argument("--object-phrases", action="store_true",
                   help="with --shards of the built-in scenes: each image against its own objects' phrases "
                        "(different objects should claim different patches)")
    p.add_argument("--background-phrase", default=None,
                   help="with --object-phrases: one more phrase per image for its background, so background "
                        "patches do not have to go to an object; {} is the sample's background name from its JSON, "
                        "e.g. 'the {} background' -> 'the black background'")
    p.add_argument("--temperature", type=float, default=0.04)
    p.add_argument("--cell", type=int, default=160, help="pixel size of each panel")
    p.add_argument("--output", required=True, help="PNG file to write")
    args = p.parse_args(argv)

    import torch
    from PIL import Image
    from rils_scale.checkpoint.layout import CheckpointError
    from rils_scale.checkpoint.load import load_model
    from rils_scale.eval.visualize import denormalize, patch_sentence_probabilities, render_maps

    sentences = list(args.sentences or [])
    if args.sentences_file:
        with open(args.sentences_file) as f:
            sentences += [line.strip() for line in f if line.strip()]
    if args.images and not sentences:
        p.error("--images needs --sentences or --sentences-file")
    try:
        model = load_model(args.model)
        if args.object_phrases:
            if not args.shards:
                p.error("--object-phrases needs --shards")
            from rils_scale.eval.localization import render_localization_maps
            grid = render_localization_maps(model, args.shards, num=args.num, cell=args.cell,
                                            background=args.background_phrase)
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            grid.save(args.output)
            print(f"[visualize] {args.num} image(s) x their object phrases -> {args.output}")
            return 0
        if args.images:
            pil = []
            for path in args.images:
                with Image.open(path) as im:
                    pil.append(im.convert("RGB"))
            batch = torch.stack([model.transform(im) for im in pil])
        else:
            from rils_scale.data.pipeline import build_eval_loader
            cfg = model.cfg
            first = next(iter(build_eval_loader(args.shards, None, cfg.vision.image_size, args.num)))
            batch = first["images"]
            sentences = sentences or first["captions"]
        probs = patch_sentence_probabilities(model, batch, model.tokenize(sentences), args.temperature)
        grid = render_maps([denormalize(t) for t in batch], probs, sentences, cell=args.cell)
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        grid.save(args.output)
    except (CheckpointError, FileNotFoundError, ValueError, OSError, StopIteration) as err:
        print(f"visualize.py: error: {err or 'no samples'}", file=sys.stderr)
        return 1
    print(f"[visualize] {len(batch)} image(s) x {len(sentences)} sentence(s) -> {args.output} "
          f"({grid.width}x{grid.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
