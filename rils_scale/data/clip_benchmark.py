"""Evaluation sets in CLIP_benchmark's webdataset layout (``clip_benchmark eval --dataset wds/<name>``).

    ROOT/classnames.txt                          line i = name of class i
    ROOT/zeroshot_classification_templates.txt   one prompt per line, ``{c}`` = class name
    ROOT/<split>/nshards.txt                     number of shards
    ROOT/<split>/0.tar, 1.tar, ...               KEY.<jpg|png|webp> + KEY.cls (the label as text)

(the layout of ``clip_benchmark.datasets.builder.build_wds_dataset``). Images are stored as
they are: the harness and rils_scale decode the same bytes.
"""
from __future__ import annotations

import io
import json
import math
import os
import tarfile
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from .shards import add_member

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DEFAULT_TEMPLATES = ("a photo of a {c}.",)
MIN_SHARDS = 4
"""``clip_benchmark eval``'s default ``--num_workers``: webdataset gives each DataLoader worker
whole shards, and a worker without one fails the run, so a split has at least this many."""
MAX_SHARD_SIZE = 10000


def default_shard_size(num_samples: int) -> int:
    """Samples per shard that cut ``num_samples`` into :data:`MIN_SHARDS` shards (more when that
    would exceed :data:`MAX_SHARD_SIZE` per shard)."""
    return max(1, min(MAX_SHARD_SIZE, math.ceil(num_samples / MIN_SHARDS)))


def to_clip_benchmark_template(template: str) -> str:
    """rils_scale / CLIP prompts use ``{}``; CLIP_benchmark formats ``{c}``."""
    return template if "{c}" in template else template.replace("{}", "{c}")


def check_split_free(root: str, split: str) -> None:
    out = os.path.join(root, split)
    if os.path.isdir(out) and any(f.endswith(".tar") for f in os.listdir(out)):
        raise FileExistsError(f"{out} already holds shards")


def write_metadata(root: str, class_names: Sequence[str], templates: Sequence[str]) -> None:
    if not class_names:
        raise ValueError("a CLIP_benchmark classification set needs class names")
    if any("\n" in n for n in class_names):
        raise ValueError("class names must be single lines")
    templates = [to_clip_benchmark_template(t) for t in (templates or DEFAULT_TEMPLATES)]
    if any("{c}" not in t for t in templates):
        raise ValueError("every template needs a '{}' or '{c}' placeholder for the class name")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "classnames.txt"), "w") as f:
        f.write("\n".join(class_names) + "\n")
    with open(os.path.join(root, "zeroshot_classification_templates.txt"), "w") as f:
        f.write("\n".join(templates) + "\n")


