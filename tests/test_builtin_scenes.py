"""The demo's built-in dataset: procedural scenes whose captions name what is drawn."""
import io
import json
import tarfile

import numpy as np
from PIL import Image

from rils_scale.data.builtin import write_named_builtin
from rils_scale.data.scenes import COLOURS, SHAPES, class_names


def _samples(split_dir):
    out = []
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(members):
            if name.endswith(".json"):
                key = name[:-5]
                out.append((Image.open(io.BytesIO(members[key + ".png"])), members[key + ".txt"].decode(),
                            json.loads(members[name])))
    return out


def test_scenes_captions_match_pixels_and_classes(tmp_path):
    result = write_named_builtin("shapes", tmp_path, shard_size=100)
    classes = json.loads((tmp_path / "classes.json").read_text())
    assert classes["class_names"] == class_names() and len(classes["class_names"]) == 30
    assert all("{}" in t for t in classes["templates"])
    assert result["train"]["count"] == 4000 and result["heldout"]["count"] == 600
    heldout = _samples(tmp_path / "heldout")
    seen = set()
    for image, caption, meta in heldout:
        assert meta["colour"] in caption and meta["shape"] in caption
        assert class_names()[meta["label"]] == meta["class_name"] == f"{meta['colour']} {meta['shape']}"
        # the named colour is really drawn: it is the most common non-background colour
        pixels = np.asarray(image).reshape(-1, 3)
        target = np.array(COLOURS[meta["colour"]])
        assert (np.abs(pixels - target).sum(1) < 30).mean() > 0.05
        seen.add(meta["label"])
    assert len(seen) == 30  # every class occurs in the held-out split
    captions = {c for _, c, _ in heldout}
    assert len(captions) > 150  # varied phrasings, not one template
    assert len(SHAPES) * len(COLOURS) == 30


def test_scenes_are_deterministic_and_splits_differ(tmp_path):
    a = write_named_builtin("shapes", tmp_path / "a", shard_size=1000)
    b = write_named_builtin("shapes", tmp_path / "b", shard_size=1000)
    for split in ("train", "heldout"):
        for x, y in zip(a[split]["shards"], b[split]["shards"]):
            assert open(x, "rb").read() == open(y, "rb").read()
    train_bytes = {np.asarray(i).tobytes() for i, _, _ in _samples(tmp_path / "a" / "train")[:2000]}
    heldout_bytes = [np.asarray(i).tobytes() for i, _, _ in _samples(tmp_path / "a" / "heldout")]
    assert sum(h in train_bytes for h in heldout_bytes) < 5  # separate random streams
