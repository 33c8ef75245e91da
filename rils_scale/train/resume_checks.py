"""What a resume must match before any engine is built: the run's tokenizer and model.

The tokenizer is part of the run: its sha256 is recorded in ``config.json`` and in every
checkpoint's completeness marker (``rils_complete.json``). A resume whose tokenizer file has
another digest is refused, naming both files and digests (a tokenizer of the same vocabulary
size but other pieces trains on silently different token ids). The model configuration saved
with the checkpoint is compared field by field with this run's, and every difference is named
(instead of DeepSpeed's ``Error(s) in loading state_dict`` after the engine is built). Fields
that change no parameter and may legitimately change on resume (:data:`MAY_CHANGE_ON_RESUME`)
are reported, not refused.

A resume may also change the global batch (:func:`global_batch_change`): after a reshard
(``convert_checkpoint.py --format deepspeed --tensor-parallel N``) or a launch on another number
of GPUs, micro x accumulation x DP usually differs. Training continues correctly (step count,
schedule and data position carry over), but every step from then on sees another number of
samples, which changes the effective learning rate: the user hears it in one line.

Sources, first found wins: the tag's marker (or, for converter outputs, ``rils_weights.json``'s
client state), then the run's ``config.json`` (older checkpoints), then — tokenizer only — the
run's own ``tokenizer.model``, then the vocabulary size alone (runs from before digests).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..checkpoint import integrity
from .preflight import PreflightError, check_resume_vocabulary
from .run_dir import RUN_TOKENIZER, file_sha256

MAY_CHANGE_ON_RESUME = ("mask_ratio", "dropout", "logit_scale_init")
"""Model fields a resume may change: no parameter depends on them (logit_scale_init acts only at
initialisation; mask ratio and dropout change what a step computes, e.g. FLIP-style unmasked tuning)."""


def tag_metadata(tag_dir: Optional[str]) -> Dict[str, Any]:
    """The tag's marker JSON, completed by a weights-only checkpoint's client state; {} if none."""
    if not tag_dir:
        return {}
    meta = integrity.read_marker(tag_dir)
    from ..checkpoint.layout import WEIGHTS_ONLY_MARKER
    path = os.path.join(tag_dir, WEIGHTS_ONLY_MARKER)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                client = json.load(f).get("client_state", {})
        except (OSError, ValueError, AttributeError):
            client = {}
        for key, value in client.items() if isinstance(client, dict) else ():
            meta.setdefault(key, value)
    return meta


def read_run_config(output_dir: str) -> Dict[str, Any]:
    try:
        with open(os.path.join(output_dir, "config.json")) as f:
            value = json.load(f)
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _where(output_dir: str, tag: Optional[str], name: str) -> str:
    return os.path.join(output_dir, "checkpoints", tag, name) if tag else os.path.join(output_dir, name)


def check_tokenizer(output_dir: str, tag: Optional[str], meta: Dict[str, Any], tokenizer_path: str,
                    digest: str, vocab_size: int) -> None:
    """Refuse (``PreflightError``) a resume whose tokenizer is not the run's."""
    own = os.path.join(output_dir, RUN_TOKENIZER)
    config = read_run_config(output_dir)
    if meta.get("tokenizer_sha256"):
        expected, source = meta["tokenizer_sha256"], _where(output_dir, tag, integrity.COMPLETE_MARKER)
    elif config.get("tokenizer_sha256"):
        expected, source = config["tokenizer_sha256"], _where(output_dir, None, "config.json")
    elif os.path.isfile(own):
        expected, source = file_sha256(own), f"the run's copy {own}"
    else:  # a run from before digests, without its copy: the vocabulary size is all we know
        check_resume_vocabulary(output_dir, vocab_size, tokenizer_path)
        return
    if digest == expected:
        return
    own_note = ""
    if os.path.isfile(own) and os.path.abspath(own) != os.path.abspath(tokenizer_path):
        own_digest = file_sha256(own)
        own_note = f"; the run's copy {own} has sha256 {own_digest}" + (
            " (the right one: resume without --tokenizer to use it)" if own_digest == expected else "")
    if os.path.abspath(own) == os.path.abspath(tokenizer_path):
        advice = "the run's copy was replaced: pass the tokenizer the run was trained with as --tokenizer"
    else:
        advice = ("resume with the run's tokenizer (without --tokenizer: the run's own copy), or start a new run "
                  "(--start-over or another --output-dir) to train with this one")
    raise PreflightError(f"--resume: tokenizer {tokenizer_path} (sha256 {digest}) is not the tokenizer this run "
                         f"was trained with (sha256 {expected}, recorded in {source}){own_note}; {advice}")


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def model_differences(saved: Dict[str, Any], current: Dict[str, Any]
                      ) -> Tuple[List[Tuple[str, Any, Any]], List[Tuple[str, Any, Any]]]:
    """``(refused, allowed)`` lists of ``(field, saved value, current value)``; ``name`` is ignored."""
    from ..models.config import RILSConfig
    saved = RILSConfig.from_dict(json.loads(json.dumps(saved))).to_dict()  # fills fields added since
    a, b = _flatten(saved), _flatten(current)
    refused, allowed = [], []
    for key in sorted(set(a) | set(b)):
        if key == "name" or a.get(key) == b.get(key):
            continue
        (allowed if key in MAY_CHANGE_ON_RESUME else refused).append((key, a.get(key), b.get(key)))
    return refused, allowed


