"""backend="auto": the fastest backend that passed its self-check, per shape class, cached.

Timings and self-check verdicts are injected (no test depends on machine speed); the candidates are the
ones auto may choose on a CPU (the streaming variants) plus, where a test says so, fakes.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rils_scale.ops import kl_select, patch_sentence_kl, patch_sentence_kl_reference
from rils_scale.ops.kl_selfcheck import selfcheck_in_subprocess


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("RILS_KL_SELECTION_CACHE", str(tmp_path / "sel.json"))
    kl_select.clear()
    yield tmp_path / "sel.json"
    kl_select.clear()


def _inputs(P=40, M=70, D=12):
    g = torch.Generator().manual_seed(0)
    return [F.normalize(torch.randn(n, D, generator=g), dim=-1) for n in (P, P, M)]


def _fake(monkeypatch, seconds: dict, verdicts: dict):
    timed, checked = [], []

    def time_backend(be, *a):
        timed.append(be)
        return seconds[be]

    def run_check(be, device):
        checked.append(be)
        return verdicts.get(be, (True, "ok"))

    monkeypatch.setattr(kl_select, "_time_backend", time_backend)
    monkeypatch.setattr(kl_select, "_run_check", run_check)
    return timed, checked


def test_fastest_correct_backend_is_chosen_and_cached(fresh, monkeypatch):
    s, t, T = _inputs()
    # streaming_chunked is fastest but fails its self-check: never chosen, never timed
    timed, checked = _fake(monkeypatch, {"streaming": 0.5, "streaming_chunked": 0.1},
                           {"streaming_chunked": (False, "wrong numbers")})
    kw = dict(student_temp=0.1, teacher_temp=0.04, need_s=True, need_t=True)
    assert kl_select.select_backend(s, t, T, **kw) == "streaming"
    assert timed == ["streaming"] and sorted(checked) == ["streaming", "streaming_chunked"]
    entry = json.loads(fresh.read_text())[kl_select.shape_class(s, T, True, True)]
    assert entry["backend"] == "streaming" and "streaming_chunked" in entry["failed"]

    # now both pass and chunked is faster
    timed, checked = _fake(monkeypatch, {"streaming": 0.5, "streaming_chunked": 0.1}, {})
    kl_select.clear()
    fresh.unlink()
    assert kl_select.select_backend(s, t, T, **kw) == "streaming_chunked"
    assert sorted(timed) == ["streaming", "streaming_chunked"]

    # same shape class (P, M, D rounded up to powers of two): in-process cache, nothing re-timed
    timed.clear()
    s2, t2, T2 = _inputs(P=33, M=100, D=16)
    assert kl_select.select_backend(s2, t2, T2, **kw) == "streaming_chunked" and timed == []
    # a new process (in-process state cleared) reuses the JSON cache: no self-check, no timing
    kl_select.clear()
    checked.clear()
    assert kl_select.select_backend(s, t, T, **kw) == "streaming_chunked"
    assert timed == [] and checked == []
    # another shape class (no gradients) is measured on its own
    assert kl_select.select_backend(s, t, T, **dict(kw, need_s=False, need_t=False)) == "streaming_chunked"
    assert sorted(timed) == ["streaming", "streaming_chunked"]
    assert len(json.loads(fresh.read_text())) == 2


def test_cache_entry_for_a_backend_not_allowed_here_is_ignored(fresh, monkeypatch):
    s, t, T = _inputs()
    key = kl_select.shape_class(s, T, True, False)
    fresh.write_text(json.dumps({key: {"backend": "cuda"}}))    # e.g. copied from a GPU node
    _fake(monkeypatch, {"streaming": 0.2, "streaming_chunked": 0.3}, {})
    assert kl_select.select_backend(s, t, T, student_temp=0.1, teacher_temp=0.04,
                                    need_s=True, need_t=False) == "streaming"


def test_no_correct_backend_raises(fresh, monkeypatch):
    s, t, T = _inputs()
    _fake(monkeypatch, {}, {"streaming": (False, "x"), "streaming_chunked": (False, "y")})
    with pytest.raises(RuntimeError, match="no backend passed"):
        kl_select.select_backend(s, t, T, student_temp=0.1, teacher_temp=0.04, need_s=True, need_t=True)


def test_auto_end_to_end_on_cpu(fresh):
    """Real self-checks (in-process on CPU) and real timings: auto picks a streaming variant and its
    result matches the reference; the shape class key names device, dtype and gradients."""
    s, t, T = _inputs(P=30, M=50, D=8)
    s.requires_grad_()
    out = patch_sentence_kl(s, t, T, student_temp=0.1, teacher_temp=0.04)
    ref = patch_sentence_kl_reference(s.double(), t.double(), T.double(), student_temp=0.1, teacher_temp=0.04)
    assert torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-6)
    (key, entry), = json.loads(fresh.read_text()).items()
    assert entry["backend"] in kl_select.CPU_CANDIDATES
    assert "|float32|grad=s|P32|M64|D8|" in key


def test_selfcheck_subprocess_command_on_cpu():
    ok, reason = selfcheck_in_subprocess("streaming", "cpu", timeout_s=300, quick=True)
    assert ok, reason
    ok, reason = selfcheck_in_subprocess("no_such_backend", "cpu", timeout_s=300, quick=True)
    assert not ok and "exited" in reason and "no_such_backend" in reason


def _agree_worker(rank, world_size, case):
    import torch.distributed as dist
    from rils_scale.objectives import reconstruction
    from rils_scale.ops import kl_select as sel
    sel.clear()
    sel.select_backend = lambda *a, **k: ("streaming_chunked", "streaming")[rank]  # the ranks disagree
    if case == "unusable_on_rank1":
        sel.backend_ok = lambda backend, device: (not (rank == 1 and backend == "streaming_chunked"), "")
    used, kl = [], reconstruction.patch_sentence_kl
    reconstruction.patch_sentence_kl = lambda *a, backend, **k: (used.append(backend), kl(*a, backend=backend, **k))[1]
    g = torch.Generator().manual_seed(rank)
    b, n, e = 3, 8, 16
    student = F.normalize(torch.randn(b, n, e, generator=g), dim=-1).requires_grad_()
    teacher = F.normalize(torch.randn(b, n, e, generator=g), dim=-1)
    protos = F.normalize(torch.randn(6, e, generator=g), dim=-1)
    mask = (torch.arange(n) % 2).float().expand(b, n)
    loss_fn = reconstruction.PatchSentenceReconstructionLoss(dp_group=dist.group.WORLD)
    for _ in range(2):
        loss_fn(student, teacher, mask, torch.ones(b, dtype=torch.bool), protos).loss.backward()
    expected = "streaming_chunked" if case == "usable" else "streaming"
    assert used == [expected, expected], (rank, used)


@pytest.mark.parametrize("case", ["usable", "unusable_on_rank1"])
def test_auto_is_one_backend_for_every_rank(case):
    """``auto`` under DP: every rank uses global rank 0's choice (decided once), or ``streaming``
    when that choice did not pass the self-check on some rank."""
    from distributed_utils import spawn
    spawn(_agree_worker, 2, case)
