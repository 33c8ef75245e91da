"""Exports are folders that travel: moved and copied, each still loads with its library's own
one-liner and computes what ``rils_scale.load_model`` computes.

No training run is needed: a seeded, randomly initialised model (every weight perturbed, so
biases and norms matter) is written as a ``rils`` export and converted from there by the
converter's command line, as a user would.

- OpenCLIP, default towers (exact-GELU vision, QuickGELU text) of a shape timm has a name for:
  the trunk is named ``vit_tiny_patch16_224``, the folder holds no path; after ``mv`` and ``cp``,
  ``open_clip.create_model_and_transforms("local-dir:NEW")`` + ``get_tokenizer`` give the same
  ids and embeddings (1e-5), from another working directory;
- OpenCLIP, towers sharing an activation: OpenCLIP's own ViT, relocatable as well;
- OpenCLIP, the ``tiny`` preset (no timm name has its shape): the converter warns that the
  folder is tied to its path, loading the moved copy fails, ``relocate`` fixes it;
- timm and ``rils`` exports after moving, and the timm config names an architecture honestly;
- the table of timm names the OpenCLIP export relies on, against timm itself.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from random_models import config as _config, rils_dir as _rils_dir, tokenizer as _tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _convert(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "launchers", "convert_checkpoint.py"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})


def _launcher(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "launchers", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _travel(folder, tmp_path, name, copy=True):
    """``mv folder A/name`` (and ``cp -r A/name B/name``): the original path no longer exists."""
    moved, copied = tmp_path / "moved" / name, tmp_path / "copied" / name
    moved.parent.mkdir(exist_ok=True)
    shutil.move(str(folder), moved)
    assert not os.path.exists(folder)
    if not copy:
        return [moved]
    copied.parent.mkdir(exist_ok=True)
    shutil.copytree(moved, copied)
    return [moved, copied]


TEXTS = ["a red circle left of the blue square", "two small green triangles", "", "A RED Circle"]


def _ours(rils_dir, size):
    from rils_scale import load_model
    model = load_model(rils_dir)
    torch.manual_seed(1)
    images = torch.randn(3, 3, size, size)
    ids = model.tokenize(TEXTS)
    with torch.no_grad():
        return model, images, ids, model.encode_image(images), model.encode_text(ids)


def _check_open_clip(folder, images, ids, image_ref, text_ref):
    import open_clip
    clip, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")  # the README's one-liner
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    clip.eval()
    theirs_ids = tokenizer(TEXTS)
    assert torch.equal(theirs_ids, ids)
    with torch.no_grad():
        for theirs, ours in ((clip.encode_image(images), image_ref), (clip.encode_text(theirs_ids), text_ref)):
            scale = ours.abs().max().item()
            assert scale > 0.05
            torch.testing.assert_close(theirs, ours, atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.slow
def test_exports_load_after_moving_and_copying(tmp_path, monkeypatch, capsys):
    pytest.importorskip("open_clip")
    import timm
    from rils_scale import load_model
    from rils_scale.checkpoint.export import export
    from rils_scale.checkpoint.sources import open_source
    tok, vocab = _tokenizer(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    # 1. the default towers (GELU vision, QuickGELU text) in a shape timm names: relocatable
    vision = dict(image_size=224, patch_size=16, width=192, depth=12, heads=3)
    src = _rils_dir(str(tmp_path / "rils_vit_tiny"), _config(vocab, vision), tok)
    out = tmp_path / "oc_vit_tiny"
    proc = _convert("--checkpoint", src, "--format", "open_clip", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "vit_tiny_patch16_224" in proc.stdout and "warning" not in proc.stderr
    with open(out / "open_clip_config.json") as f:
        config = json.load(f)
    assert config["model_cfg"]["vision_cfg"]["timm_model_name"] == "vit_tiny_patch16_224"
    assert str(tmp_path) not in json.dumps(config["model_cfg"])  # no path to the place it was written
    assert not (out / "timm_trunk").exists()
    model, images, ids, image_ref, text_ref = _ours(src, 224)
    monkeypatch.chdir(elsewhere)  # timm resolves relative trunk paths against the working directory
    for folder in _travel(out, tmp_path, "oc_vit_tiny"):
        _check_open_clip(folder, images, ids, image_ref, text_ref)

    # the timm and rils exports of the same model travel too
    export(open_source(src), "timm", str(tmp_path / "timm_vit_tiny"))
    export(open_source(src), "rils", str(tmp_path / "rils_copy"))
    with open(tmp_path / "timm_vit_tiny" / "config.json") as f:
        hub = json.load(f)
    assert hub["architecture"] == "vit_tiny_patch16_224" and "own timm architecture" in hub["architecture_note"]
    for folder in _travel(tmp_path / "timm_vit_tiny", tmp_path, "timm_vit_tiny", copy=False):
        vit = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(vit(images), image_ref, atol=1e-5 * image_ref.abs().max().item(), rtol=1e-5)
    for folder in _travel(tmp_path / "rils_copy", tmp_path, "rils_copy", copy=False):
        with torch.no_grad():
            assert torch.equal(load_model(str(folder)).encode_image(images), image_ref)

    # 2. towers sharing an activation: OpenCLIP's own ViT, relocatable
    src = _rils_dir(str(tmp_path / "rils_same"), _config(vocab, text_activation="gelu"), tok)
    out = tmp_path / "oc_same"
    export(open_source(src), "open_clip", str(out))
    with open(out / "open_clip_config.json") as f:
        assert "timm_model_name" not in json.load(f)["model_cfg"]["vision_cfg"]
    model, images, ids, image_ref, text_ref = _ours(src, 32)
    for folder in _travel(out, tmp_path, "oc_same"):
        _check_open_clip(folder, images, ids, image_ref, text_ref)

    # 3. the tiny preset: no timm architecture has its shape -> a path, said out loud, and relocate
    src = _rils_dir(str(tmp_path / "rils_tiny"), _config(vocab), tok)
    out = tmp_path / "oc_tiny"
    convert = _launcher("convert_checkpoint")  # the converter's main(), in this process (saves a start-up)
    assert convert.main(["--checkpoint", src, "--format", "open_clip", "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: this OpenCLIP export loads only from" in err and "open_clip_export relocate" in err
    model, images, ids, image_ref, text_ref = _ours(src, 32)
    moved, copied = _travel(out, tmp_path, "oc_tiny")
    import open_clip
    with pytest.raises(Exception, match="timm_trunk"):
        open_clip.create_model_and_transforms(f"local-dir:{copied}")
    from rils_scale.checkpoint.open_clip_export import main as open_clip_export_main
    assert open_clip_export_main(["relocate", str(copied)]) == 0  # python -m rils_scale.checkpoint.open_clip_export
    _check_open_clip(copied, images, ids, image_ref, text_ref)
    # the tiny timm export: honest about the architecture name, and it still loads
    export(open_source(src), "timm", str(tmp_path / "timm_tiny"))
    with open(tmp_path / "timm_tiny" / "config.json") as f:
        hub = json.load(f)
    assert hub["architecture"] == "vit_tiny_patch16_224"
    assert hub["architecture_note"].startswith("not a vit_tiny_patch16_224") and "2 blocks, width 64" in \
        hub["architecture_note"]
    vit = timm.create_model(f"local-dir:{tmp_path / 'timm_tiny'}", pretrained=True).eval()
    assert len(vit.blocks) == 2 and vit.embed_dim == 64 and vit.head.out_features == 64
    with torch.no_grad():
        torch.testing.assert_close(vit(images), image_ref, atol=1e-5 * image_ref.abs().max().item(), rtol=1e-5)


def test_timm_registry_table_is_timm(tmp_path):
    """Every name the exports use without model arguments builds exactly the RILS encoder of
    that shape (same modules, shapes and pooling), as OpenCLIP's TimmModel builds it."""
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer
    from rils_scale.checkpoint.timm_format import TIMM_REGISTRY_VITS, timm_model_kwargs, timm_registry_name
    attrs = ("global_pool", "num_prefix_tokens", "no_embed_class", "dynamic_img_size", "pool_include_prefix",
             "has_class_token")
    for name, (patch, width, depth, heads, hidden, size) in TIMM_REGISTRY_VITS.items():
        cfg = _config(100, dict(image_size=size, patch_size=patch, width=width, depth=depth, heads=heads,
                                mlp_ratio=hidden / width))
        assert cfg.vision.mlp_hidden == hidden and timm_registry_name(cfg) == name
        with torch.device("meta"):  # shapes and structure only: no memory, no init cost
            theirs = timm.create_model(name, pretrained=False)
            theirs.reset_classifier(0, global_pool="avg")  # what OpenCLIP's TimmModel does
            ours = VisionTransformer(**timm_model_kwargs(cfg, num_classes=0))
        assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in
                                                                         ours.state_dict().items()}, name
        assert repr(theirs) == repr(ours), name
        assert [getattr(theirs, a) for a in attrs] == [getattr(ours, a) for a in attrs], name
    # no name for a QuickGELU vision tower or another resolution
    cfg = _config(100, dict(image_size=224, patch_size=16, width=192, depth=12, heads=3, activation="quick_gelu"))
    assert timm_registry_name(cfg) is None
    assert timm_registry_name(_config(100, dict(image_size=160, patch_size=16, width=192, depth=12, heads=3))) is None
