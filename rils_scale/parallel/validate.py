"""Check a model config against the parallel degrees before anything is built.

The launcher calls :func:`validate_parallel_config` right after parsing arguments, so a bad
combination fails in milliseconds with every problem listed, instead of one at a time deep
inside model construction on every rank (or, worse, after minutes of ZeRO-3 initialisation).
"""
from __future__ import annotations

from typing import Any, List, Sequence

from .sharding import padded_size


def _get(dims: Any, name: str, default=None):
    if isinstance(dims, dict):
        return dims.get(name, default)
    return getattr(dims, name, default)


def _check_tower(problems: List[str], label: str, width: int, heads: int, mlp_hidden: int, tp: int) -> None:
    if width <= 0 or heads <= 0:
        problems.append(f"{label}: width {width} and heads {heads} must be positive")
        return
    if width % heads:
        problems.append(f"{label}: width {width} is not divisible by its {heads} heads")
    if heads % tp:
        problems.append(f"{label}: {heads} attention heads are not divisible by --tensor-parallel {tp} "
                        f"(heads are split across TP ranks; use a TP size that divides {heads})")
    if mlp_hidden % tp:
        problems.append(f"{label}: MLP hidden size {mlp_hidden} is not divisible by --tensor-parallel {tp}")


def validate_parallel_config(model_cfg, dims) -> List[str]:
    """Raise ``ValueError`` listing every problem of ``model_cfg`` (a ``RILSConfig``) under ``dims``.

    ``dims`` is a :class:`~rils_scale.parallel.state.ParallelDims` or anything with (or a dict
    of) ``world_size``, ``tensor_parallel`` and ``sequence_parallel``; a plain dict lets the
    launcher validate a world size that ``ParallelDims`` itself would reject, so that error is
    reported together with the model's.

    Checks: world divisible by TP; heads and MLP hidden of the vision encoder, the RILS decoder
    and the text tower divisible by TP (and widths by heads); sequence parallel needs TP > 1;
    the mask ratio keeps at least one patch; patch grid and sin-cos widths. The text vocabulary
    never has to divide: the vocab-parallel table is padded with zero rows.

    Returns notes (not errors) worth logging, e.g. the padded vocabulary size.
    """
    world = int(_get(dims, "world_size", 1))
    tp = int(_get(dims, "tensor_parallel", 1))
    sp = bool(_get(dims, "sequence_parallel", False))
    problems: List[str] = []
    notes: List[str] = []
    if world < 1:
        problems.append(f"world size must be >= 1, got {world}")
    if tp < 1:
        problems.append(f"--tensor-parallel must be >= 1, got {tp}")
        tp = 1
    elif world >= 1 and world % tp:
        problems.append(f"world size {world} is not divisible by --tensor-parallel {tp} "
                        f"(world = data_parallel x tensor_parallel)")
    if sp and tp == 1:
        problems.append("--sequence-parallel needs --tensor-parallel > 1")

    v, t = model_cfg.vision, model_cfg.text
    _check_tower(problems, "vision encoder", v.width, v.heads, v.mlp_hidden, tp)
    _check_tower(problems, "RILS decoder", v.width, v.heads, v.mlp_hidden, tp)
    _check_tower(problems, "text tower", t.width, t.heads, t.mlp_hidden, tp)
    if v.image_size % v.patch_size:
        problems.append(f"vision: image size {v.image_size} is not a multiple of patch size {v.patch_size}")
    if v.width % 4:
        problems.append(f"vision: width {v.width} must be divisible by 4 (2-D sin-cos position embedding)")
    if int(v.num_patches * (1 - model_cfg.mask_ratio)) < 1:
        problems.append(f"mask ratio {model_cfg.mask_ratio} keeps no patch of {v.num_patches}")
    if t.vocab_size < 1:
        problems.append(f"text: vocabulary size must be >= 1, got {t.vocab_size}")
    elif tp > 1 and t.vocab_size % tp:
        notes.append(f"text vocabulary {t.vocab_size} is padded to {padded_size(t.vocab_size, tp)} rows "
                     f"for --tensor-parallel {tp} (zero rows, never looked up, dropped on export)")
    if not 0 <= t.pad_id < max(t.vocab_size, 1):
        problems.append(f"text: pad id {t.pad_id} outside the vocabulary [0, {t.vocab_size})")
    if problems:
        raise ValueError(f"invalid parallel configuration for model {model_cfg.name!r} "
                         f"(world {world}, tensor parallel {tp}, sequence parallel {sp}):\n  - "
                         + "\n  - ".join(problems))
    return notes


def _rank_ranges(ranks: List[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out)


def validate_node_layout(nodes: Sequence[str], tensor_parallel: int) -> None:
    """Raise ``ValueError`` unless every TP group lies inside one node.

    ``nodes[r]`` names the node of global rank ``r`` (:func:`rils_scale.parallel.topology.node_identity`,
    gathered from every rank). TP groups are the consecutive blocks of ``tensor_parallel`` ranks
    (``state.py``); their all-reduces run in every layer, so a group split over two nodes would
    move activations over the inter-node network at every block. Launchers number ranks node by
    node, so this fails when TP does not divide the ranks of every node (2 ranks per node with
    TP 4, uneven node sizes) or when ranks are dealt round-robin over nodes (``srun -m cyclic``).
    """
    tp = max(1, int(tensor_parallel))
    world = len(nodes)
    if tp == 1 or world % tp:
        return  # TP 1 never spans; a world not divisible by TP is validate_parallel_config's error
    spanning = [list(range(s, s + tp)) for s in range(0, world, tp) if len(set(nodes[s:s + tp])) > 1]
    if not spanning:
        return
    order: List[str] = []
    for n in nodes:
        if n not in order:
            order.append(n)
    per_node = "; ".join(f"{n}: ranks {_rank_ranges([r for r in range(world) if nodes[r] == n])}" for n in order)
    shown = ", ".join(f"{g[0]}-{g[-1]} on {' + '.join(dict.fromkeys(nodes[r] for r in g))}" for g in spanning[:4])
    more = f" (and {len(spanning) - 4} more)" if len(spanning) > 4 else ""
    sizes = sorted({sum(1 for x in nodes if x == n) for n in order})
    raise ValueError(
        f"--tensor-parallel {tp}: tensor-parallel groups would span nodes: ranks {shown}{more}. "
        f"TP groups are {tp} consecutive ranks and must sit inside one node (their all-reduces run in "
        f"every layer). Nodes: {per_node}. Use a TP size that divides the ranks of every node "
        f"(ranks per node here: {', '.join(map(str, sizes))}), start the same number of ranks on every "
        "node, and number ranks node by node (DeepSpeed's hostfile launcher and srun's default block "
        "distribution do).")
