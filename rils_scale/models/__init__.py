"""Model math: attention, transformer blocks, towers, the RILS and SemMIM models and their presets."""
from .config import RILSConfig, SemMIMConfig, TextConfig, VisionConfig
from .presets import get_config, list_presets
from .rils import MASK_STRATEGIES, RILS
from .transformer import ParallelSpec

RECIPES = ("rils", "semmim")


def build_model(cfg: RILSConfig, spec: ParallelSpec = None, attn_backend: str = "auto") -> RILS:
    """Build the model of ``cfg.recipe`` (RILS, or SemMIM: RILS's towers + momentum branch);
    ``spec`` chooses TP / sequence parallel / activation checkpointing."""
    recipe = getattr(cfg, "recipe", "rils")
    if recipe == "semmim":
        from .semmim import SemMIM
        return SemMIM(cfg, spec or ParallelSpec(), attn_backend=attn_backend)
    if recipe != "rils":
        raise ValueError(f"unknown recipe {recipe!r}; choose from {RECIPES}")
    return RILS(cfg, spec or ParallelSpec(), attn_backend=attn_backend)
