"""The multi-object scenes and the localisation metric: masks match pixels, captions name
every object, and the metric gives ~1 to a model that knows colours and exactly chance to a
model whose patch features carry nothing."""
import io
import json

import numpy as np
import torch
from PIL import Image

from rils_scale.data.multi_scenes import rle_decode, rle_encode, write_multi_scenes_dataset
from rils_scale.data.scenes import BACKGROUNDS, COLOURS
from rils_scale.data.sources import iter_tar_samples
from rils_scale.data.transforms import CLIP_MEAN, CLIP_STD
from rils_scale.eval.localization import localization, patch_coverage

PALETTE = sorted(COLOURS) + [f"bg_{b}" for b in sorted(BACKGROUNDS)]
RGB = torch.tensor([COLOURS[c] for c in sorted(COLOURS)] + [BACKGROUNDS[b] for b in sorted(BACKGROUNDS)],
                   dtype=torch.float32) / 255


class ColourModel(torch.nn.Module):
    """Patch feature = soft nearest palette colour of the patch's mean pixel; phrase = its colour."""

    def __init__(self, informative=True):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.informative = informative
        self.cfg = type("C", (), {})()
        self.cfg.vision = type("V", (), {"image_size": 32, "patch_size": 4})()
        self.cfg.text = type("T", (), {"context_length": 8})()

    def encode_patches(self, images, normalize=True):
        x = images * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        patches = torch.nn.functional.avg_pool2d(x, 4).flatten(2).transpose(1, 2)  # [B, 64, 3]
        if not self.informative:
            patches = torch.zeros_like(patches)
        return torch.softmax(-((patches[:, :, None] - RGB) ** 2).sum(-1) / 0.01, dim=-1)

    def tokenize(self, phrases):
        return torch.tensor([PALETTE.index(p.split()[1]) for p in phrases])

    def encode_text(self, ids):
        return torch.nn.functional.one_hot(ids, len(PALETTE)).float()


def _samples(split_dir):
    """(pixels, caption, meta) of every sample, read with the project's own tar reader."""
    out = []
    for shard in sorted(split_dir.glob("*.tar")):
        for s in iter_tar_samples(str(shard), print):
            out.append((np.asarray(Image.open(io.BytesIO(s["png"]))), s["txt"].decode(), json.loads(s["json"])))
    return out


def test_scenes_masks_captions_and_localization(tmp_path):
    write_multi_scenes_dataset(tmp_path, num_train=8, num_heldout=60, shard_size=100)
    samples = _samples(tmp_path / "heldout")
    counts = set()
    for image, caption, meta in samples:
        objs = meta["objects"]
        counts.add(len(objs))
        assert len({o["colour"] for o in objs}) == len(objs)
        for o in objs:
            assert o["colour"] in caption and o["shape"] in caption and o["phrase"] == f"a {o['colour']} {o['shape']}"
            mask = rle_decode(o["mask_rle"], (32, 32))
            assert mask.sum() > 0
            drawn = np.abs(image[mask].astype(int) - np.array(COLOURS[o["colour"]])).sum(1) < 10
            assert drawn.mean() > 0.95  # the mask is where that object's colour is drawn
        assert meta["class_name"] == f"{objs[0]['colour']} {objs[0]['shape']}"
    assert counts == {2, 3}
    m = np.random.default_rng(0).random((32, 32)) > 0.5
    assert (rle_decode(rle_encode(m), (32, 32)) == m).all()
    cov = patch_coverage(np.pad(np.ones((4, 8), bool), ((0, 28), (0, 24))), 32, 4)
    assert cov[:2].tolist() == [1.0, 1.0] and cov[2:].sum() == 0

    good = localization(ColourModel(True), str(tmp_path / "heldout"))
    blind = localization(ColourModel(False), str(tmp_path / "heldout"))
    assert good["num_images"] == blind["num_images"] == 60
    assert 0.38 < good["chance"] < 0.5
    assert good["accuracy"] > 0.9 and good["patch_accuracy"] > 0.9
    # every patch to one phrase scores chance (up to objects skipped for covering no patch by half)
    assert abs(blind["accuracy"] - blind["chance"]) < 0.02
