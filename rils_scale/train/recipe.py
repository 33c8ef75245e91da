"""Training recipes: ``rils`` (the default) and ``semmim``, selected with ``--recipe``.

The trainer (``train/loop.py``) calls four things here and nothing else differs between recipes:

- :func:`apply_recipe_defaults` (from ``parse_args``): SemMIM's defaults for the options it shares
  with RILS, unless given on the command line: ``--mask-strategy text-guided`` and
  ``--decoder-text-conditioning`` (SemMIM's text-guided masking and text fusion in masked
  modelling);
- :func:`configure_model`: the model config of the recipe (``recipe``, ``semmim.num_codes``,
  ``semmim.target_text_injection``);
- :func:`attach` after the engine exists: SemMIM's objective, its momentum EMA
  (``train/ema.py``) and a checkpoint hook; returns an object with ``after_step(step)`` (EMA
  after each applied optimizer step) and ``after_resume(point)`` (EMA and centres back from the
  checkpoint), or ``None`` for RILS.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable, Optional, Sequence

import torch

RECIPES = ("rils", "semmim")
SEMMIM_DEFAULTS = {"mask_strategy": "text-guided", "decoder_text_conditioning": True}
"""Options SemMIM sets unless the command line gives them (docs/method.md, "SemMIM")."""

log = logging.getLogger("rils_scale.train")


def explicit_options(parser, argv: Optional[Sequence[str]]) -> set:
    """The ``dest`` of every option written on the command line (``--flag`` or ``--flag=value``)."""
    import sys
    strings = parser._option_string_actions  # argparse's own table: option string -> action
    given = set()
    for token in (sys.argv[1:] if argv is None else argv):
        if token.startswith("--"):
            action = strings.get(token.split("=", 1)[0])
            if action is not None:
                given.add(action.dest)
    return given


def apply_recipe_defaults(cfg, explicit: Iterable[str]) -> None:
    """Check ``--recipe`` and fill in the recipe's defaults for options not given explicitly."""
    if cfg.recipe not in RECIPES:
        raise SystemExit(f"--recipe must be one of {RECIPES}")
    if cfg.recipe != "semmim":
        return
    explicit = set(explicit)
    for key, value in SEMMIM_DEFAULTS.items():
        if key not in explicit:
            setattr(cfg, key, value)
    if cfg.recon_target != "language":
        raise SystemExit("--recon-target applies to --recipe rils; SemMIM's targets are the momentum encoder's codes")
    if not 0.0 <= cfg.ema_momentum <= 1.0 or not 0.0 <= cfg.center_momentum <= 1.0:
        raise SystemExit("--ema-momentum and --center-momentum must lie in [0, 1]")


def configure_model(cfg, model_cfg) -> None:
    """The model config of the recipe (before the engine is built)."""
    model_cfg.recipe = cfg.recipe
    if cfg.recipe == "semmim":
        if cfg.num_codes:
            model_cfg.semmim.num_codes = cfg.num_codes
        model_cfg.semmim.target_text_injection = not cfg.no_target_text_injection


class SemMIMRecipe:
    """SemMIM's pieces around the shared loop: objective, momentum EMA, checkpoint state."""

    def __init__(self, trainer):
        from ..objectives.semmim_loss import SemMIMLoss, SemMIMLossConfig
        from .ema import MomentumEMA
        cfg, state = trainer.cfg, trainer.state
        self.trainer = trainer
        self.objective = SemMIMLoss(SemMIMLossConfig(
            student_temp=cfg.student_temp, teacher_temp=cfg.teacher_temp, mim_weight=cfg.recon_weight,
            agreement_weight=cfg.agreement_weight, center_momentum=cfg.center_momentum),
            trainer.model_cfg.semmim.num_codes, dp_group=state.dp_group,
            tp_group=state.tp_group if state.tp_size > 1 else None).to(trainer.device)
        self.ema = MomentumEMA(trainer.engine.module, cfg.ema_momentum, cfg.max_steps)
        previous = trainer.write_checkpoint_extra

        def write_extra(tag_dir: str) -> None:
            if previous is not None:
                previous(tag_dir)
            self.write(tag_dir)
        trainer.write_checkpoint_extra = write_extra

    def _path(self, tag_dir: str) -> str:
        from .ema import rank_state_path
        st = self.trainer.state
        return rank_state_path(tag_dir, st.dp_rank, st.tp_rank)

    def after_step(self, step: int) -> None:
        """After applied optimizer step ``step`` (0-based): the momentum encoder follows."""
        self.ema.update(step)

    def write(self, tag_dir: str) -> None:
        st = self.trainer.state
        centers = {"center.global": self.objective.center_global, "center.patch": self.objective.center_patch}
        self.ema.write(self._path(tag_dir), centers, step=self.trainer.step, dp_size=st.dp_size, tp_size=st.tp_size)

    def after_resume(self, point) -> None:
        if point is None:
            return
        st = self.trainer.state
        from ..checkpoint.resume import weights_only_tag_dir
        if weights_only_tag_dir(point.path):  # converted checkpoint: momentum weights in the TP file
            self._from_weights_only(point.path)
            return
        centers = self.ema.load(self._path(point.path), step=point.step, dp_size=st.dp_size, tp_size=st.tp_size)
        with torch.no_grad():
            self.objective.center_global.copy_(centers["center.global"])
            self.objective.center_patch.copy_(centers["center.patch"])

    def _from_weights_only(self, tag_dir: str) -> None:
        import json
        from safetensors import safe_open
        from ..checkpoint.layout import WEIGHTS_ONLY_MARKER
        st = self.trainer.state
        with open(os.path.join(tag_dir, WEIGHTS_ONLY_MARKER)) as f:
            files = json.load(f)["files"]
        with safe_open(os.path.join(tag_dir, files[st.tp_rank]), framework="pt", device="cpu") as f:
            tensors = {s.name: f.get_tensor(s.name) for s in self.ema.slots}
        self.ema.load_full_local(tensors, st.dp_rank, st.dp_size)
        if self.trainer.is_main:
            print("[rils_scale] resumed a converted (weights-only) checkpoint: momentum encoder restored from its fp32 "
                  "weights; the teacher centres restart from zero", flush=True)


def attach(trainer) -> Optional[SemMIMRecipe]:
    """Install the recipe's objective and hooks on ``trainer``; ``None`` for RILS."""
    if trainer.cfg.recipe != "semmim":
        return None
    recipe = SemMIMRecipe(trainer)
    trainer.objective = recipe.objective
    return recipe
