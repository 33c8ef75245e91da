"""The capacity planner against measured memory of real CPU training steps, and a CLI smoke test.

Measurement (run in a fresh subprocess, ``python tests/test_plan.py --measure ...``): a
TorchDispatchMode samples glibc's ``mallinfo2()`` (bytes in use on the heap plus mmapped
chunks) after every aten op of the third training step (model forward, the stand-in RILS loss
of tests/test_flops.py, backward, AdamW step); the peak minus the heap in use before the model
was built is compared with the planner's peak for the same setting (fp32, ZeRO stage 0, one
process, math attention, reference KL). Intra-op scratch buffers are not sampled and the
planner's backward transient is an approximation: docs/performance.md records the error.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from rils_scale.models import get_config
from rils_scale.models.config import RILSConfig, TextConfig, VisionConfig
from rils_scale.train.capacity import PlanConfig, max_micro_batch, memory_per_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def custom_small() -> RILSConfig:
    """Activation-heavy but cheap: 64 px / 8 px patches (64 patches), width 128, 4 blocks."""
    return RILSConfig(vision=VisionConfig(image_size=64, patch_size=8, width=128, depth=4, heads=4),
                      text=TextConfig(context_length=32, vocab_size=1000, width=128, depth=4, heads=4),
                      embed_dim=128, name="custom_small")


CONFIGS = {"tiny": lambda: get_config("tiny"), "custom_small": custom_small}


def _planned(name: str, batch: int, attention: str, ckpt: bool) -> float:
    pc = PlanConfig(model=CONFIGS[name](), gpus=1, zero_stage=0, micro_batch=batch, precision="fp32",
                    attention=attention, recon_backend="reference", gpu_memory_gb=1e6,
                    activation_checkpointing=ckpt)
    return memory_per_gpu(pc)["peak"]


def _measure(name: str, batch: int, attention: str, ckpt: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", name, str(batch), attention, str(int(ckpt))]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name,batch,attention,ckpt", [
    ("tiny", 64, "math", False), ("custom_small", 32, "math", False), ("custom_small", 32, "sdpa", False),
    ("custom_small", 32, "math", True)])
def test_planner_matches_measured_cpu_peak(name, batch, attention, ckpt):
    measured = _measure(name, batch, attention, ckpt)
    planned = _planned(name, batch, "math" if attention == "math" else "flash", ckpt)
    err = (planned - measured["peak_tracked"]) / measured["peak_tracked"]
    print(f"\n{name} B={batch} {attention}{' checkpointed' if ckpt else ''}: planned {planned / 2**20:.1f} MiB, measured "
          f"{measured['peak_tracked'] / 2**20:.1f} MiB (tracked heap), "
          f"{measured['peak_rss_delta'] / 2**20:.1f} MiB (RSS high-water mark - RSS before the model), error {err:+.1%}")
    assert abs(err) < 0.30


def test_planner_scaling_rules():
    cfg = get_config("vit_h14")
    base = PlanConfig(model=cfg, gpus=64, tensor_parallel=1, zero_stage=3, micro_batch=32)
    m = memory_per_gpu(base)
    # ZeRO-3 over 64 ranks: 16 B/param / 64 of the 1.01 B parameters
    assert (m["params"] + m["grads"] + m["optimizer"]) == pytest.approx(16 * 1_008_697_601 / 64, rel=1e-6)
    # stage 0 holds everything: 16 B/param
    s0 = memory_per_gpu(base.replace(zero_stage=0))
    assert s0["params"] + s0["grads"] + s0["optimizer"] == pytest.approx(16 * 1_008_697_601, rel=1e-6)
    # checkpointing cuts activations by far more than half; TP halves the sharded activations
    ck = memory_per_gpu(base.replace(activation_checkpointing=True))
    assert ck["activations"] < 0.3 * m["activations"]
    tp = memory_per_gpu(base.replace(tensor_parallel=2))
    assert 0.5 * m["activations"] < tp["activations"] < 0.8 * m["activations"]
    sp = memory_per_gpu(base.replace(tensor_parallel=2, sequence_parallel=True))
    assert sp["activations"] < tp["activations"]
    # math attention stores heads * S^2 per block: more than the kernels' output + LSE
    assert memory_per_gpu(base.replace(attention="math"))["activations"] > m["activations"]
    # offload moves the optimizer state off the GPU
    off = memory_per_gpu(base.replace(offload=True))
    assert off["optimizer"] == 0 and off["cpu_offload"] > m["optimizer"]
    # the largest micro-batch fits and the next one does not
    b = max_micro_batch(base)
    assert memory_per_gpu(base, b)["fits"] and not memory_per_gpu(base, b + 1)["fits"]


def test_plan_cli_smoke():
    cmd = [sys.executable, "-m", "rils_scale.plan", "--model", "vit_h14", "--gpus", "512", "--tensor-parallel", "2",
           "--zero", "3", "--micro-batch", "64", "--activation-checkpointing", "--gpu-memory-gb", "80",
           "--peak-tflops", "989", "--mfu", "0.45", "--inter-node-gbps", "400", "--intra-node-gbps", "900"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    for word in ("Memory per GPU", "activations", "loss workspace", "Communication per GPU",
                 "zero3_param_allgather", "tp_allreduce", "STEP", "largest micro-batch"):
        assert word in res.stdout
    res = subprocess.run(cmd + ["--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    out = json.loads(res.stdout)
    assert out["data_parallel"] == 256 and out["memory"]["fits"] and out["time"]["step_s"] > 0
    bad = subprocess.run([sys.executable, "-m", "rils_scale.plan", "--model", "vit_h14", "--gpus", "6",
                          "--tensor-parallel", "4"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode != 0 and "error" in bad.stderr


# --------------------------------------------------------------------------- subprocess side
class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def _measure_main(name: str, batch: int, attention: str, ckpt: bool) -> None:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from rils_scale.models import ParallelSpec, build_model
    from rils_scale.train.hardware import reset_peak_memory, rss_high_water_bytes, current_rss_bytes
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_flops import stand_in_loss

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2

    def heap() -> int:
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd

    class Sampler(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            Sampler.peak = max(Sampler.peak, heap())
            return out

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = CONFIGS[name]()
    images = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = torch.randint(1, cfg.text.vocab_size, (batch, cfg.text.context_length))
    base, rss_base = heap(), current_rss_bytes()  # the planner counts the images: add them back
    inputs = images.numel() * 4
    model = build_model(cfg, ParallelSpec(activation_checkpointing=ckpt), attn_backend=attention)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = stand_in_loss(model(images, tokens))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    reset_peak_memory("cpu")
    Sampler.peak = heap()
    with Sampler():
        step()
    rss_peak = rss_high_water_bytes()
    print(json.dumps({"peak_tracked": Sampler.peak - base + inputs, "peak_rss_delta": rss_peak - rss_base + inputs,
                      "resident_after_step": heap() - base + inputs}))


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--measure":
    _measure_main(sys.argv[2], int(sys.argv[3]), sys.argv[4], bool(int(sys.argv[5])))
