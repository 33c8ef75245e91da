"""CUDA self-check verdicts are kept on node-local disk (rils_scale/ops/kl_select.py), so a new process
does not re-run the self-check subprocesses; the key follows the KL sources, torch and the device.

No GPU: a ``torch.device("cuda", 0)`` object needs none, the device name and the check are injected.
"""
from __future__ import annotations

import json

import pytest
import torch

from rils_scale.ops import kl_select


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("RILS_KL_SELECTION_CACHE", str(tmp_path / "sel.json"))
    monkeypatch.setattr(kl_select, "device_name", lambda device: "FakeGPU 80GB" if device.type == "cuda" else "cpu")
    runs = []
    verdicts = {"triton": (True, "ok"), "hybrid": (False, "hybrid self-check failed on cuda:0: loss rel. error 1e-1"),
                "cuda": (False, "fused extension unavailable (no nvcc)"),
                "streaming": (False, "streaming self-check timed out after 600 s on cuda:0")}

    def run_check(backend, device):
        runs.append(backend)
        return verdicts[backend]

    monkeypatch.setattr(kl_select, "_run_check", run_check)
    kl_select.clear()
    yield runs, tmp_path / "kl_selfcheck.json"
    kl_select.clear()


def test_verdicts_survive_the_process_and_follow_the_sources(fake_gpu, monkeypatch):
    runs, path = fake_gpu
    dev = torch.device("cuda", 0)
    first = {b: kl_select.backend_ok(b, dev) for b in ("triton", "hybrid", "cuda", "streaming")}
    assert runs == ["triton", "hybrid", "cuda", "streaming"]
    assert first["triton"] == (True, "ok") and first["hybrid"][0] is False
    stored = json.loads(path.read_text())
    # the check's own verdicts are kept; "not built yet" and a time-out are circumstances, not verdicts
    assert sorted(k.split("|")[1] for k in stored) == ["hybrid", "triton"]
    assert all(k.startswith("FakeGPU 80GB|") and f"torch{torch.__version__}|" in k for k in stored)

    kl_select.clear()  # a new process: only the in-memory state is gone
    again = {b: kl_select.backend_ok(b, dev) for b in ("triton", "hybrid", "cuda", "streaming")}
    assert runs[4:] == ["cuda", "streaming"]  # re-checked: not cached
    assert again["triton"][0] is True and "cached" in again["triton"][1]
    assert again["hybrid"][0] is False and "rel. error" in again["hybrid"][1]

    kl_select.clear()  # a changed kernel source: every verdict is taken again
    monkeypatch.setattr(kl_select, "_SRC_HASH", "0123456789abcdef")
    kl_select.backend_ok("triton", dev)
    assert runs[-1] == "triton" and len(runs) == 7


def test_cpu_checks_stay_in_process(fake_gpu):
    runs, path = fake_gpu
    assert kl_select.backend_ok("triton", torch.device("cpu")) == (True, "ok")
    assert runs == ["triton"] and not path.exists()
