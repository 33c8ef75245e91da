"""Memory, communication and step-time model of a RILS run (pure functions, no torch).

Used by ``python -m rils_scale.plan`` and by tests; docs/performance.md explains the model
and the validation against measured CPU runs (tests/test_plan.py).

Memory per GPU = model states + max(during backward, during the optimizer step):

- model states (ZeRO paper accounting, Rajbhandari et al. 2020): mixed-precision bf16 keeps a
  16-bit copy of the weights (2 B/param), 16-bit gradients (2 B) and, for Adam, an fp32
  master copy plus m and v (12 B). Stage 1 partitions the optimizer state over DP, stage 2
  also the gradients, stage 3 also the weights. ``--offload`` moves the optimizer state (and
  the fp32 gradient it steps with) to CPU memory. fp32 training: 4 + 4 + 8 B, no master copy.
  TP first divides the sharded weights (attention, MLP, vocabulary) by TP; norms, patch
  embedding, decoder linears and projections are replicated on every TP rank.
- ZeRO buffers: the gradient reduce bucket (``reduce_bucket_size``), and under stage 3 the
  gathered working set (two of the largest blocks, current + prefetched) and the prefetch
  bucket; values default to ds_configs/zero3.json.
- activations: bytes saved for backward per transformer block, derived for this model's
  block (parallel/layers.py, models/transformer.py): LayerNorm inputs, the inputs of the qkv
  and fc1 linears (full width even under TP; full sequence even under sequence parallelism,
  because the column-parallel layer saves the gathered input), qkv output, the attention
  state (math: softmax output ``heads·S²``; FlashAttention/SDPA kernels: output + log-sum-exp),
  the proj input, GELU input and output. That is ``S·D·(8 + 4·F/D)`` elements + attention,
  the Korthikanti et al. (2022) count without dropout masks. A checkpointed block keeps only
  its input, and one block is rematerialised at a time during backward; the policy
  checkpoints none, the first ``checkpointed_blocks(depth, fraction)`` blocks of every stack
  (selective) or every block (:func:`choose_activation_checkpointing`). Plus the
  tensors outside the blocks (final norms, projections, normalised features) and a transient
  for the gradients of the block being back-propagated.
- loss workspace: contrastive logits ``B × G`` (both directions, fp32 copies for the
  cross-entropy); reconstruction: streaming ``O(P·E + P·chunk)``, or the reference's
  ``P × G`` matrices (about five live fp32 copies at its peak).
- SemMIM (``model.recipe == "semmim"``): the momentum branch's weights in the compute dtype plus
  their fp32 EMA (4 B), partitioned over DP under ZeRO-3 like every weight, no gradient or
  optimizer state; the online fusion block's activations; the code cross-entropies' tiles
  instead of the KL's; ZeRO-3 gathers the momentum branch once per step (forward only).

Communication per GPU per step (bytes sent ≈ received; ring algorithms):
ZeRO-3 all-gathers the 16-bit weights before each use, forward and backward (the encoder
twice: two passes; checkpointed blocks once more for the recompute), and reduce-scatters the
gradients once; ZeRO-1/2 reduce-scatter gradients and all-gather updated weights; TP
all-reduces a block's output twice in forward and twice in backward; DP all-gathers the
image/text features for the losses. Step time = compute (executed FLOPs / (peak × utilisation))
+ TP communication (on the critical path) + DP communication not hidden behind compute.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

from ..models.config import RILSConfig
from ..models.transformer import checkpointed_blocks
from .flops import masked_patches, model_params, params_per_rank, rils_step_flops, visible_tokens

GiB = 2 ** 30

# (param bytes, grad bytes, optimizer bytes) per parameter
_STATE_BYTES = {"bf16": (2, 2, 12), "fp16": (2, 2, 12), "fp32": (4, 4, 8)}
_ACT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class PlanConfig:
    model: RILSConfig
    """Model config (a preset from rils_scale.models.get_config)."""
    gpus: int = 8
    """World size."""
    tensor_parallel: int = 1
    """TP degree (inside a node); DP = gpus / TP."""
    zero_stage: int = 3
    """ZeRO stage 0 (plain DDP), 1, 2 or 3."""
    micro_batch: int = 32
    """Samples per GPU per micro-step (the same samples on every TP peer)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    activation_checkpointing: float = 0.0
    """Fraction of each stack's blocks recomputed in backward: 0 / False none, 1 / True every
    block, in between selective (models.transformer.checkpointed_blocks)."""
    sequence_parallel: bool = False
    """Split LayerNorm/residual regions along the sequence over TP."""
    offload: bool = False
    """ZeRO-Offload: optimizer state (fp32 master, Adam m and v, fp32 grads) in CPU memory."""
    precision: str = "bf16"
    """bf16 (DeepSpeed bf16: 16-bit weights/activations, fp32 master) or fp32."""
    attention: str = "flash"
    """flash (FlashAttention / SDPA kernels: no S² tensor kept) or math (softmax kept)."""
    recon_backend: str = "streaming"
    """streaming / cuda (O(P·E + P·chunk)) or reference (P × G matrices)."""
    recon_chunk: int = 4096
    """Prototype columns per tile of the streaming KL."""
    prototype_grad: bool = False
    """KL gradient also reaches the text tower through the prototypes."""
    gpu_memory_gb: float = 80.0
    """Device memory (GiB as reported by nvidia-smi / torch, e.g. 80 for H100 SXM)."""
    reserved_gb: float = 2.0
    """Memory unusable for tensors: CUDA context, NCCL buffers, kernels' workspaces."""
    fragmentation: float = 0.05
    """Fraction of the rest lost to the caching allocator's fragmentation."""
    gpus_per_node: int = 8
    """GPUs per node (DP traffic crosses nodes when DP groups span more than one)."""
    peak_tflops: Optional[float] = None
    """Dense peak TFLOP/s per GPU for the step-time estimate."""
    mfu: float = 0.45
    """Assumed fraction of peak achieved on the executed FLOPs (recompute included)."""
    inter_node_gbps: float = 400.0
    """Inter-node bandwidth per GPU in Gbit/s (NIC line rate, e.g. 400 for NDR InfiniBand)."""
    intra_node_gbps: float = 900.0
    """Intra-node bandwidth per GPU in GB/s as datasheets print it (NVLink 4: 900 GB/s,
    both directions together; half of it per direction is used)."""
    pcie_gbps: float = 25.0
    """Host-device bandwidth in GB/s per GPU (offload traffic)."""
    comm_efficiency: float = 0.7
    """Fraction of link bandwidth a collective achieves (NCCL bus bandwidth / line rate)."""
    reduce_bucket_elems: float = 5e7
    """DeepSpeed reduce_bucket_size (ds_configs/zero3.json)."""
    prefetch_bucket_elems: float = 5e7
    """DeepSpeed stage3_prefetch_bucket_size (ds_configs/zero3.json)."""
    allgather_bucket_elems: float = 5e7
    """DeepSpeed allgather_bucket_size (stages 1 and 2)."""

    def __post_init__(self):
        if self.gpus < 1 or self.tensor_parallel < 1 or self.gpus % self.tensor_parallel:
            raise ValueError(f"--gpus {self.gpus} must be a positive multiple of --tensor-parallel "
                             f"{self.tensor_parallel}")
        if self.tensor_parallel > self.gpus_per_node:
            raise ValueError(f"--tensor-parallel {self.tensor_parallel} exceeds the {self.gpus_per_node} "
                             "GPUs of a node (TP groups must stay inside a node)")
        for name, heads in (("vision", self.model.vision.heads), ("text", self.model.text.heads)):
            if heads % self.tensor_parallel:
                raise ValueError(f"{name} heads {heads} not divisible by --tensor-parallel {self.tensor_parallel}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"--zero must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in _STATE_BYTES:
            raise ValueError(f"--precision must be one of {sorted(_STATE_BYTES)}, got {self.precision!r}")
        if self.attention not in ("flash", "math"):
            raise ValueError(f"attention must be 'flash' or 'math', got {self.attention!r}")
        if self.recon_backend not in ("streaming", "cuda", "reference"):
            raise ValueError(f"recon_backend must be streaming, cuda or reference, got {self.recon_backend!r}")
        if self.micro_batch < 1:
            raise ValueError("micro batch must be >= 1")
        self.activation_checkpointing = float(self.activation_checkpointing)
        if not 0.0 <= self.activation_checkpointing <= 1.0:
            raise ValueError(f"activation checkpointing fraction must be in [0, 1], got {self.activation_checkpointing}")

    @property
    def dp(self) -> int:
        return self.gpus // self.tensor_parallel

    @property
    def global_batch(self) -> int:
        """Samples per micro-step over the DP group (the contrastive/KL columns)."""
        return self.micro_batch * self.dp

    def replace(self, **kw) -> "PlanConfig":
        return dataclasses.replace(self, **kw)


# --------------------------------------------------------------------------- memory pieces
def model_state_bytes(pc: PlanConfig) -> Dict[str, float]:
    """Weights, gradients, optimizer state and ZeRO buffers on one GPU (and offloaded on CPU)."""
    params = model_params(pc.model)
    tp, dp = pc.tensor_parallel, pc.dp
    phi = params["sharded"] / tp + params["replicated"]
    pb, gb, ob = _STATE_BYTES[pc.precision]
    weights = pb * phi / (dp if pc.zero_stage >= 3 else 1)
    grads = gb * phi / (dp if pc.zero_stage >= 2 else 1)
    optim = ob * phi / (dp if pc.zero_stage >= 1 else 1)
    # optimizer step: fp32 copy of this rank's gradient partition while stepping (mixed precision)
    step_grad = (4 * phi / (dp if pc.zero_stage >= 1 else 1)) if pb < 4 else 0.0
    cpu = 0.0
    if pc.offload:
        cpu, optim, step_grad = optim + step_grad, 0.0, 0.0
    # SemMIM's momentum branch: compute-dtype weights (partitioned like every weight under ZeRO-3)
    # and the fp32 EMA of the same elements (train/ema.py); no gradient, no optimizer state
    mom = params["momentum_sharded"] / tp + (params["momentum"] - params["momentum_sharded"])
    momentum = (pb + 4) * mom / (dp if pc.zero_stage >= 3 else 1)
    buffers = 0.0
    if dp > 1 or pc.zero_stage >= 3:
        if pc.zero_stage == 3:
            largest = params["largest_block"] / tp
            buffers = pb * min(phi, 2 * largest + pc.prefetch_bucket_elems) + gb * pc.reduce_bucket_elems
        elif pc.zero_stage in (1, 2):
            buffers = gb * pc.reduce_bucket_elems + pb * pc.allgather_bucket_elems
        else:  # DDP: gradient buckets of 25 MB
            buffers = 2 * 25 * 2 ** 20
        buffers = min(buffers, (pb + gb) * phi)
    return {"params": weights, "grads": grads, "optimizer": optim, "zero_buffers": buffers,
            "optimizer_step_transient": step_grad, "cpu_offload": cpu, "params_per_rank": phi,
            "momentum": momentum}


def block_activation_bytes(tokens: int, width: int, mlp_hidden: int, heads: int, *, tp: int = 1,
                           sequence_parallel: bool = False, attention: str = "flash",
                           act_bytes: int = 2) -> float:
    """Bytes one block saves for backward, for one sample, on one TP rank."""
    s, d, f, e = tokens, width, mlp_hidden, act_bytes
    sp = tp if sequence_parallel and tp > 1 else 1
    norms = 2 * s * d * e / sp  # LayerNorm inputs (residual stream)
    linear_in = 2 * s * d * e  # qkv and fc1 inputs (full: the column layer saves the gathered input)
    qkv = 3 * s * d * e / tp
    proj_in = s * d * e / tp
    if attention == "math":
        attn = heads * s * s * e / tp  # softmax output (also the AV product's saved operand)
    else:
        attn = s * d * e / tp + heads * s * 4 / tp  # kernel output + fp32 log-sum-exp
    mlp = 2 * s * f * e / tp  # GELU input and fc2 input
    return norms + linear_in + qkv + proj_in + attn + mlp


def _towers(cfg: RILSConfig):
    """(name, blocks, tokens, width, mlp_hidden, heads) of the transformer stacks that keep
    activations for backward (SemMIM: also the online text-fusion block; its momentum branch runs
    without autograd and keeps none)."""
    v, t = cfg.vision, cfg.text
    towers = [
        ("unmasked_encoder", v.depth, 1 + v.num_patches, v.width, v.mlp_hidden, v.heads),
        ("masked_encoder", v.depth, visible_tokens(cfg), v.width, v.mlp_hidden, v.heads),
        ("decoder", v.decoder_depth, 1 + v.num_patches, v.width, v.mlp_hidden, v.heads),
        ("text", t.depth, t.context_length, t.width, t.mlp_hidden, t.heads),
    ]
    if _semmim(cfg) and cfg.semmim.target_text_injection:
        towers.append(("fusion", 1, v.num_patches, v.width, v.mlp_hidden, v.heads))
    return towers


def _semmim(cfg: RILSConfig) -> bool:
    return getattr(cfg, "recipe", "rils") == "semmim"


def activation_bytes(pc: PlanConfig, micro_batch: Optional[int] = None,
                     checkpointing: Optional[float] = None) -> Dict[str, float]:
    """Activation memory per GPU for one micro-batch: per tower, outside the blocks, and the
    backward transient; ``total`` is what is live at the start of backward plus the transient."""
    b = pc.micro_batch if micro_batch is None else micro_batch
    ckpt = float(pc.activation_checkpointing if checkpointing is None else checkpointing)
    cfg, tp, e = pc.model, pc.tensor_parallel, _ACT_BYTES[pc.precision]
    v, t, emb = cfg.vision, cfg.text, cfg.embed_dim
    sp = tp if pc.sequence_parallel and tp > 1 else 1
    out: Dict[str, float] = {}
    largest_block = 0.0
    for name, depth, s, d, f, heads in _towers(cfg):
        full = block_activation_bytes(s, d, f, heads, tp=tp, sequence_parallel=pc.sequence_parallel,
                                      attention=pc.attention, act_bytes=e)
        largest_block = max(largest_block, full)
        recomputed = checkpointed_blocks(depth, ckpt)  # these keep only their input
        out[name] = b * (recomputed * s * d * e / sp + (depth - recomputed) * full)
    n, k1 = v.num_patches, visible_tokens(cfg)
    s_all, d = 1 + n, v.width
    other = (3 * v.image_size ** 2  # the input images
             + (s_all + n) * d + 2 * n * emb  # unmasked: final-norm input, projection input, teacher
             + 2 * k1 * d  # masked: final-norm input and output (decoder input)
             + 2 * s_all * d + n * d + 2 * n * emb  # decoder: final norm in/out, pred out, student
             + t.context_length * t.width + 2 * emb)  # text: final-norm input, features
    if _semmim(cfg):  # code-head rows (online with gradient, momentum without) held until the loss
        ec, m = cfg.semmim.code_dim or emb, masked_patches(cfg)
        other += 2 * (1 + m) * (d + ec) + (1 + n) * (d + ec)
    out["outside_blocks"] = b * other * e
    # backward: gradients of the block being processed (~ its saved activations), and under
    # checkpointing its rematerialised activations as well
    out["backward_transient"] = b * largest_block * (2 if ckpt > 0 else 1)
    out["total"] = sum(out.values())
    return out


def loss_workspace_bytes(pc: PlanConfig, micro_batch: Optional[int] = None) -> Dict[str, float]:
    """Contrastive logits and the reconstruction loss's working memory on one GPU."""
    b = pc.micro_batch if micro_batch is None else micro_batch
    g, e_dim, e = b * pc.dp, pc.model.embed_dim, _ACT_BYTES[pc.precision]
    contrastive = 2 * b * g * (e + 4 + 4) + 2 * g * e_dim * e  # logits, fp32 copies, log-softmax; gathers
    rows = b * masked_patches(pc.model) / pc.tensor_parallel  # all rows kept (upper bound)
    if pc.recon_backend == "reference":
        recon = 5 * rows * g * 4 + 3 * rows * e_dim * 4
    else:
        recon = 3 * rows * e_dim * 4 + g * e_dim * 4 + 4 * rows * min(pc.recon_chunk, g) * 4
    if _semmim(pc.model):  # the code cross-entropies instead: rows x E_c inputs/gradients + fp32 logit tiles
        ec, k = pc.model.semmim.code_dim or e_dim, pc.model.semmim.num_codes
        rows = b * (1 + masked_patches(pc.model)) / pc.tensor_parallel
        tile = min(rows, 4096) * min(k, pc.recon_chunk)
        recon = 4 * (4 * rows * ec + 2 * k * ec + 4 * tile + 4 * rows)
    return {"contrastive": contrastive, "reconstruction": recon, "total": contrastive + recon}


def memory_per_gpu(pc: PlanConfig, micro_batch: Optional[int] = None) -> Dict[str, float]:
    """Every memory line in bytes; ``peak`` = what must fit, ``usable`` = what the GPU offers."""
    states = model_state_bytes(pc)
    act = activation_bytes(pc, micro_batch)
    loss = loss_workspace_bytes(pc, micro_batch)
    resident = states["params"] + states["grads"] + states["optimizer"] + states["zero_buffers"] + states["momentum"]
    during_backward = act["total"] + loss["total"]
    peak = resident + max(during_backward, states["optimizer_step_transient"])
    usable = (pc.gpu_memory_gb - pc.reserved_gb) * GiB * (1 - pc.fragmentation)
    return {
        "params": states["params"], "grads": states["grads"], "optimizer": states["optimizer"],
        "momentum": states["momentum"],
        "zero_buffers": states["zero_buffers"], "optimizer_step_transient": states["optimizer_step_transient"],
        "activations": act["total"],
        "activations_checkpointed": activation_bytes(pc, micro_batch, checkpointing=1.0)["total"],
        "activations_full": activation_bytes(pc, micro_batch, checkpointing=0.0)["total"],
        "activations_by_tower": {k: v for k, v in act.items() if k != "total"},
        "loss_workspace": loss["total"], "loss_by_term": loss,
        "peak": peak, "usable": usable, "fits": peak <= usable,
        "cpu_offload": states["cpu_offload"], "params_per_rank": states["params_per_rank"],
    }


def max_micro_batch(pc: PlanConfig, limit: int = 1 << 16) -> int:
    """Largest micro-batch whose peak fits in the usable memory (0 if even 1 does not)."""
    fits = lambda b: memory_per_gpu(pc, b)["fits"]  # noqa: E731
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# --------------------------------------------------------------------------- communication
def communication_bytes(pc: PlanConfig) -> Dict[str, float]:
    """Bytes each GPU sends per optimizer step, by collective."""
    cfg, tp, dp, b = pc.model, pc.tensor_parallel, pc.dp, pc.micro_batch
    p = model_params(cfg)
    pb, gb, _ = _STATE_BYTES[pc.precision]
    e = _ACT_BYTES[pc.precision]
    t = cfg.text
    ring_dp = (dp - 1) / dp
    ring_tp = (tp - 1) / tp
    phi = p["sharded"] / tp + p["replicated"]
    vis_r, dec_r, txt_r, proj_r = (params_per_rank(cfg, tp, part)
                                   for part in ("vision", "decoder", "text", "projections"))
    out: Dict[str, float] = {}
    accum = pc.grad_accum
    semmim = (params_per_rank(cfg, tp, "fusion") + params_per_rank(cfg, tp, "codes")) if _semmim(cfg) else 0.0
    momentum = params_per_rank(cfg, tp, "momentum") if _semmim(cfg) else 0.0
    if pc.zero_stage == 3:
        uses = 2 * vis_r + dec_r + txt_r + proj_r + semmim  # each module gathered per use; the encoder twice
        ck = lambda depth: checkpointed_blocks(depth, pc.activation_checkpointing) / depth if depth else 0.0  # noqa: E731
        v = cfg.vision
        recompute = 2 * vis_r * ck(v.depth) + dec_r * ck(v.decoder_depth) + txt_r * ck(t.depth)
        # (the momentum branch is gathered once: forward only)
        out["zero3_param_allgather"] = accum * pb * (2 * uses + momentum + recompute) * ring_dp
        out["grad_reduce_scatter"] = accum * gb * phi * ring_dp
    elif pc.zero_stage in (1, 2):
        out["grad_reduce_scatter"] = gb * phi * ring_dp
        out["param_allgather_after_step"] = pb * phi * ring_dp
    else:
        out["grad_allreduce"] = 2 * gb * phi * ring_dp
    # TP: two all-reduces per block forward (attn proj, fc2), two backward (column inputs), and
    # in a checkpointed block's recompute the attn proj's again (the recompute stops before fc2;
    # under sequence parallelism 3 of the 4 gather/scatter halves, 1.5 all-reduces); ring
    # all-reduce sends 2 (t-1)/t of the buffer
    tp_bytes = 0.0
    if tp > 1:
        for _, depth, s, d, *_ in _towers(cfg):
            per_ar = b * s * d * e
            n_ar = 4 * depth + (1.5 if pc.sequence_parallel else 1) * checkpointed_blocks(depth, pc.activation_checkpointing)
            tp_bytes += n_ar * 2 * ring_tp * per_ar
        if _semmim(cfg):  # momentum encoder (+ fusion): forward only, two all-reduces per block
            v = cfg.vision
            blocks = v.depth + (1 if cfg.semmim.target_text_injection else 0)
            tp_bytes += blocks * 2 * 2 * ring_tp * b * (1 + v.num_patches) * v.width * e
        tp_bytes += 2 * ring_tp * b * t.context_length * t.width * e  # vocab-parallel embedding (fwd only)
    out["tp_allreduce"] = accum * tp_bytes
    g, emb = pc.global_batch, cfg.embed_dim
    out["dp_feature_gather"] = accum * 2 * 2 * g * emb * e * ring_dp  # image+text, fwd gather + bwd reduce
    out["total"] = sum(out.values())
    return out


def step_time(pc: PlanConfig) -> Dict[str, float]:
    """Estimated seconds per optimizer step and the resulting throughput (needs peak_tflops)."""
    f = rils_step_flops(pc.model, pc.micro_batch, pc.global_batch,
                        activation_checkpointing=pc.activation_checkpointing,
                        tensor_parallel=pc.tensor_parallel, prototype_grad=pc.prototype_grad,
                        recon_backend=pc.recon_backend)
    comm = communication_bytes(pc)
    intra = pc.intra_node_gbps / 2 * 1e9 * pc.comm_efficiency  # bytes/s per direction
    inter = pc.inter_node_gbps / 8 * 1e9 * pc.comm_efficiency
    dp_link = inter if pc.gpus > pc.gpus_per_node else intra
    out = {"model_flops_per_gpu": f["total"] * pc.grad_accum,
           "executed_flops_per_gpu": f["total_with_recompute"] * pc.grad_accum,
           "tp_comm_s": comm["tp_allreduce"] / intra,
           "dp_comm_s": (comm["total"] - comm["tp_allreduce"]) / dp_link,
           "dp_link_GBps": dp_link / 1e9}
    if pc.offload:  # gradients to the host, updated 16-bit weights back, over PCIe
        st = model_state_bytes(pc)
        out["offload_s"] = (st["grads"] + st["params"] * (1 if pc.zero_stage >= 3 else 1 / pc.dp)) / (pc.pcie_gbps * 1e9)
    else:
        out["offload_s"] = 0.0
    if not pc.peak_tflops:
        return out
    compute = out["executed_flops_per_gpu"] / (pc.peak_tflops * 1e12 * pc.mfu)
    exposed_dp = max(0.0, out["dp_comm_s"] - compute)  # ZeRO's overlap_comm hides the rest
    step = compute + out["tp_comm_s"] + exposed_dp + out["offload_s"]
    worst = compute + out["tp_comm_s"] + out["dp_comm_s"] + out["offload_s"]
    samples = pc.global_batch * pc.grad_accum
    out.update(compute_s=compute, step_s=step, step_s_no_overlap=worst,
               samples_per_s=samples / step, samples_per_s_per_gpu=samples / step / pc.gpus,
               mfu_model=out["model_flops_per_gpu"] / step / (pc.peak_tflops * 1e12))
    return out


def plan(pc: PlanConfig) -> Dict:
    """Everything the planner prints, as plain numbers (bytes, seconds)."""
    p = model_params(pc.model)
    return {
        "model": pc.model.name, "recipe": getattr(pc.model, "recipe", "rils"), "params": p["total"], "gpus": pc.gpus, "tensor_parallel": pc.tensor_parallel,
        "data_parallel": pc.dp, "zero_stage": pc.zero_stage, "micro_batch": pc.micro_batch,
        "global_batch": pc.global_batch * pc.grad_accum, "activation_checkpointing": pc.activation_checkpointing,
        "sequence_parallel": pc.sequence_parallel, "offload": pc.offload, "precision": pc.precision,
        "memory": memory_per_gpu(pc), "communication": communication_bytes(pc), "time": step_time(pc),
        "max_micro_batch": max_micro_batch(pc),
        "max_micro_batch_full": max_micro_batch(pc.replace(activation_checkpointing=0.0)),
        "max_micro_batch_checkpointed": max_micro_batch(pc.replace(activation_checkpointing=1.0)),
        "gpu_memory_gb": pc.gpu_memory_gb,
    }


# --------------------------------------------------------------------------- checkpointing policy
CHECKPOINTING_POLICIES = ("none", "selective", "every", "auto")
AUTO_HEADROOM = 0.10
"""Share of the usable memory ``auto`` leaves free: the activation model is an estimate
(docs/performance.md records its error against measured peaks)."""


@dataclass
class CheckpointingChoice:
    """What :func:`choose_activation_checkpointing` decided, and the numbers it decided on."""

    policy: str
    """none | selective | every."""
    fraction: float
    """ParallelSpec.activation_checkpointing: the fraction of each stack's blocks recomputed."""
    requested: str
    """none | selective | every | auto."""
    reason: str
    """Why, in a few words."""
    peaks: Dict[str, float]
    """Estimated peak bytes per device under none, selective (at ``selective_fraction``) and every."""
    selective_fraction: float
    """The fraction the selective estimate is for (the smallest that fits, else the largest < 1)."""
    usable: float
    """Usable device bytes (after reserved memory and fragmentation)."""
    budget: float
    """What ``auto`` lets the peak reach: usable x (1 - headroom)."""
    depth: int
    """Blocks of the deepest stack (selective fractions are multiples of 1 / depth)."""

    def describe(self) -> str:
        if self.policy == "selective":
            return f"selective (the first {self.fraction * self.depth:.0f}/{self.depth} blocks of every stack)"
        return self.policy

    def line(self) -> str:
        def size(x):
            return f"{x / GiB:.1f} GiB" if x >= GiB else f"{x / 2 ** 20:.0f} MiB"
        k = round(self.selective_fraction * self.depth)
        return (f"activation checkpointing: {self.describe()}, {self.reason}; estimated peak per device: "
                f"none {size(self.peaks['none'])}, selective {k}/{self.depth} {size(self.peaks['selective'])}, "
                f"every {size(self.peaks['every'])}; budget {size(self.budget)} of {size(self.usable)} usable")

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)


