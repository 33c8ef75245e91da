"""The patch-sentence maps read at a glance: regions labelled by number (no colour coding that
could clash with the colours the phrases name), achromatic legend badges, heat maps with a
colour bar, and the demo's background phrase."""
import numpy as np
import torch
from PIL import Image

from rils_scale.eval.localization import map_phrases
from rils_scale.eval.visualize import _heat, render_maps

CELL, PAD, TITLE = 128, 8, 34


def test_maps_use_numbers_not_colours_and_have_a_colour_bar():
    grid = 8
    probs = torch.zeros(1, grid * grid, 2)
    left = (torch.arange(grid * grid) % grid) < grid // 2
    probs[0, left, 0], probs[0, ~left, 1] = 0.9, 0.9  # left half -> phrase 1, right half -> phrase 2
    probs[0, left, 1], probs[0, ~left, 0] = 0.1, 0.1
    image = Image.new("RGB", (32, 32), (40, 80, 220))  # "a blue triangle": the legend must not say yellow
    out = np.asarray(render_maps([image], probs, ["a red ring", "a blue triangle"], cell=CELL)).astype(int)

    region = out[PAD + TITLE:PAD + TITLE + CELL, 2 * PAD + CELL:2 * PAD + 2 * CELL]
    assert (region[:, CELL // 2:CELL // 2 + 2] == 255).all()  # the border between the two halves: white
    assert (region[:, CELL // 2 - 1] == 0).all()  # edged in black (visible on white objects too)
    grey = (np.abs(region - region.mean(axis=2, keepdims=True)) < 1).all(axis=2)
    assert grey[:, :CELL // 2 - 4].mean() < 0.5 and grey[:, CELL // 2 + 4:].mean() < 0.5  # the image shows through
    legend = out[PAD + TITLE + CELL + 2:PAD + TITLE + CELL + 2 * 18 + 6]
    assert (legend.max(axis=2) - legend.min(axis=2)).max() == 0  # badges and text: black, white, greys only

    bar_x = out.shape[1] - PAD - 44
    for row in (2, CELL // 2, CELL - 3):  # viridis from 1 (top) to 0 (bottom)
        want = _heat(np.array(1 - row / (CELL - 1))).astype(int)
        assert np.abs(out[PAD + TITLE + row, bar_x + 5] - want).max() <= 1, row


def test_background_phrase_per_scene():
    meta = {"objects": [{"phrase": "a red ring"}, {"phrase": "a blue cross"}], "background": "black"}
    assert map_phrases(meta) == ["a red ring", "a blue cross"]
    assert map_phrases(meta, "the {} background") == ["a red ring", "a blue cross", "the black background"]
    assert map_phrases({"objects": []}, "the {} background") == ["the background"]
