"""benchmarks/bench_step.py runs end to end on the CPU with the tiny preset and writes its summary."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_step_tiny_cpu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "benchmarks/bench_step.py", "--model", "tiny", "--device", "cpu", "--steps", "3",
           "--threads", "1", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "| model | attention | KL |" in res.stdout
    summary = json.loads(out.read_text())
    rows = summary["rows"]
    # flash,math x fused,reference; on CPU "flash" is SDPA and "fused" the streaming KL
    assert {(r["attention"], r["kl"]) for r in rows} == {("sdpa", "streaming"), ("sdpa", "reference"),
                                                         ("math", "streaming"), ("math", "reference")}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["step_s"] > 0 and r["samples_per_s"] == 8 / r["step_s"]
        assert r["model_tflop_per_step"] > 0 and r["tflops"] > 0 and r["mfu"] is None  # no CPU peak
        assert r["peak_mem_gb"] > 0
    # the same model and batch: every configuration starts from the same loss
    losses = [r["loss"] for r in rows]
    assert max(losses) - min(losses) < 1e-3
    assert (tmp_path / "bench.md").read_text().count("| tiny |") == 4


def test_bench_step_oom_row_and_mfu(tmp_path):
    # --peak-tflops gives an MFU on the CPU; a failing configuration becomes a row, not a crash
    cmd = [sys.executable, "benchmarks/bench_step.py", "--model", "tiny,nonexistent", "--device", "cpu",
           "--steps", "1", "--warmup", "1", "--threads", "1", "--attn", "sdpa", "--kl", "reference",
           "--peak-tflops", "1.0", "--out", str(tmp_path / "b.json")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert rows[0]["status"] == "ok" and 0 < rows[0]["mfu"] < 1
    assert rows[1]["status"] == "error" and "unknown model preset" in rows[1]["error"]


def _bench_step_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_step", os.path.join(ROOT, "benchmarks", "bench_step.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_master_weight_adamw_is_deepspeed_bf16_layout():
    """bf16 module + fp32 master: the master follows fp32 AdamW exactly; the module holds its rounding."""
    import torch
    bench = _bench_step_module()
    torch.manual_seed(0)
    ref = torch.nn.Linear(8, 4)
    low = torch.nn.Linear(8, 4)
    low.load_state_dict(ref.state_dict())
    master_init = [p.detach().clone() for p in ref.parameters()]
    low = low.to(torch.bfloat16)
    opt = bench.MasterWeightAdamW(low.parameters(), lr=1e-2, weight_decay=0.05)
    # the master starts from the fp32 weights' bf16 rounding (what DeepSpeed's bf16 engine holds)
    ref_params = [torch.nn.Parameter(m.to(torch.bfloat16).float()) for m in master_init]
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.05)
    for step in range(3):
        grads = [torch.randn_like(p, dtype=torch.float32) for p in ref_params]
        for p, g in zip(low.parameters(), grads):
            p.grad = g.to(torch.bfloat16)
        for p, g in zip(ref_params, grads):
            p.grad = g.to(torch.bfloat16).float()  # the gradient the module produced
        opt.step()
        ref_opt.step()
        opt.zero_grad()
    for m, r, p in zip(opt.master, ref_params, low.parameters()):
        assert m.dtype == torch.float32 and p.dtype == torch.bfloat16 and p.grad is None
        torch.testing.assert_close(m, r, rtol=0, atol=0)
        assert torch.equal(p, m.to(torch.bfloat16))


def test_bench_step_trainer_precision_on_cpu(tmp_path):
    """--weights bf16 (DeepSpeed's layout) runs and is recorded; TF32 untouched by default."""
    cmd = [sys.executable, "benchmarks/bench_step.py", "--model", "tiny", "--device", "cpu", "--dtype", "bf16",
           "--steps", "1", "--warmup", "1", "--threads", "1", "--attn", "sdpa", "--kl", "streaming",
           "--prototypes", "24", "--activation-checkpointing", "every", "--out", str(tmp_path / "b.json")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    summary = json.loads((tmp_path / "b.json").read_text())
    assert summary["weights"] == "bf16" and summary["tf32"] == {"matmul": False, "cudnn": True}
    (row,) = summary["rows"]
    assert row["status"] == "ok", row
    assert row["prototypes"] == 24 and row["weights"] == "bf16"
    assert row["checkpointing"] == "every" and row["checkpointed_fraction"] == 1.0
    # executed FLOPs include activation-checkpointing and KL recompute
    assert row["executed_tflop_per_step"] > row["model_tflop_per_step"] > 0


def test_bench_step_checkpointing_is_the_trainers_planner_choice(monkeypatch):
    """``auto`` resolves as the trainer's option does: the planner's pick for the device memory."""
    import torch
    from rils_scale.models import get_config
    from rils_scale.train import hardware
    from rils_scale.train.capacity import PlanConfig, choose_activation_checkpointing
    bench = _bench_step_module()
    cfg, cuda = get_config("vit_b16"), torch.device("cuda")
    monkeypatch.setattr(hardware, "device_memory_bytes", lambda device=None: 80 * 2**30)
    args = bench.parse_args(["--device", "cpu", "--dtype", "bf16"])
    assert bench.checkpointed_fraction(cfg, 8, "sdpa", "streaming", args, torch.device("cpu")) == ("none", 0.0)
    for micro in (256, 1024, 4096):
        plan = PlanConfig(model=cfg, gpus=1, tensor_parallel=1, gpus_per_node=1, zero_stage=0, micro_batch=micro,
                          gpu_memory_gb=80.0)
        expected = choose_activation_checkpointing(plan, "auto")
        assert bench.checkpointed_fraction(cfg, micro, "flash", "streaming", args, cuda) == \
            (expected.policy, expected.fraction)
    assert bench.checkpointed_fraction(cfg, 256, "flash", "streaming", args, cuda)[0] == "none"
    assert bench.checkpointed_fraction(cfg, 4096, "flash", "streaming", args, cuda)[0] in ("selective", "every")
    args = bench.parse_args(["--device", "cpu", "--no-checkpointing"])
    assert args.activation_checkpointing == "none"


def _fake_outputs(b=4, n=10, e=16, n_masked=6, seed=0):
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        mask[i, torch.randperm(n, generator=g)[:n_masked]] = True
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g), dim=-1)  # noqa: E731
    return {"image_features": unit(b, e), "text_features": unit(b, e), "logit_scale": torch.tensor(10.0),
            "student_patches": unit(b, n, e), "teacher_patches": unit(b, n, e), "mask": mask}