def choose_activation_checkpointing(pc: PlanConfig, requested: str = "auto",
                                    headroom: float = AUTO_HEADROOM) -> CheckpointingChoice:
    """The activation-checkpointing policy for ``pc``'s model, micro-batch and device memory.

    ``auto``: no recompute if the estimated peak fits the budget; else the fewest blocks per
    stack that make it fit (selective: recompute grows with the blocks, so the fewest is the
    cheapest); else every block. ``none`` / ``every`` are taken as asked; ``selective`` as
    asked, at the fraction ``auto`` would pick (at least one block, at most all but one).
    """
    if requested not in CHECKPOINTING_POLICIES:
        raise ValueError(f"activation checkpointing must be one of {CHECKPOINTING_POLICIES}, got {requested!r}")
    cfg = pc.model
    depth = max(cfg.vision.depth, cfg.vision.decoder_depth, cfg.text.depth)
    peak = lambda f: memory_per_gpu(pc.replace(activation_checkpointing=f))["peak"]  # noqa: E731
    usable = memory_per_gpu(pc)["usable"]
    budget = usable * (1.0 - headroom)
    partial = [k / depth for k in range(1, depth)]
    fitting = next((f for f in partial if peak(f) <= budget), None)
    shown = fitting if fitting is not None else (partial[-1] if partial else 1.0)
    peaks = {"none": peak(0.0), "selective": peak(shown), "every": peak(1.0)}
    none_fits, every_fits = peaks["none"] <= budget, peaks["every"] <= budget

    def choice(policy, fraction, reason):
        return CheckpointingChoice(policy, fraction, requested, reason, peaks, shown, usable, budget, depth)

    if requested == "none":
        return choice("none", 0.0, "as requested" + ("" if none_fits else " (estimated above the budget)"))
    if requested == "every":
        return choice("every", 1.0, "as requested" + ("" if every_fits else " (estimated above the budget)"))
    if requested == "selective":
        fraction = fitting if fitting is not None else (partial[0] if none_fits or not partial else partial[-1])
        return choice("selective", fraction, "as requested")
    if none_fits:
        return choice("none", 0.0, "no recompute needed: the estimate without it fits")
    if fitting is not None:
        return choice("selective", fitting, "the fewest recomputed blocks whose estimate fits")
    if every_fits:
        return choice("every", 1.0, "only recomputing every block fits")
    return choice("every", 1.0, "even recomputing every block is estimated above the budget: lower the "
                                "micro-batch, raise TP or use ZeRO offload")
