"""DeepSpeed ZeRO x tensor parallelism: the few calls that must be made exactly one way.

Facts checked against deepspeed 0.19.8 (CPU, gloo, TP = 2 x DP = 2; see docs/parallelism.md
and tests/test_zero3_tensor_parallel.py):

- ``deepspeed.zero.Init`` partitions over ``data_parallel_group`` (its ``ds_process_group``)
  and broadcasts every new parameter from that group's first rank; without the argument it
  uses the *world*, so TP peers' different shards would be overwritten by one rank's shard
  and then partitioned across TP peers. ``mpu`` alone does not change that (it is only read
  for the config). :func:`zero_init_context` always passes both.
- ``deepspeed.initialize(mpu=DeepSpeedMPU(state))`` makes the engine average gradients over
  ``mpu.get_data_parallel_group()`` and the ZeRO optimizers reduce norms/overflow over
  ``mpu.get_model_parallel_group()``.
- Gradient norm (``stage3.py::get_grad_norm_direct``, same rule in ``stage_1_and_2.py``):
  sum of squares of this rank's gradient partitions, counting a parameter only if
  ``tensor_model_parallel`` is set on it *or* this is TP rank 0; all-reduce over the partition
  (DP) group, then over the model-parallel group. With our layout (shards marked, replicated
  parameters identical on TP peers, sequence-parallel gradients already summed in autograd)
  that is exactly the norm of the TP = 1 gradient: shards are counted once each, replicated
  parameters once. Two conditions: the partition group must not contain TP peers (else 0.19.8
  switches to "every rank counts" mode, see ``_grad_norm_counts_every_rank``), i.e. pass
  ``data_parallel_group``; and every TP shard must carry ``tensor_model_parallel = True``
  (the layers do; :func:`check_zero_tensor_parallel_setup` verifies both).
"""
from __future__ import annotations

from typing import Iterable, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .comm import all_reduce_no_grad
from .state import DeepSpeedMPU, ParallelState


def zero_init_context(state: ParallelState, ds_config, enabled: bool = True):
    """``deepspeed.zero.Init`` that partitions over the DP group only (build the model inside).

    Args:
        state: this rank's parallel state (its ``dp_group`` is the partition group).
        ds_config: DeepSpeed config dict or path (dtype, offload, ``memory_efficient_linear``).
        enabled: False for ZeRO stage < 3 (the context then does nothing).
    """
    import deepspeed

    dp_group = state.dp_group
    if dp_group is None and dist.is_initialized():
        dp_group = dist.group.WORLD  # single-TP run: DP = world
    return deepspeed.zero.Init(data_parallel_group=dp_group, mpu=DeepSpeedMPU(state),
                               config_dict_or_path=ds_config, enabled=enabled)


def mark_zero3_leaf_modules(model: nn.Module, classes) -> int:
    """Make every module of ``classes`` a ZeRO-3 *leaf* (before ``deepspeed.initialize``): its
    parameters, its submodules' included, are gathered by one hook before its forward (and its
    backward) and its submodules get no hooks. Compiled blocks need this (models/compile.py).
    Call :func:`reduce_leaf_gradients_per_parameter` on the engine afterwards. Returns how many
    modules were marked."""
    from deepspeed.utils import set_z3_leaf_modules
    return len(set_z3_leaf_modules(model, list(classes)))


def reduce_leaf_gradients_per_parameter(engine) -> int:
    """Give the parameters of ZeRO-3 leaf modules the ordinary per-parameter gradient hooks.

    DeepSpeed 0.19 reduces a leaf module's gradients in the module's full backward hook, once
    per *call*. RILS calls each vision block twice per step (unmasked and masked pass), so that
    hook would reduce each parameter twice per step, the first time before the other pass's
    gradient has been added (ZeRO-3 asserts: "a parameter twice in one bucket"). The ordinary
    hook (``register_post_accumulate_grad_hook``) fires once, after autograd has summed every
    use. Leaf modules keep what compiled blocks need: gathering for the whole block, no hooks on
    its submodules. Uses DeepSpeed's own ``create_reduce_and_remove_grad_hooks`` after dropping
    the leaf marks on the parameters; returns how many parameters changed hooks.
    """
    opt = engine.optimizer
    needed = ("_grad_acc_hooks", "_leaf_module_hooks", "create_reduce_and_remove_grad_hooks", "fp16_groups")
    if not all(hasattr(opt, name) for name in needed):
        raise RuntimeError("--compile under ZeRO-3 relies on DeepSpeed 0.19's stage-3 optimizer internals "
                           f"({', '.join(needed)}), which this DeepSpeed ({type(opt).__name__}) lacks")
    params = [p for group in opt.fp16_groups for p in group if hasattr(p, "ds_z3_leaf_module")]
    for handle in opt._grad_acc_hooks + opt._leaf_module_hooks:
        handle.remove()
    opt._grad_acc_hooks.clear()
    opt._leaf_module_hooks.clear()
    for p in params:
        del p.ds_z3_leaf_module
    opt.create_reduce_and_remove_grad_hooks()
    return len(params)


