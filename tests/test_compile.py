"""``--compile`` (regional: each transformer block compiled on its own, models/compile.py).

1. One process (``aot_eager``: dynamo's capture and AOT autograd): every block compiles as one
   graph (``fullgraph=True``: a graph break is an error), identical blocks share their graph,
   and the step's loss and gradients equal eager.
2. Engines built by the trainer's ``build_engine`` on 2 spawned gloo ranks, DeepSpeed ZeRO-3
   (blocks as ZeRO-3 leaf modules with per-parameter gradient hooks), fp32, selective
   checkpointing, the trainer's objective: at TP 2 with sequence parallelism, 10 steps compiled
   with inductor (fused kernels, the TP collectives inside the graph) equal 10 steps eager
   within float tolerance, and the compiled engine reloaded
   from its step-5 checkpoint reproduces steps 6-10 exactly; at DP 2 (ZeRO-3 partitions for
   real), 3 steps compiled with ``aot_eager`` equal eager. (The trainer's loop, loader and
   resume are the eager ones, checked by tests/test_pretrain_cpu.py.)
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from distributed_utils import spawn
from rils_scale.models import ParallelSpec, build_model, get_config
from rils_scale.models.compile import compile_blocks
from rils_scale.objectives import LossConfig, RILSLoss


def _step(model, cfg):
    g = torch.Generator().manual_seed(5)
    images = torch.randn(4, 3, 32, 32, generator=g)
    ids = torch.randint(4, cfg.text.vocab_size, (4, cfg.text.context_length), generator=g)
    ids[:, 12:] = 0
    out = model(images, ids, mask_generator=torch.Generator().manual_seed(1))
    loss, _ = RILSLoss(LossConfig(retrieval_filter=False, kl_backend="streaming"))(out)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_blocks_compile_whole_and_match_eager():
    """aot_eager (dynamo + AOT autograd): the graph capture; inductor runs in the slow test."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    cfg = get_config("tiny")
    losses, grads = [], []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, ParallelSpec(activation_checkpointing=0.5), attn_backend="sdpa").train()
        if compiled:
            blocks = compile_blocks(model, backend="aot_eager")
            assert blocks == cfg.vision.depth + cfg.vision.decoder_depth + cfg.text.depth
        loss, grad = _step(model, cfg)
        losses.append(loss)
        grads.append(grad)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # 5 blocks, 3 graphs: the encoder block on all patches (the decoder's block has the same
    # shape and code), on the visible patches, and the causal text block; the first block of
    # each stack is checkpointed (recomputed through the compiled forward)
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="dropout"):
        compile_blocks(build_model(get_config("tiny", dropout=0.1)))


ZERO3 = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
         "steps_per_print": 10 ** 6, "gradient_clipping": 1.0,
         "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.05, "torch_adam": True}},
         "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                               "reduce_bucket_size": 10000000, "stage3_prefetch_bucket_size": 10000000,
                               "stage3_param_persistence_threshold": 0}}


def _engine_run(state, compiled: bool, steps, *, save=None, load=None, reset=True):
    """Losses of ``steps`` on an engine built by the trainer's ``build_engine`` (ZeRO-3, fp32,
    selective checkpointing, the objective's DP/TP groups); the data and masks of step ``s`` are
    seeded by ``s`` and the DP rank. ``save``/``load``: ``(dir, step)`` of a DeepSpeed checkpoint."""
    from rils_scale.checkpoint.safe_load import install_safe_checkpoint_engine
    from rils_scale.train.config import TrainConfig
    from rils_scale.train.engine import build_engine
    if reset:  # one engine per process in training; new process groups recompile
        torch._dynamo.reset()
    cfg = TrainConfig(model="tiny", tensor_parallel=state.tp_size, sequence_parallel=state.tp_size > 1,
                      compile=compiled, warmup_steps=2, max_steps=10, seed=2)
    ds = dict(ZERO3, train_batch_size=2 * state.dp_size)
    engine, spec = build_engine(cfg, get_config("tiny"), ds, state, checkpointing=0.5)
    objective = RILSLoss(LossConfig(kl_backend="streaming"), dp_group=state.dp_group, tp_group=spec.tp_group)
    if load:
        install_safe_checkpoint_engine(engine, trusted=False)
        assert engine.load_checkpoint(load[0], tag=f"step{load[1]}")[0] is not None
    losses = {}
    for step in steps:
        g = torch.Generator().manual_seed(1000 * step + state.dp_rank)
        images = torch.randn(2, 3, 32, 32, generator=g)
        ids = torch.randint(4, 1000, (2, 32), generator=g)
        ids[:, 10:] = 0
        loss, _ = objective(engine(images, ids, mask_generator=torch.Generator().manual_seed(step)))
        engine.backward(loss)
        engine.step()
        losses[step] = loss.item()
        if save and step == save[1]:
            engine.save_checkpoint(save[0], tag=f"step{step}")
    from torch._dynamo.utils import counters
    return losses, dict(counters["graph_break"])


def _compile_worker(rank, world, root):
    from rils_scale.models import compile as compile_module
    from rils_scale.parallel import init_parallel_state
    out = {}
    tp2 = init_parallel_state(tensor_parallel=2, sequence_parallel=True)
    out["eager"], _ = _engine_run(tp2, False, range(1, 11))
    out["compiled"], breaks = _engine_run(tp2, True, range(1, 11), save=(root, 5))
    out["resumed"], more = _engine_run(tp2, True, range(6, 11), load=(root, 5), reset=False)  # same graphs
    # DP 2: ZeRO-3 partitions the blocks for real; aot_eager (dynamo + AOT autograd: the layers
    # that meet ZeRO-3's hooks), inductor's code generation was checked above
    compile_module.BACKEND = "aot_eager"
    dp2 = init_parallel_state(tensor_parallel=1)
    out["dp2_eager"], _ = _engine_run(dp2, False, range(1, 4))
    out["dp2_compiled"], most = _engine_run(dp2, True, range(1, 4))
    with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": out, "graph_break": breaks | more | most}, f)
    from rils_scale.parallel.cpu_comm import release_cpu_shm_buffer
    release_cpu_shm_buffer()


@pytest.mark.slow
def test_compiled_engine_equals_eager_and_resumes_exactly_zero3_tp2_dp2(tmp_path):
    pytest.importorskip("deepspeed")
    spawn(_compile_worker, 2, str(tmp_path))
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert not res["graph_break"], res["graph_break"]
        losses = {k: {int(s): v for s, v in d.items()} for k, d in res["losses"].items()}
        eager, compiled, resumed = losses["eager"], losses["compiled"], losses["resumed"]
        assert sorted(eager) == sorted(compiled) == list(range(1, 11)) and sorted(resumed) == list(range(6, 11))
        for step in range(1, 11):
            # fused kernels round differently; 10 AdamW steps keep the difference small
            assert compiled[step] == pytest.approx(eager[step], rel=2e-4, abs=1e-5), (rank, step)
        for step in range(6, 11):  # same weights, optimizer state, data and masks: the same numbers
            assert resumed[step] == pytest.approx(compiled[step], rel=1e-6, abs=1e-7), (rank, step)
        # DP 2: gradients reduced once per step although the vision blocks run twice
        # (parallel.deepspeed_utils.reduce_leaf_gradients_per_parameter)
        assert losses["dp2_compiled"] == pytest.approx(losses["dp2_eager"], rel=1e-6), losses
