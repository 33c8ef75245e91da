"""A JIT build killed midway must never make a later load wait (rils_scale/ops/build_lock.py).

torch <= 2.11 (the GPU machine's) guards ``cpp_extension.load`` with a FileBaton: a ``lock`` file
whose mere existence makes every later load wait forever. The compile itself is replaced by a fake
``load`` that behaves like torch 2.11's (take the baton with O_EXCL, or wait for it: here, raise
instead of waiting), so these tests run on the CPU in a second.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import subprocess
import sys
import time
import types

import pytest
import torch
from torch.utils.file_baton import FileBaton

from rils_scale.ops import _extension, build_lock


def torch211_load(calls):
    """torch 2.11's _jit_compile around the build: FileBaton try_acquire, else wait (forever)."""
    def load(name, sources, build_directory, **kw):
        baton = FileBaton(os.path.join(build_directory, "lock"))
        if not baton.try_acquire():
            raise AssertionError("torch 2.11 would wait here forever: the lock file exists")
        try:
            calls.append(build_directory)
            return types.SimpleNamespace(__file__=os.path.join(build_directory, name + ".so"),
                                         source_hash="fake", cuda_archs="90")
        finally:
            baton.release()
    return load


@pytest.fixture
def fake_toolchain(tmp_path, monkeypatch):
    """A load path that reaches the JIT build on the CPU: CUDA 'visible', toolchain 'present'."""
    monkeypatch.setenv("RILS_KERNELS_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setattr(_extension, "check_toolchain", lambda jit=True: None)
    monkeypatch.setattr(_extension, "cuda_home", lambda: "/usr/local/cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.delenv("RILS_CUDA_ARCHS", raising=False)
    calls = []
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "load", torch211_load(calls))
    for name, value in (("_tried", False), ("_module", None), ("_error", None)):
        monkeypatch.setattr(_extension, name, value)
    return calls


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_lock_of_a_dead_builder_is_removed_and_the_load_does_not_wait(fake_toolchain, capfd):
    build_dir = _extension.jit_cache_dir(["90"])
    build_dir.mkdir(parents=True)
    stale = build_dir / "lock"
    stale.write_bytes(b"")  # what FileBaton leaves: an empty file
    old = time.time() - 7200
    os.utime(stale, (old, old))
    dead = _dead_pid()
    (build_dir / build_lock.OWNER_FILE).write_text(json.dumps({"pid": dead, "host": socket.gethostname(),
                                                              "started": old}))
    t0 = time.monotonic()
    mod = _extension.load_extension()
    assert mod is not None and mod.source_hash == "fake", _extension.load_error()
    assert time.monotonic() - t0 < 60  # hang guard only: the fake load raises instead of waiting
    assert fake_toolchain == [str(build_dir)]  # the build ran once, in the keyed directory
    assert not stale.exists()
    err = capfd.readouterr().err
    assert "removed a stale JIT build lock" in err and f"pid {dead}" in err
    assert re.search(r"age 72\d\d s", err)  # planted two hours ago, give or take the test's own seconds
    owner = json.loads((build_dir / build_lock.OWNER_FILE).read_text())
    assert owner["pid"] == os.getpid()  # the record names the latest builder


def test_a_live_builder_is_waited_for_with_a_bound_and_its_lock_is_kept(tmp_path):
    build_dir = tmp_path / "k"
    build_dir.mkdir()
    (build_dir / "lock").write_bytes(b"")  # the live build's baton: must survive
    (build_dir / build_lock.OWNER_FILE).write_text(json.dumps({"pid": 4242, "host": "h", "started": time.time()}))
    holder = os.open(build_dir / build_lock.OWNER_FILE, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another open file description: conflicts like another process
    said = []
    try:
        with pytest.raises(build_lock.BuildLockTimeout, match="pid 4242"):
            with build_lock.build_lock(build_dir, wait_s=0.5, say=said.append):
                pytest.fail("acquired a lock that a live process holds")
        assert (build_dir / "lock").exists()
        assert any("waiting for another build" in s for s in said)
    finally:
        os.close(holder)
    # the holder is gone (its descriptor closed, as when a process dies): taken at once, baton removed
    with build_lock.build_lock(build_dir, wait_s=0.5, say=said.append):
        assert not (build_dir / "lock").exists()
    assert any("removed a stale JIT build lock" in s for s in said)


def test_no_lock_no_message(tmp_path):
    said = []
    with build_lock.build_lock(tmp_path / "fresh", wait_s=0.1, say=said.append):
        pass
    assert said == [] and build_lock.clear_stale_baton(tmp_path / "fresh", said.append) is None