def test_rils_loss_step_does_no_host_work():
    """The timed step draws no random numbers and copies no padding (issue 17, item 6): the G - B
    padding prototypes are made once, outside it; the loss equals the float64 formula with them."""
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode
    from rils_scale.ops import patch_sentence_kl_reference
    bench = _bench_step_module()
    out, b, n_masked, G = _fake_outputs(), 4, 6, 24
    pad = bench.prototype_padding(G - b, 16, torch.device("cpu"), torch.float32)
    labels = torch.arange(b)
    ops = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Spy():
        loss = bench.rils_loss(out, n_masked, "streaming", pad, labels)
    assert ops and not [o for o in ops if any(w in o for w in ("rand", "normal", "uniform", "_to_copy"))], ops
    # reference: the same loss in float64 from the definitions
    d = {k: (v.double() if v.is_floating_point() else v) for k, v in out.items()}
    cols = torch.cat([d["text_features"], pad.double()])
    img_cols = torch.cat([d["image_features"], pad.double()])
    s = d["logit_scale"]
    clip = 0.5 * (F.cross_entropy(s * d["image_features"] @ cols.T, labels)
                  + F.cross_entropy(s * d["text_features"] @ img_cols.T, labels))
    m = d["mask"]
    kl = patch_sentence_kl_reference(d["student_patches"][m], d["teacher_patches"][m], cols,
                                     student_temp=0.1, teacher_temp=0.04)
    torch.testing.assert_close(loss.double(), clip + 0.5 * kl.mean(), rtol=1e-5, atol=1e-6)
    assert bench.prototype_padding(0, 16, torch.device("cpu"), torch.float32) is None


def test_bench_step_writes_each_row_when_it_exists(tmp_path):
    """A run killed during its second configuration keeps the first row in --rows, --out JSON and .md."""
    import pytest
    bench = _bench_step_module()
    calls = []

    def run_config(model, attn, kl, args, device):
        calls.append(kl)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed mid-configuration
        return {"model": model, "attention": attn, "kl": kl, "micro_batch": 8, "prototypes": 8, "status": "ok",
                "checkpointing": "none", "step_s": 0.5, "samples_per_s": 16.0, "tflops": 1.5, "mfu": None,
                "executed_tflops": 2.0, "peak_mem_gb": 0.25}

    bench.run_config = run_config
    rows, out = tmp_path / "rows.jsonl", tmp_path / "b.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--model", "tiny", "--device", "cpu", "--attn", "sdpa", "--kl", "streaming,reference",
                    "--rows", str(rows), "--out", str(out)])
    (line,) = rows.read_text().splitlines()
    assert json.loads(line)["kl"] == "streaming" and json.loads(line)["samples_per_s"] == 16.0
    assert [r["kl"] for r in json.loads(out.read_text())["rows"]] == ["streaming"]
    assert "| tiny | sdpa | streaming | 8 | 8 | none | 0.5000 | 16.0 |" in (tmp_path / "b.md").read_text()
