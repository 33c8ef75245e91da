"""Training configuration: one dataclass, one documented line per field, and its CLI."""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import List, Optional

from ..models.rils import MASK_STRATEGIES


@dataclass
class TrainConfig:
    # --- model
    model: str = "tiny"
    """Model preset (rils_scale.models.list_presets())."""
    attn_backend: str = "auto"
    """Attention backend: auto | flash_attn | sdpa | math."""
    # --- data
    train_data: str = ""
    """Training shards: a directory of .tar, a brace pattern, pipe: URLs, or '::'-separated list."""
    tokenizer: str = ""
    """SentencePiece model (launchers/train_tokenizer.py); --resume: default the run's own copy."""
    num_workers: int = 2
    """DataLoader workers per rank."""
    shuffle_buffer: int = 1000
    """Samples in the shuffle buffer of each worker."""
    resampled: bool = False
    """Draw shards with replacement (multi-node: no epoch boundaries, no shard-count limit)."""
    data_wait_warning_s: float = 60.0
    """Warn every this many seconds while a rank waits for a batch (0: never)."""
    # --- optimisation (batch sizes and optimizer hyper-parameters live in the DeepSpeed config)
    max_steps: int = 1000
    """Optimizer steps of the whole schedule."""
    warmup_steps: int = 100
    """Linear warm-up steps, then cosine decay to min_lr."""
    min_lr: float = 1e-6
    """Final learning rate of the cosine schedule."""
    lr: Optional[float] = None
    """Override of the DeepSpeed config's optimizer lr."""
    weight_decay: Optional[float] = None
    """Override of the DeepSpeed config's weight decay (norms, biases, embeddings, tokens and
    logit scale are always exempt)."""
    micro_batch_size: Optional[int] = None
    """Override of train_micro_batch_size_per_gpu."""
    grad_accum: Optional[int] = None
    """Override of gradient_accumulation_steps."""
    precision: str = "config"
    """config (as the DeepSpeed JSON says; on a CPU without native bf16, fp32 instead of its bf16) | bf16 | fp32."""
    # --- method
    mask_ratio: float = 0.75
    """Fraction of patches hidden from the masked pass."""
    mask_strategy: str = "random"
    """random (MAE shuffle) | text-guided (SemMIM-style, from patch-caption similarity)."""
    mask_temperature: float = 0.1
    """Temperature of text-guided masking (lower: mask the most caption-relevant patches)."""
    recon_weight: float = 0.5
    """Weight of the reconstruction loss."""
    student_temp: float = 0.1
    """tau_s."""
    teacher_temp: float = 0.04
    """tau_t (teacher is stop-gradient)."""
    prototype_grad: bool = False
    """Text prototypes take gradient from the reconstruction loss (off in the official code)."""
    no_retrieval_filter: bool = False
    """Reconstruct every sample, not only correctly retrieved ones."""
    kl_backend: str = "auto"
    """patch_sentence_kl backend: one of rils_scale.ops.BACKENDS (auto: fastest self-checked, measured)."""
    recon_target: str = "language"
    """Masked-modelling target: language (RILS) | pixel (MAE normalised pixels) | vision (unmasked
    pass's patch features); the last two are the paper's baselines."""
    decoder_text_conditioning: bool = False
    """Decoder blocks cross-attend to the caption's token features (SemMIM-style)."""
    recipe: str = "rils"
    """rils (default) | semmim: momentum encoder, K-code targets with text injection, agreement
    of global features; also sets --mask-strategy text-guided and --decoder-text-conditioning
    unless given (docs/method.md, SemMIM). Shared: --recon-weight (MIM), --student-temp, --teacher-temp."""
    num_codes: int = 0
    """SemMIM: K, codes of the shared encoding space (0: the preset's, 4096; tiny 256)."""
    agreement_weight: float = 0.5
    """SemMIM: weight of the agreement of global features (0: no agreement learning)."""
    no_target_text_injection: bool = False
    """SemMIM: code targets from the momentum patches without fusing the caption (ablation)."""
    ema_momentum: float = 0.996
    """SemMIM: momentum encoder EMA, cosine from this to 1 over --max-steps (DINO/iBOT)."""
    center_momentum: float = 0.9
    """SemMIM: momentum of the teacher centres (DINO/iBOT)."""
    # --- parallelism
    tensor_parallel: int = 1
    """Tensor-parallel ranks (consecutive ranks, inside a node)."""
    sequence_parallel: bool = False
    """Sequence parallelism inside TP groups."""
    activation_checkpointing: str = field(default="auto", metadata={
        "choices": ("none", "selective", "every", "auto"), "const": "every"})
    """Recompute blocks in backward: none | selective (the fewest blocks of each stack that fit) | every |
    auto (the planner's pick for this device's memory and micro-batch, printed at start; CPU: none);
    the flag alone means every (docs/performance.md)."""
    compile: bool = False
    """Compile each transformer block with torch.compile (regional, fullgraph; docs/performance.md)."""
    # --- run management
    output_dir: str = "runs/rils"
    """Run directory: metrics.jsonl, TensorBoard events, config.json, checkpoints/."""
    seed: int = 0
    """Seed of weights, masks and augmentation."""
    log_every: int = 10
    """Steps between logged metrics."""
    save_every: int = 1000
    """Steps between checkpoints (a final one is written at max_steps unless --no-final-checkpoint)."""
    no_final_checkpoint: bool = False
    """Skip the checkpoint at max_steps (benchmarks: a run that is thrown away; signals still save)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept (older ones are deleted); 0 keeps all."""
    resume: bool = False
    """Continue from checkpoints/latest if it names a complete tag, else the newest complete one (fresh start if none)."""
    resume_from: str = ""
    """Roll back: resume from this complete tag or step (global_stepN or N); newer tags move to
    checkpoints/abandoned/<UTC time>/ (implies --resume; docs/checkpoints.md)."""
    skip_batches: str = ""
    """START:END[,START:END...]: batches (batches_consumed numbering, END exclusive) read and dropped,
    never trained on; recorded in later checkpoints."""
    start_over: bool = False
    """Fresh start in a directory that holds a run: first move its files to
    output_dir/previous_runs/<UTC time>/ (nothing is deleted)."""
    exit_after_steps: int = 0
    """Checkpoint and exit after this many steps of this invocation (preemptible clusters)."""
    trust_pickle: bool = False
    """--resume: fully unpickle DeepSpeed files the allowlisting reader refuses (runs code: own files only)."""
    max_nonfinite_steps: int = 20
    """Stop (exit 3, no checkpoint) after this many consecutive non-finite loss/grad-norm steps; 0: never."""
    collective_timeout_s: float = 600.0
    """Process-group timeout: a collective waiting on a dead rank fails after this (no hang)."""
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s per device for MFU (default: GPU datasheet table; CPUs: no MFU without it)."""
    visualize_every: int = 0
    """Steps between patch-sentence probability maps logged to TensorBoard (0: never)."""
    ds_config: str = ""
    """DeepSpeed JSON config."""
    local_rank: int = -1
    """Set by the deepspeed launcher."""

    def to_dict(self):
        return dataclasses.asdict(self)


def _field_help(cls) -> dict:
    """Docstrings under fields become --help text (parsed from the source once)."""
    import ast
    import inspect
    import textwrap
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    out = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            out[node.target.id] = " ".join(str(nxt.value.value).split())
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="RILS pre-training: deepspeed --num_gpus N launchers/pretrain.py --ds_config "
                    "ds_configs/zero3.json ... (also torchrun --nproc_per_node N, or plain python for one rank)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = _field_help(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        names = [flag] + (["--" + f.name] if "_" in f.name else [])
        kw = dict(dest=f.name, help=helps.get(f.name, ""))
        if "choices" in f.metadata:  # an enumerated option; with "const", the bare flag means it
            extra = dict(nargs="?", const=f.metadata["const"]) if "const" in f.metadata else {}
            parser.add_argument(*names, default=f.default, choices=f.metadata["choices"], **extra, **kw)
            continue
        if f.type in ("bool", bool):
            parser.add_argument(*names, action="store_true", **kw)
            continue
        typ = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[float]": float}[str(f.type)]
        parser.add_argument(*names, type=typ, default=f.default, **kw)
    return parser


def parse_args(argv: Optional[List[str]] = None) -> TrainConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = TrainConfig(**vars(args))
    from .recipe import apply_recipe_defaults, explicit_options
    apply_recipe_defaults(cfg, explicit_options(parser, argv))
    if cfg.mask_strategy not in MASK_STRATEGIES:
        raise SystemExit(f"--mask-strategy must be one of {MASK_STRATEGIES}")
    from ..models.rils import RECON_TARGETS
    if cfg.recon_target not in RECON_TARGETS:
        raise SystemExit(f"--recon-target must be one of {RECON_TARGETS}")
    if cfg.precision not in ("config", "bf16", "fp32"):
        raise SystemExit("--precision must be config, bf16 or fp32")
    from .options import validate_options
    validate_options(cfg)  # ranges (seed >= 0, log_every >= 1, ...): before any process group
    from .run_dir import check_run_options
    check_run_options(cfg)
    return cfg


def load_ds_config(cfg: TrainConfig) -> dict:
    """Read the DeepSpeed JSON and apply the command-line overrides."""
    if not cfg.ds_config:
        raise SystemExit("--ds_config is required (e.g. ds_configs/zero3.json)")
    with open(cfg.ds_config) as f:
        ds = json.load(f)
    if cfg.micro_batch_size:
        ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
        if not cfg.grad_accum:
            ds.pop("train_batch_size", None)  # re-derived from the override
    if cfg.grad_accum:
        ds["gradient_accumulation_steps"] = cfg.grad_accum
        ds.pop("train_batch_size", None)
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})
    if cfg.lr is not None:
        opt["lr"] = cfg.lr
    if cfg.weight_decay is not None:
        opt["weight_decay"] = cfg.weight_decay
    if cfg.precision == "fp32":
        ds["bf16"] = {"enabled": False}
        ds["fp16"] = {"enabled": False}
    elif cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
        ds["fp16"] = {"enabled": False}
    if ds.get("fp16", {}).get("enabled"):
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("fp16 needs a GPU: DeepSpeed's CPU accelerator supports bf16 only "
                             "(use --precision bf16 or fp32)")
    return ds


def resolve_batch_sizes(ds: dict, data_parallel: int) -> dict:
    """Check the batch sizes against the DP size before any compute; return the config with
    ``train_batch_size`` = micro x accumulation x DP (what DeepSpeed asserts later, with a less
    helpful message)."""
    micro = ds.get("train_micro_batch_size_per_gpu")
    accum = ds.get("gradient_accumulation_steps")
    total = ds.get("train_batch_size")
    if micro is None and total is None:
        raise SystemExit("the DeepSpeed config needs train_micro_batch_size_per_gpu (or --micro-batch-size)")
    if micro is None:
        accum = accum or 1
        if total % (accum * data_parallel):
            raise SystemExit(f"train_batch_size {total} is not divisible by gradient_accumulation_steps "
                             f"{accum} x data-parallel ranks {data_parallel}")
        micro = total // (accum * data_parallel)
    elif accum is None and total is not None:
        if total % (micro * data_parallel):
            raise SystemExit(f"train_batch_size {total} is not divisible by micro batch {micro} x "
                             f"data-parallel ranks {data_parallel}")
        accum = total // (micro * data_parallel)
    accum = accum or 1
    if total is not None and total != micro * accum * data_parallel:
        raise SystemExit(f"train_batch_size {total} != micro batch {micro} x accumulation {accum} x "
                         f"data-parallel ranks {data_parallel} (= {micro * accum * data_parallel}); "
                         "drop train_batch_size from the config or fix one of them")
    if micro < 1 or accum < 1:
        raise SystemExit(f"batch sizes must be >= 1 (micro {micro}, accumulation {accum})")
    out = dict(ds)
    out.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
               train_batch_size=micro * accum * data_parallel)
    return out