def write_split(root: str, split: str, samples: Iterable[Tuple[bytes, str, int]], num_classes: int,
                shard_size: int = 10000) -> dict:
    """Write ``(image bytes, extension, label)`` samples as ``ROOT/split/{0..n-1}.tar`` + ``nshards.txt``."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    check_split_free(root, split)
    out = os.path.join(root, split)
    os.makedirs(out, exist_ok=True)
    archive, count, shards = None, 0, []
    try:
        for data, ext, label in samples:
            ext = ext.lower().lstrip(".")
            if ext not in IMAGE_EXTS:
                raise ValueError(f"image extension {ext!r} is not one CLIP_benchmark decodes {IMAGE_EXTS}")
            if not 0 <= int(label) < num_classes:
                raise ValueError(f"label {label} outside 0..{num_classes - 1}")
            if count % shard_size == 0:
                if archive is not None:
                    archive.close()
                shards.append(os.path.join(out, f"{len(shards)}.tar"))
                archive = tarfile.open(shards[-1], "w")
            key = f"{count:09d}"
            add_member(archive, f"{key}.{ext}", data)
            add_member(archive, f"{key}.cls", str(int(label)).encode())
            count += 1
    finally:
        if archive is not None:
            archive.close()
    if count == 0:
        raise ValueError(f"no samples to write to {out}")
    with open(os.path.join(out, "nshards.txt"), "w") as f:
        f.write(f"{len(shards)}\n")
    return {"dir": out, "count": count, "shards": shards}


def iter_labelled_shards(paths: Sequence[str]) -> Iterator[Tuple[bytes, str, int]]:
    """``(image bytes, ext, label)`` from rils_scale shards whose ``KEY.json`` holds ``label``;
    tar members are read as bytes only (no pickle, no extraction to disk)."""
    for path in paths:
        with tarfile.open(path) as tf:
            groups: dict = {}
            order: List[str] = []
            for member in tf.getmembers():
                if not member.isfile() or "." not in member.name:
                    continue
                key, ext = member.name.split(".", 1)
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext.lower()] = tf.extractfile(member).read()
            for key in order:
                g = groups[key]
                image = next(((g[e], e) for e in IMAGE_EXTS if e in g), None)
                meta = json.loads(g["json"]) if "json" in g else {}
                if image is None or "label" not in meta:
                    continue
                yield image[0], image[1], int(meta["label"])


def shard_files(path: str) -> List[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".tar"))
    else:
        files = [path]
    if not files:
        raise FileNotFoundError(f"no .tar shards in {path}")
    return files


def convert_labelled_shards(src: str, root: str, class_names: Sequence[str], templates: Sequence[str],
                            split: str = "test", shard_size: int = 10000) -> dict:
    """rils_scale labelled shards (``src``: directory or .tar) -> CLIP_benchmark layout under ``root``."""
    check_split_free(root, split)
    write_metadata(root, class_names, templates)
    return write_split(root, split, iter_labelled_shards(shard_files(src)), len(class_names), shard_size)


def write_builtin(name: str, root: str, *, image_size: int = 32, seed: int = 0,
                  shard_size: Optional[int] = None, work_dir: Optional[str] = None) -> dict:
    """A built-in dataset (``shapes`` / ``digits``) in CLIP_benchmark layout: ``heldout`` becomes
    ``test``, ``train`` stays ``train``; class names and prompts from the dataset."""
    import shutil
    import tempfile

    from .builtin import write_named_builtin
    tmp = tempfile.mkdtemp(prefix="rils_builtin_", dir=work_dir)
    try:
        written = write_named_builtin(name, tmp, image_size=image_size, seed=seed)
        with open(os.path.join(tmp, "classes.json")) as f:
            meta = json.load(f)
        sizes = {split: shard_size or default_shard_size(written[split]["count"]) for split in ("heldout", "train")}
        result = {"test": convert_labelled_shards(os.path.join(tmp, "heldout"), root, meta["class_names"],
                                                  meta["templates"], "test", sizes["heldout"])}
        result["train"] = write_split(root, "train", iter_labelled_shards(shard_files(os.path.join(tmp, "train"))),
                                      len(meta["class_names"]), sizes["train"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _has_shards(path: str) -> bool:
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "nshards.txt"))
                                    or any(f.endswith(".tar") for f in os.listdir(path)))


def read_layout(path: str, split: str = "test") -> Optional[dict]:
    """If ``path`` is a CLIP_benchmark set (its ROOT, or one split directory inside it), what
    evaluation needs: ``{"root", "data" (the split dir), "train_data" (ROOT/train or None),
    "class_names", "templates" (with ``{}``, as rils_scale's prompts)}``; else None."""
    path = os.path.normpath(path)
    if os.path.isfile(os.path.join(path, "classnames.txt")) and _has_shards(os.path.join(path, split)):
        root, data = path, os.path.join(path, split)
    elif _has_shards(path) and os.path.isfile(os.path.join(os.path.dirname(path), "classnames.txt")):
        root, data = os.path.dirname(path), path
    else:
        return None
    with open(os.path.join(root, "classnames.txt"), encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    templates = None
    tpath = os.path.join(root, "zeroshot_classification_templates.txt")
    if os.path.isfile(tpath):
        with open(tpath, encoding="utf-8") as f:
            templates = [line.strip().replace("{c}", "{}") for line in f if line.strip()] or None
    train = os.path.join(root, "train")
    return {"root": root, "data": data, "class_names": names, "templates": templates,
            "train_data": train if _has_shards(train) and os.path.normpath(train) != data else None}


def read_image_bytes(path: str) -> Tuple[bytes, str]:
    """Bytes + extension of an image file, re-encoded to PNG when CLIP_benchmark cannot decode it."""
    from PIL import Image
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        fmt = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(image.format)
        if fmt:
            return data, fmt
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue(), "png"
