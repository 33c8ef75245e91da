"""Model configuration dataclasses (one documented line per field)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict


@dataclass
class VisionConfig:
    image_size: int = 224
    """Input resolution (square)."""
    patch_size: int = 16
    """Side of a square patch."""
    width: int = 768
    """Encoder width D."""
    depth: int = 12
    """Encoder blocks."""
    heads: int = 12
    """Attention heads (split over TP ranks)."""
    mlp_ratio: float = 4.0
    """MLP hidden = width x mlp_ratio (split over TP ranks)."""
    decoder_depth: int = 1
    """RILS decoder blocks (the official code uses one, as wide as the encoder)."""
    layer_norm_eps: float = 1e-6
    """LayerNorm eps of the release."""
    activation: str = "gelu"
    """MLP activation: gelu (exact, the release's ViT) | quick_gelu (x * sigmoid(1.702 x))."""

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.width * self.mlp_ratio))


@dataclass
class TextConfig:
    context_length: int = 77
    """Tokens per caption, start and end tokens included."""
    vocab_size: int = 49408
    """Vocabulary size; replaced by the tokenizer's at build time."""
    width: int = 512
    """Text transformer width."""
    depth: int = 12
    """Text transformer blocks."""
    heads: int = 8
    """Attention heads (split over TP ranks)."""
    mlp_ratio: float = 4.0
    """MLP hidden = width x mlp_ratio."""
    layer_norm_eps: float = 1e-5
    """LayerNorm eps (CLIP text tower)."""
    pad_id: int = 0
    """Padding id; the sentence embedding is read at the last non-pad token (end of text)."""
    activation: str = "quick_gelu"
    """MLP activation: quick_gelu as CLIP and the RILS release | gelu (exact). Configs saved
    before this field existed load as gelu (what they were trained with): see from_dict."""

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.width * self.mlp_ratio))


@dataclass
class SemMIMConfig:
    """The parts of the model only the SemMIM recipe builds (docs/method.md, "SemMIM")."""

    num_codes: int = 4096
    """K: learnable codes (prototypes) of the shared encoding space."""
    code_dim: int = 0
    """Width of the code space (the head's projection and the codes); 0: the joint width embed_dim."""
    target_text_injection: bool = True
    """Fuse the momentum patches with the caption (cross-attention block) before the code head;
    the online predictions go through the same block (its EMA is the momentum copy)."""


@dataclass
class RILSConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    """Vision tower and decoder."""
    text: TextConfig = field(default_factory=TextConfig)
    """Text tower."""
    embed_dim: int = 512
    """Joint image-text width (image_projection: vision width -> embed_dim)."""
    mask_ratio: float = 0.75
    """Fraction of patches hidden from the masked pass."""
    logit_scale_init: float = math.log(1 / 0.07)
    """Initial CLIP logit scale (log)."""
    logit_scale_max: float = math.log(100.0)
    """Cap of the log logit scale: the parameter is clamped in place after each optimizer step
    (train/param_clamp.py) and, as a safety, in forward."""
    recon_target: str = "language"
    """Masked-modelling target: language (RILS: patch-sentence distributions) | pixel (MAE's
    per-patch normalised pixels, through a linear pixel head) | vision (the unmasked pass's
    final-normed patch features, no text prototypes). The last two are the paper's baselines."""
    decoder_text_conditioning: bool = False
    """Decoder blocks cross-attend to the caption's token features (SemMIM's text injection;
    off in RILS)."""
    recipe: str = "rils"
    """rils (the default: RILS's patch-sentence target) | semmim (momentum encoder, K-code
    targets with text injection, agreement of global features; models/semmim.py)."""
    semmim: SemMIMConfig = field(default_factory=SemMIMConfig)
    """SemMIM's code head and text fusion (read only when recipe == semmim)."""
    dropout: float = 0.0
    """Dropout on attention probabilities and block outputs (0 in the release)."""
    name: str = "custom"
    """Preset the config came from."""

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RILSConfig":
        d = dict(d)
        # A saved config without "activation" predates the field: it was built with exact GELU.
        vision = VisionConfig(**{"activation": "gelu", **d.pop("vision", {})})
        text = TextConfig(**{"activation": "gelu", **d.pop("text", {})})
        semmim = SemMIMConfig(**d.pop("semmim", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(vision=vision, text=text, semmim=semmim, **{k: v for k, v in d.items() if k in known})
