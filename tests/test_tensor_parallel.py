"""Tensor parallelism of the RILS model against an unsharded reference (CPU, gloo).

Every rank builds the TP = 1 reference from the same seed next to its TP = k model, runs both
on the same batch and masking generator, and compares: the outputs of both towers and the
decoder, the loss (``RILSLoss``), every parameter (init) and every gradient, TP shards being
all-gathered and merged with ``rils_scale.parallel.sharding``. Cases: plain TP, sequence
parallel (sequences 17 / 65 not divisible by TP: padding + key mask), activation
checkpointing, both; the ``tiny`` preset (4 heads; TP 2 and 4) and a 6-head config (TP 2 and
3, vocabulary 1001 padded). Dropout: same seed -> same result, checkpoint recompute -> same
gradients.

Tolerances: float64 runs differ from the reference only by summation order (an all-reduce of
partial products, a different GEMM split), so 1e-9 relative is ample; float32 runs use 2e-5
relative / 1e-6 absolute (TP changes GEMM reduction order; errors of a few ulps compound over
a few layers). The loss casts the KL to float32 (``RILSLoss``), which scales every gradient by
the same float32-rounded factor on both sides, so float64 gradients still agree tightly.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from distributed_utils import spawn
from rils_scale.models import RILSConfig, TextConfig, VisionConfig, build_model, get_config
from rils_scale.models.transformer import ParallelSpec
from rils_scale.objectives import LossConfig, RILSLoss
from rils_scale.parallel import DeepSpeedMPU, init_parallel_state, model_parallel_seed
from rils_scale.parallel.random import TENSOR_PARALLEL_RNG, checkpoint, get_rng_tracker
from rils_scale.parallel.sharding import (ShardSpec, gather_full_tensors, merge_shards, shard_spec,
                                          split_full_tensor, tensor_parallel_layout)

SEED, MASK_SEED, BATCH = 1234, 7, 4
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-5, atol=1e-6)}


def six_heads() -> RILSConfig:
    """Several heads, shapes that do not divide evenly: vocab 1001, text context 16."""
    return RILSConfig(vision=VisionConfig(image_size=32, patch_size=4, width=96, depth=1, heads=6),
                      text=TextConfig(context_length=16, vocab_size=1001, width=96, depth=1, heads=6),
                      embed_dim=48, name="six_heads")


def _inputs(cfg: RILSConfig, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s, ctx = cfg.vision.image_size, cfg.text.context_length
    images = torch.randn(BATCH, 3, s, s, generator=g).to(dtype)
    ids = torch.randint(1, cfg.text.vocab_size, (BATCH, ctx), generator=g)
    lengths = torch.randint(3, ctx + 1, (BATCH,), generator=g)
    ids[torch.arange(ctx)[None] >= lengths[:, None]] = 0
    ids[0, -1] = cfg.text.vocab_size - 1  # the last vocabulary row is used (padding edge)
    return images, ids


def _step(cfg, spec, tp_rank, tp_size, dtype, data_seed=0, retrieval_filter=False):
    """Seed, build, forward, RILSLoss, backward. Returns (model, outputs, loss)."""
    model_parallel_seed(SEED, tp_rank, tp_size)
    model = build_model(cfg, spec).to(dtype).train()
    images, ids = _inputs(cfg, dtype, data_seed)
    out = model(images, ids, mask_generator=torch.Generator().manual_seed(MASK_SEED))
    loss_fn = RILSLoss(LossConfig(retrieval_filter=retrieval_filter, kl_backend="reference"),
                       dp_group=None, tp_group=spec.tp_group)
    loss, _ = loss_fn(out)
    loss.backward()
    return model, out, loss


def _compare(label, group, got, ref, tol):
    model, out, loss = got
    ref_model, ref_out, ref_loss = ref
    assert set(out) == set(ref_out)
    for key in ref_out:
        torch.testing.assert_close(out[key], ref_out[key], **tol, msg=lambda m: f"{label} {key}: {m}")
    # RILSLoss returns float32 and the TP split of its KL rows changes the order of the sum.
    torch.testing.assert_close(loss, ref_loss, rtol=max(tol["rtol"], 1e-6), atol=0,
                               msg=lambda m: f"{label} loss: {m}")
    ref_params = dict(ref_model.named_parameters())
    assert set(ref_params) == {n for n, _ in model.named_parameters()}
    names, params = zip(*model.named_parameters())
    specs = [shard_spec(p) for p in params]
    missing = [n for n, p in zip(names, params) if p.grad is None]
    assert not missing, f"{label}: no gradient for {missing}"
    fulls = gather_full_tensors(params, specs, group)
    grads = gather_full_tensors([p.grad for p in params], specs, group)
    for name, full, grad in zip(names, fulls, grads):
        assert torch.equal(full, ref_params[name].detach()), f"{label} {name}: init is not the slice of TP=1's"
        ref_grad = ref_params[name].grad
        scale = ref_grad.abs().max().clamp(min=1.0)
        torch.testing.assert_close(grad, ref_grad, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                   msg=lambda m: f"{label} grad {name}: {m}")


def _check_equivalence(cfg, state, dtype, cases, label):
    tp = state.tp_size
    ref = _step(cfg, ParallelSpec(), 0, 1, dtype)
    for sp, ac in cases:
        spec = ParallelSpec(tp_group=state.tp_group, sequence_parallel=sp, activation_checkpointing=ac)
        got = _step(cfg, spec, state.tp_rank, tp, dtype)
        _compare(f"{label} TP={tp} sp={sp} ac={ac} {dtype}", state.tp_group, got, ref, TOL[dtype])


def _check_layout(model, tp):
    layout = tensor_parallel_layout(model)
    assert layout["visual.transformer.blocks.0.attn.qkv.weight"] == ShardSpec(0, 3)
    assert layout["visual.transformer.blocks.0.attn.q_bias"] == ShardSpec(0, 1)
    assert layout["visual.transformer.blocks.0.attn.proj.weight"] == ShardSpec(1, 1)
    assert layout["text.transformer.blocks.0.attn.qkv.bias"] == ShardSpec(0, 3)
    assert layout["text.token_embedding.weight"] == ShardSpec(0, 1, model.cfg.text.vocab_size)
    assert "visual.transformer.blocks.0.attn.proj.bias" not in layout  # replicated
    assert "image_projection.weight" not in layout


def _check_dropout(state, cfg):
    """Same seed -> same result; recompute under activation checkpointing -> same gradients."""
    cfg.dropout = 0.2
    tp, group = state.tp_size, state.tp_group
    for sp in (False, True):
        runs = [_step(cfg, ParallelSpec(group, sp, ac), state.tp_rank, tp, torch.float64) for ac in (False, False, True)]
        (m0, o0, l0), (m1, o1, l1), (m2, o2, l2) = runs
        assert torch.equal(l0, l1), "dropout is not reproducible from the seed"
        for (n, p0), p1, p2 in zip(m0.named_parameters(), m1.parameters(), m2.parameters()):
            assert torch.equal(p0.grad, p1.grad), f"sp={sp} {n}: same seed, different gradient"
            torch.testing.assert_close(p2.grad, p0.grad, rtol=1e-12, atol=1e-14,
                                       msg=lambda m: f"sp={sp} {n}: recompute changed the gradient: {m}")
        torch.testing.assert_close(l2, l0, rtol=1e-12, atol=0)
    # Dropout is really on, and per-rank TP states differ (independent masks per head shard).
    cfg.dropout = 0.0
    _, _, l_nodrop = _step(cfg, ParallelSpec(group), state.tp_rank, tp, torch.float64)
    assert not torch.allclose(l_nodrop, l0)
    tp_state = get_rng_tracker().get_states()[TENSOR_PARALLEL_RNG]
    states = [torch.empty_like(tp_state) for _ in range(tp)]
    dist.all_gather(states, tp_state, group=group)
    assert not torch.equal(states[0], states[1])


def _worker_two(rank, world):
    state = init_parallel_state(tensor_parallel=2)
    assert state.tp_ranks() == [0, 1] and state.dp_size == 1
    all_cases = [(False, False), (True, False), (False, True), (True, True)]
    _check_equivalence(get_config("tiny"), state, torch.float64, all_cases, "tiny")
    _check_equivalence(get_config("tiny"), state, torch.float32, [(True, True)], "tiny")
    _check_equivalence(six_heads(), state, torch.float64, [(False, False), (True, True)], "six_heads")
    model, _, _ = _step(get_config("tiny"), ParallelSpec(state.tp_group), state.tp_rank, 2, torch.float32)
    _check_layout(model, 2)
    # Sequence-parallel norms and biases are marked (their gradients are summed over TP by us).
    sp_model = build_model(get_config("tiny"), ParallelSpec(state.tp_group, sequence_parallel=True))
    assert getattr(sp_model.visual.transformer.blocks[0].norm1.weight, "sequence_parallel", False)
    assert getattr(sp_model.visual.transformer.blocks[0].mlp.fc2.bias, "sequence_parallel", False)
    _check_dropout(state, get_config("tiny"))


def _worker_three(rank, world):
    state = init_parallel_state(tensor_parallel=3)
    _check_equivalence(six_heads(), state, torch.float64, [(False, False), (True, True)], "six_heads")


def _worker_four(rank, world):
    # TP = 4 on the tiny preset (one head per rank), plain and sequence parallel.
    state = init_parallel_state(tensor_parallel=4)
    _check_equivalence(get_config("tiny"), state, torch.float64, [(False, False), (True, False)], "tiny")
    # TP = 2 x DP = 2: consecutive TP groups, each DP replica on its own data.
    state = init_parallel_state(tensor_parallel=2, sequence_parallel=True)
    assert state.tp_ranks() == [2 * (rank // 2), 2 * (rank // 2) + 1]
    assert state.dp_ranks() == [rank % 2, rank % 2 + 2]
    mpu = DeepSpeedMPU(state)
    assert (mpu.get_model_parallel_rank(), mpu.get_data_parallel_rank()) == (rank % 2, rank // 2)
    assert mpu.get_model_parallel_world_size() == 2 and mpu.get_data_parallel_world_size() == 2
    cfg = get_config("tiny")
    ref = _step(cfg, ParallelSpec(), 0, 1, torch.float64, data_seed=state.dp_rank)
    got = _step(cfg, ParallelSpec(state.tp_group, True, True), state.tp_rank, 2, torch.float64,
                data_seed=state.dp_rank)
    _compare("TPxDP", state.tp_group, got, ref, TOL[torch.float64])


def test_tp2_matches_tp1():
    spawn(_worker_two, 2)


def test_tp3_six_heads_matches_tp1():
    spawn(_worker_three, 3)


def test_tp4_and_tp2_dp2_match_tp1():
    spawn(_worker_four, 4)


# ---------------------------------------------------------------------------- single process

def test_split_merge_roundtrip():
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(3 * 12, 5, generator=g)
    for tp in (1, 2, 3, 4):
        shards = split_full_tensor(qkv, 0, tp, stride=3)
        # rank r holds [q_r; k_r; v_r]
        q, k, v = qkv.chunk(3)
        per = 12 // tp
        assert torch.equal(shards[-1], torch.cat([x[(tp - 1) * per:] for x in (q, k, v)]))
        assert torch.equal(merge_shards(shards, 0, stride=3), qkv)
        assert torch.equal(split_full_tensor(qkv, 0, tp, tp - 1, stride=3), shards[-1])
    row = torch.randn(4, 12, generator=g)
    assert torch.equal(merge_shards(split_full_tensor(row, 1, 3), 1), row)
    vocab = torch.randn(1001, 3, generator=g)
    shards = split_full_tensor(vocab, 0, 4, pad=True)
    assert [s.shape[0] for s in shards] == [251] * 4 and shards[-1][-3:].abs().sum() == 0
    assert torch.equal(merge_shards(shards, 0, vocab_size=1001), vocab)


def test_split_rejects_indivisible():
    import pytest
    with pytest.raises(ValueError, match="not divisible"):
        split_full_tensor(torch.zeros(10, 2), 0, 4)
    with pytest.raises(ValueError, match="not divisible"):
        split_full_tensor(torch.zeros(3 * 6, 2), 0, 4, stride=3)


def test_rng_tracker_fork_and_seed():
    model_parallel_seed(5, tp_rank=0, tp_size=2)
    tracker = get_rng_tracker()
    s0 = tracker.get_states()[TENSOR_PARALLEL_RNG]
    default_before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    with tracker.fork():
        b = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), default_before), "fork leaked into the default generator"
    assert not torch.equal(a, b), "fork restarted the stream instead of continuing it"
    model_parallel_seed(5, tp_rank=1, tp_size=2)
    assert not torch.equal(get_rng_tracker().get_states()[TENSOR_PARALLEL_RNG], s0)
    assert torch.equal(torch.get_rng_state(), default_before), "default seed must not depend on TP rank"
    model_parallel_seed(5, tp_rank=0, tp_size=2)
    with get_rng_tracker().fork():
        assert torch.equal(torch.rand(4), a)
    model_parallel_seed(5, tp_rank=0, tp_size=1)
    assert get_rng_tracker().get_states() == {}


def test_checkpoint_replays_tracker_and_default_rng():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8).double()

    def fn(x):
        with get_rng_tracker().fork():
            x = torch.nn.functional.dropout(lin(x), 0.5)
        return torch.nn.functional.dropout(x.tanh(), 0.3)  # default generator

    x0 = torch.randn(6, 8, dtype=torch.float64)
    grads = []
    for use_ckpt in (False, True):
        model_parallel_seed(3, tp_rank=1, tp_size=2)
        lin.zero_grad()
        x = x0.clone().requires_grad_()
        y = checkpoint(fn, x) if use_ckpt else fn(x)
        torch.rand(3)  # draws between forward and backward must not disturb the recompute
        with get_rng_tracker().fork():
            torch.rand(3)
        y.square().sum().backward()
        grads.append((y.detach(), x.grad, lin.weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


def _b16_worker(rank, world, result_path):
    """ViT-B/16 at TP=2 (12 vision heads, 8 text heads, 3072 MLP units split in two) against
    TP=1 from the same seed: the public faces agree on one image and one caption."""
    torch.set_num_threads(1)
    state = init_parallel_state(tensor_parallel=world)
    cfg = get_config("vit_b16")
    cfg.text.vocab_size = 5003  # odd: the vocab-parallel table is padded
    images, ids = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)), \
        torch.tensor([[2] + list(range(10, 30)) + [3] + [0] * 55])
    results = {}
    for name, group in (("tp1", None), ("tp2", state.tp_group)):
        model_parallel_seed(SEED, state.tp_rank if group is not None else 0, world if group is not None else 1)
        model = build_model(cfg, ParallelSpec(tp_group=group)).eval()
        with torch.no_grad():
            results[name] = (model.encode_image(images), model.encode_text(ids))
        del model
    for a, b in zip(results["tp1"], results["tp2"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    if rank == 0:
        torch.save(results["tp2"], result_path)


def test_vit_b16_runs_with_tp2_and_matches_tp1(tmp_path):
    spawn(_b16_worker, 2, str(tmp_path / "b16.pt"))
    image, text = torch.load(tmp_path / "b16.pt")
    assert image.shape == (1, 512) and text.shape == (1, 512) and torch.isfinite(image).all()
