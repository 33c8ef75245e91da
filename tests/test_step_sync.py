"""No host synchronisation inside a training step (docs/performance.md, §7).

The real :meth:`Trainer.train_step` (DeepSpeed ZeRO-3, fp32, tiny model, the real loader) runs
on 2 spawned gloo ranks, once as DP 2 x TP 1 (random masking) and once as TP 2 (sequence
parallel, text-guided masking), with :class:`sync_spy.SyncSpy` active for whole steps (forward,
losses, backward, optimizer step, the non-finite guard, the logit-scale clamp) except the
loader's own host work. The first two steps run without the spy (DeepSpeed records and checks
its ZeRO-3 module trace there, once). Every op that reads a device value back to the host fails
the test, except the documented reads of the optimizer step (``sync_spy.STEP_SITES``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from distributed_utils import spawn, zero3_fp32_config
from sync_spy import STEP_SITES, SyncSpy

REPO = Path(__file__).resolve().parents[1]
ZERO3_FP32 = zero3_fp32_config(micro_batch=4)


def test_spy_catches_host_reads():
    """The spy fails the old reconstruction bookkeeping (nonzero + host count) and friends."""
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    keep = torch.tensor([True, False])
    x = torch.randn(2, 3, 4)
    with SyncSpy() as spy:
        idx = ((mask > 0) & keep[:, None]).flatten().nonzero().squeeze(1)  # the old code
        int(idx.numel())  # a size: no read
        x.reshape(-1, 4)[mask.flatten() > 0].sum()  # boolean-mask indexing
        float(x.sum())  # .item()
        x.sum(dim=-1).tolist()
        torch.unique(mask)
        torch.repeat_interleave(torch.tensor([1, 2]))
    ops = [v.op for v in spy.violations]
    assert len(ops) == 6, spy.report()
    assert "aten.nonzero.default" in ops[0] and "index" in ops[1] and "_local_scalar_dense" in ops[2]
    assert ops[3] == "Tensor.tolist" and "unique" in ops[4] and "repeat_interleave" in ops[5]
    with SyncSpy() as spy:  # the fixed-size form: nothing
        from rils_scale.objectives.rows import candidate_rows
        idx, counted = candidate_rows(mask, keep)
        torch.where(counted, x.reshape(-1, 4).index_select(0, idx).sum(-1), 0).sum() / counted.sum().clamp(min=1)
    assert not spy.violations, spy.report()


def _data(root):
    import importlib.util

    from rils_scale.data.scenes import write_scenes_dataset
    from rils_scale.data.tokenizer_training import train_tokenizer
    write_scenes_dataset(root / "shapes", num_train=64, num_heldout=0, shard_size=32)
    spec = importlib.util.spec_from_file_location("train_tokenizer_cli", REPO / "launchers" / "train_tokenizer.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    captions, _ = cli.collect_captions([str(root / "shapes" / "train")])
    train_tokenizer(captions, root / "tok", vocab_size=128)
    (root / "zero3.json").write_text(json.dumps(ZERO3_FP32))
    return {"train": str(root / "shapes" / "train"), "tokenizer": str(root / "tok.model"),
            "ds_config": str(root / "zero3.json")}


class _Unwatched:
    """The loader's iterator with the spy suspended while it produces a batch (host work)."""

    def __init__(self, it):
        self.it = it

    def __next__(self):
        from torch.utils._python_dispatch import _disable_current_modes
        with _disable_current_modes():
            return next(self.it)


def _sync_worker(rank, world, data, out_dir):
    from rils_scale.train.config import TrainConfig
    from rils_scale.train.loop import Trainer
    results = []
    for tp in (1, 2):
        cfg = TrainConfig(model="tiny", train_data=data["train"], tokenizer=data["tokenizer"],
                          ds_config=data["ds_config"], precision="fp32", num_workers=1, shuffle_buffer=16,
                          output_dir=os.path.join(out_dir, f"tp{tp}"), max_steps=4, warmup_steps=1,
                          tensor_parallel=tp, sequence_parallel=tp > 1, kl_backend="streaming", seed=1,
                          mask_strategy="text-guided" if tp > 1 else "random")
        trainer = Trainer(cfg)
        # --activation-checkpointing auto (the default) on a CPU: none, and why
        assert (trainer.checkpointing.requested, trainer.checkpointing.policy) == ("auto", "none")
        assert trainer.checkpointing.reason.startswith("CPU") and trainer.spec.activation_checkpointing == 0
        trainer.loader = trainer._loader()
        batches = _Unwatched(iter(trainer.loader))
        for _ in range(2):  # unwatched: DeepSpeed records and checks its module trace (host reads)
            trainer.train_step(batches)
        with SyncSpy(STEP_SITES) as spy:
            for _ in range(2):
                assert trainer.train_step(batches)["step_applied"]
        trainer.loader.close()
        results.append({"tp": tp, "violations": [str(v) for v in spy.violations], "report": spy.report(),
                        "allowed": sorted({f"{v.op} via {v.site.function}" for v in spy.allowed})})
        del trainer
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    from rils_scale.parallel.cpu_comm import release_cpu_shm_buffer
    release_cpu_shm_buffer()  # DeepSpeed's CPU all-reduce buffer (66 MB per rank) is never unlinked


@pytest.mark.slow
def test_train_step_has_no_host_sync_tp1_and_tp2(tmp_path):
    pytest.importorskip("deepspeed")
    data = _data(tmp_path)
    spawn(_sync_worker, 2, data, str(tmp_path))
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [r["tp"] for r in results] == [1, 2]
        for r in results:
            assert not r["violations"], f"rank {rank} TP {r['tp']}: host reads in a training step:\n{r['report']}"
            print(f"rank {rank} TP {r['tp']}: allowed host reads: {r['allowed']}")
