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