def _group_ranks(group) -> Tuple[int, ...]:
    return tuple(dist.get_global_rank(group, r) for r in range(dist.get_world_size(group)))


def check_zero_tensor_parallel_setup(model: nn.Module, state: ParallelState) -> None:
    """Raise ``RuntimeError`` if the ZeRO x TP layout is wrong; call once after building.

    Checks that every ZeRO-3 parameter is partitioned over exactly this rank's DP group (not
    the world, which would mix TP shards) and, with TP > 1, that TP layers carry
    ``tensor_model_parallel`` (else DeepSpeed's gradient norm under-counts them).
    """
    problems = []
    if dist.is_initialized() and state.dp_group is not None:
        want = tuple(state.dp_ranks())
        for name, p in model.named_parameters():
            group = getattr(p, "ds_process_group", None)
            if group is not None and _group_ranks(group) != want:
                problems.append(f"{name} is partitioned over ranks {_group_ranks(group)}, not the DP group "
                                f"{want}: build the model under zero_init_context(state, ...)")
                break
    if state.tp_size > 1:
        from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
        for name, module in model.named_modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)) \
                    and module.tp_group is not None and not getattr(module.weight, "tensor_model_parallel", False):
                problems.append(f"{name}.weight is a TP shard without tensor_model_parallel=True")
    if problems:
        raise RuntimeError("ZeRO x tensor-parallel setup is wrong:\n  " + "\n  ".join(problems))


def tensor_parallel_grad_norm(parameters: Iterable[torch.Tensor], state: ParallelState,
                              grads_partitioned_over_dp: bool = False) -> torch.Tensor:
    """Global L2 norm of full (not ZeRO-partitioned) gradients under TP, without double counting.

    For loops without DeepSpeed and for checking DeepSpeed's value. TP shards count on every
    TP rank, replicated parameters on TP rank 0 only; the sum of squares is all-reduced over
    the TP group (and over DP when each DP rank holds a different slice of the gradients).
    Gradients must already be averaged over DP and, for sequence-parallel parameters, summed
    over TP (the layers do the latter in autograd).
    """
    total = torch.zeros((), dtype=torch.float64)
    for p in parameters:
        if p.grad is None:
            continue
        if getattr(p, "tensor_model_parallel", False) or state.tp_rank == 0:
            total += p.grad.detach().double().pow(2).sum().cpu()
    if state.tp_size > 1:
        total = all_reduce_no_grad(total, state.tp_group)
    if grads_partitioned_over_dp and state.dp_size > 1:
        total = all_reduce_no_grad(total, state.dp_group)
    return total.sqrt()



def regather_persistent_parameters(params) -> None:
    """Refresh the gathered copy of ZeRO-3 *persistent* parameters after their partitions
    (``ds_tensor``) were written outside the optimizer (SemMIM's EMA, ``train/ema.py``).

    Parameters below ``stage3_param_persistence_threshold`` stay gathered between steps: DeepSpeed
    re-gathers them once at the end of each optimizer step (``_post_step``), so a partition updated
    after that would not reach forward until the next step. Release them, then all-gather from the
    partitions (over each parameter's DP partition group). Every rank of the DP group must call
    this with the same parameters; others (not ZeRO-3, not persistent) are ignored.
    """
    persistent = [p for p in params if hasattr(p, "ds_id") and getattr(p, "ds_persist", False)]
    if persistent:
        persistent[0].partition(param_list=persistent)
        persistent[0].all_gather(param_list=persistent)
