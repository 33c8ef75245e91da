"""The fused CUDA extension must at least compile and link on the CPU machine (DESIGN.md section 6).

Builds kernels/ with nvcc for one arch (sm_90, or $RILS_CUDA_ARCHS) into a temp dir via
rils_scale.ops._extension.compile_only -- object files with nvcc -c / c++ -c, then a shared link
against torch's libraries -- without loading the result (there is no GPU here, and a binary for this
torch would not load on the GPU machine's torch anyway). Skipped without nvcc / a CUDA build of torch.
Set RILS_SKIP_KERNEL_BUILD=1 to skip it locally (it takes ~1-3 min on 2 cores).
"""
import os
import shutil
import subprocess

import pytest
import torch

from rils_scale.ops import _extension


def _nvcc_available():
    return _extension.cuda_home() is not None


@pytest.mark.skipif(os.environ.get("RILS_SKIP_KERNEL_BUILD") == "1", reason="RILS_SKIP_KERNEL_BUILD=1")
@pytest.mark.skipif(torch.version.cuda is None, reason="torch is not a CUDA build")
@pytest.mark.skipif(not _nvcc_available(), reason="nvcc / CUDA_HOME not found")
def test_extension_compiles_and_links(tmp_path):
    try:
        info = _extension.compile_only(tmp_path, archs=os.environ.get("RILS_CUDA_ARCHS", "90").split(";")[:1])
    except subprocess.CalledProcessError as e:
        pytest.fail(f"kernel build failed:\n{(e.stdout or '')[-4000:]}\n{(e.stderr or '')[-8000:]}")
    so = info["so"]
    assert os.path.getsize(so) > 0
    print("kernel build seconds:", {k: round(v, 1) for k, v in info["seconds"].items()})
    if shutil.which("nm"):
        syms = subprocess.run(["nm", "-D", "--defined-only", so], capture_output=True, text=True).stdout
        assert "PyInit_rils_scale_kernels" in syms
        # the three kernels were instantiated for every dtype
        cubin = subprocess.run(["nm", "-C", so], capture_output=True, text=True).stdout
        for k in ("psk_forward_kernel", "psk_bwd_dstudent_kernel", "psk_bwd_dprototypes_kernel"):
            assert k in cubin, k