def check_model(output_dir: str, tag: Optional[str], meta: Dict[str, Any], current: Dict[str, Any],
                model_option: str) -> List[str]:
    """Refuse a resume whose model configuration differs; returns notes on allowed changes."""
    if isinstance(meta.get("model_config"), dict):
        saved, source = meta["model_config"], _where(output_dir, tag, integrity.COMPLETE_MARKER)
    elif isinstance(read_run_config(output_dir).get("model"), dict):
        saved, source = read_run_config(output_dir)["model"], _where(output_dir, None, "config.json")
    else:
        return []
    refused, allowed = model_differences(saved, current)
    if refused:
        fields = "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, a, b in refused)
        raise PreflightError(
            f"--resume: this run's model (--model {model_option}) is not the model the checkpoint was trained with "
            f"(preset {saved.get('name')!r}, {source}): {fields}. Resume with the run's options (see "
            f"{os.path.join(output_dir, 'config.json')}), or convert the weights for a new run")
    return [f"--resume: model {k} changes from {a!r} to {b!r} (allowed: no parameter depends on it)"
            for k, a, b in allowed]


@dataclass
class ResumeChoice:
    """What ``--resume`` will load, decided before the engine exists."""
    tag: Optional[str]
    """The tag to load; None: no checkpoint (the run starts at step 0)."""
    why: str
    """How it was chosen (``latest``, ``--resume-from 4``, ...)."""
    newer: List[str] = field(default_factory=list)
    """Tags newer than ``tag`` that a roll back moves into checkpoints/abandoned/ once it is loaded."""


def check_resume(cfg, tokenizer_path: str, tokenizer_digest: str, vocab_size: int, model_config: Dict[str, Any],
                 announce: bool) -> ResumeChoice:
    """Every rank: choose the tag, check tokenizer and model against it; all ranks agree on a refusal."""
    from ..parallel import comm
    from .rollback import choose_resume_tag
    checkpoints = os.path.join(cfg.output_dir, "checkpoints")
    error, choice, notes = None, None, []
    try:
        tag, why, newer = choose_resume_tag(checkpoints, cfg.resume_from)
        choice = ResumeChoice(tag, why, newer)
        meta = tag_metadata(os.path.join(checkpoints, tag) if tag else None)
        check_tokenizer(cfg.output_dir, tag, meta, tokenizer_path, tokenizer_digest, vocab_size)
        notes = check_model(cfg.output_dir, tag, meta, model_config, cfg.model)
    except ValueError as err:
        error = str(err)
    except SystemExit as err:
        error = str(err.code)
    if comm.any_rank(error is not None):
        raise PreflightError(error or "--resume: refused on another rank (see its message)")
    for note in notes if announce else ():
        print(f"[rils_scale] {note}", flush=True)
    return choice


def global_batch_change(run_dir: str, micro: int, accum: int, dp: int, step: int) -> Optional[str]:
    """A one-line warning when the global batch differs from the one recorded in ``run_dir``'s
    ``config.json`` (the run, or the run a converted checkpoint came from); None otherwise."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            before = json.load(f)
        old = int(before["global_batch_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # nothing recorded: nothing to compare
    new = micro * accum * dp
    if old == new:
        return None
    ds, parallel = before.get("deepspeed", {}), before.get("parallel", {})
    was = (f"micro {ds.get('train_micro_batch_size_per_gpu', '?')} x accumulation "
           f"{ds.get('gradient_accumulation_steps', '?')} x DP {parallel.get('data_parallel', '?')}")
    return (f"[rils_scale] warning: the global batch changes from {old} ({was}) to {new} (micro {micro} x "
            f"accumulation {accum} x DP {dp}) at step {step}: each step from here sees {new} samples; keep {old} "
            "with --micro-batch-size / --grad-accum, or scale --lr")
