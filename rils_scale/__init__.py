"""rils_scale: RILS image-text pre-training at scale (DeepSpeed ZeRO-3 x tensor parallel)."""
__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """Load a converted ``rils`` checkpoint as a single-process model (see rils_scale.checkpoint)."""
    from .checkpoint.load import load_model as _load
    return _load(path, device=device)
