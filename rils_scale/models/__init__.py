"""Model math: attention, transformer blocks, towers, the RILS model and its presets."""
from .config import RILSConfig, TextConfig, VisionConfig
from .presets import get_config, list_presets
from .rils import MASK_STRATEGIES, RILS
from .transformer import ParallelSpec


def build_model(cfg: RILSConfig, spec: ParallelSpec = None, attn_backend: str = "auto") -> RILS:
    """Build a RILS model; ``spec`` chooses TP / sequence parallel / activation checkpointing."""
    return RILS(cfg, spec or ParallelSpec(), attn_backend=attn_backend)
