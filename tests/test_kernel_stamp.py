"""Build plumbing of the fused extension that a CPU can check (no compiler run): the toolchain check
answers before any build, the JIT cache is keyed by arch / torch / CUDA / Python / sources, and a
prebuilt module is refused when its stamp (source hash, archs) does not match."""
from __future__ import annotations

import types

import pytest

from rils_scale.ops import _extension, build_kernels


def test_missing_nvcc_is_reported_before_any_build(monkeypatch):
    monkeypatch.setattr(_extension, "cuda_home", lambda: None)
    import torch
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    problem = _extension.check_toolchain()
    assert "nvcc" in problem and "CUDA_HOME" in problem
    with pytest.raises(RuntimeError, match="cannot build the fused kernel: no CUDA toolkit"):
        _extension.jit_build(["90"])
    with pytest.raises(RuntimeError, match="no CUDA toolkit"):
        _extension.compile_only(archs=["90"])
    assert build_kernels.main([]) == 2


def test_missing_ninja_and_cpu_torch(monkeypatch):
    import torch
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only" in _extension.check_toolchain()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(_extension, "cuda_home", lambda: "/usr/local/cuda")
    real_which = _extension.shutil.which
    monkeypatch.setattr(_extension.shutil, "which", lambda n: None if n == "ninja" else real_which(n) or n)
    assert "ninja" in _extension.check_toolchain(jit=True)
    assert _extension.check_toolchain(jit=False) is None


def test_jit_cache_is_node_local_and_keyed(monkeypatch, tmp_path):
    monkeypatch.delenv("RILS_KERNELS_CACHE", raising=False)
    d90, d80 = _extension.jit_cache_dir(["90"]), _extension.jit_cache_dir(["80"])
    assert d90 != d80 and "sm90" in d90.name and _extension.source_hash() in d90.name
    assert "rils_scale_" in str(d90.parent)      # under the node-local temp dir, per user
    monkeypatch.setenv("RILS_KERNELS_CACHE", str(tmp_path))
    assert _extension.jit_cache_dir(["90"]).parent == tmp_path
    monkeypatch.setattr(_extension, "source_hash", lambda: "0123456789abcdef")
    assert _extension.jit_cache_dir(["90"]) != d90.parent / d90.name


def test_prebuilt_stamp_is_checked(monkeypatch):
    h = _extension.source_hash()
    good = types.SimpleNamespace(source_hash=h, cuda_archs="80_90")
    assert _extension.stamp_problem(good, (9, 0)) is None
    assert _extension.stamp_problem(good, (8, 6)) is None          # sm_80 SASS runs on sm_86
    assert "no binary for sm_100" in _extension.stamp_problem(good, (10, 0))
    assert "no binary for sm_75" in _extension.stamp_problem(good, (7, 5))
    stale = types.SimpleNamespace(source_hash="deadbeef", cuda_archs="90")
    assert "stale" in _extension.stamp_problem(stale, (9, 0))
    unstamped = types.SimpleNamespace()                            # a module built before stamps existed
    assert "stale" in _extension.stamp_problem(unstamped, None)
    # the defines are bare tokens (no quotes to carry through shells) and name every arch
    assert dict(_extension.stamp_defines(["80", "9.0"])) == {"RILS_SOURCE_HASH": h, "RILS_CUDA_ARCHS": "80_90"}
