"""The tiny preset against stored outputs: any change to initialisation, layer order or the
forward math shows up here (regenerate with `python tests/test_tiny_reference.py --update`
only when the change is intended, and say why in the commit)."""
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "data", "tiny_outputs.json")


def tiny_outputs():
    from rils_scale.models import build_model, get_config
    from rils_scale.objectives import LossConfig, RILSLoss
    torch.manual_seed(0)
    cfg = get_config("tiny")
    cfg.text.activation = "gelu"  # the stored outputs predate the per-tower activation (GELU then)
    model = build_model(cfg, attn_backend="math")
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 32, 32, generator=g)
    ids = torch.randint(4, cfg.text.vocab_size, (4, cfg.text.context_length), generator=g)
    ids[:, 0], ids[:, 10:] = 2, 0
    ids[:, 9] = 3
    with torch.no_grad():
        out = model(images, ids, mask_generator=torch.Generator().manual_seed(2))
        loss, metrics = RILSLoss(LossConfig(kl_backend="reference", retrieval_filter=False))(out)
    return {
        "num_params": sum(p.numel() for p in model.parameters()),
        "image_features_0": out["image_features"][0, :6].tolist(),
        "text_features_0": out["text_features"][0, :6].tolist(),
        "student_patches_sum": out["student_patches"].double().sum().item(),
        "masked": out["mask"].sum().item(),
        "loss": loss.item(),
        "clip_loss": metrics["clip_loss"].item(),
        "recon_loss": metrics["recon_loss_share"].item(),
    }


def test_tiny_matches_stored_outputs():
    with open(REFERENCE) as f:
        stored = json.load(f)
    got = tiny_outputs()
    assert got["num_params"] == stored["num_params"] and got["masked"] == stored["masked"]
    for key in ("image_features_0", "text_features_0"):
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(stored[key]), rtol=1e-4, atol=1e-5)
    for key in ("student_patches_sum", "loss", "clip_loss", "recon_loss"):
        assert abs(got[key] - stored[key]) <= 1e-4 * max(1.0, abs(stored[key])), (key, got[key], stored[key])


if __name__ == "__main__" and "--update" in sys.argv:
    with open(REFERENCE, "w") as f:
        json.dump(tiny_outputs(), f, indent=1)
    print("wrote", REFERENCE)
