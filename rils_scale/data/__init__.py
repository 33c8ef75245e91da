"""Data side of rils_scale: shards, the SentencePiece tokenizer, transforms and loaders.

Modules, one concern each:
    shards              write LAION / img2dataset-layout tar shards
    builtin             the built-in captioned-digits dataset (demo, tests)
    tokenizer_training  train the SentencePiece model (no torch import)
    tokenizer           the [sot, tokens, eot, pad] encoder used by loaders and model
    decode              safe member decoding (images, text, JSON; never pickle), skip reasons
    sources             shard URL expansion and the fault-tolerant, seekable tar sample reader
    dealing             which shards each stream reads (balanced by img2dataset sample counts)
    loader_state        the loader's state in checkpoints and the resume plan
    seeding             process-independent seeds
    transforms          train / eval image transforms with per-sample seeded augmentation
    pipeline            the training and evaluation loaders
See docs/data.md. Names are imported lazily, so ``launchers/make_shards.py`` and
``launchers/train_tokenizer.py`` start without importing torch or torchvision.
"""
from importlib import import_module

_EXPORTS = {
    "class_names": "builtin", "write_builtin_dataset": "builtin", "zero_shot_templates": "builtin",
    "SKIP_REASONS": "decode", "BadSample": "decode", "decode_image": "decode", "to_rgb": "decode",
    "TimedLoader": "pipeline", "build_eval_loader": "pipeline", "build_train_loader": "pipeline",
    "ShardWriter": "shards", "encode_image": "shards",
    "expand_urls": "sources", "iter_tar_samples": "sources",
    "Tokenizer": "tokenizer", "train_tokenizer": "tokenizer_training",
    "validate_train_data": "pipeline", "read_loader_states": "loader_state",
    "write_loader_state": "loader_state", "prepare_images": "transforms", "CropResize": "transforms",
    "CLIP_MEAN": "transforms", "CLIP_STD": "transforms", "eval_transform": "transforms",
    "train_transform": "transforms",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
