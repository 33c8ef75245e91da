"""Executed FLOPs of one patch-sentence KL forward + backward, per backend (benchmarks).

Unit: one "product" = one GEMM-sized contraction of 2*P*M*D FLOPs. Counted is what each backend
*executes*, recomputation included (FlashAttention's convention for its backward), so rates of
different backends compare the hardware's work, not the algorithm's credit:

* model (minimum, no recompute): forward 2 logit products; backward dStudent (1) + dPrototypes (1)
* reference: 2 + 1 + 1 (autograd through the materialised P x M logits)
* streaming, full-row path (CPU default with gradients, uniform upstream gradient): 2 + 2, all in forward
* streaming M-chunked / GPU low-precision path: 2 forward + 2 recomputed + 1 + 1
  (student-only on the M-chunked fp32 path: 2 + 2 "attention outputs" in forward)
* triton and hybrid: 2 forward + 2 recomputed (the G tiles, formed once per tile and written to a
  bounded column chunk) + 1 per gradient (dStudent = G T, dPrototypes = G^T S from the same G tiles;
  Triton GEMMs resp. cuBLAS): 6, or 5 without prototype gradient. The backward's 2 recomputed
  products are shared by both gradients.
  (Before issue 17 the triton backend recomputed the logits per 128-wide output D block and per
  gradient: 2 + 2 * (2 * ceil(D / 128) + 1) = 20 at D = 512.)
* cuda (kernels/): 2 + (2 + 1) for dStudent + (2 + 1) for dPrototypes
Without gradients every backend executes 2. Without prototype gradients drop the dPrototypes terms.
"""
from __future__ import annotations

__all__ = ["executed_products", "model_products", "gemm_flops"]


def gemm_flops(P: int, M: int, D: int) -> int:
    return 2 * P * M * D


def model_products(need_s: bool, need_t: bool) -> int:
    return 2 + int(need_s) + int(need_t)


def executed_products(backend: str, P: int, M: int, D: int, need_s: bool, need_t: bool, *, device: str = "cuda",
                      dtype: str = "bfloat16", uniform_g: bool = True) -> int:
    """Products executed by ``backend`` (see the module docstring); ``auto`` is not a backend here:
    pass the one it selected."""
    if not (need_s or need_t):
        return 2
    ns, nt = int(need_s), int(need_t)
    if backend == "reference":
        return 2 + ns + nt
    if backend == "streaming":
        lp = device == "cuda" and dtype in ("bfloat16", "float16")
        if not lp:   # full-row path (within its budget); non-uniform g recomputes dPrototypes
            return 2 + ns + nt if uniform_g or not need_t else 2 + ns + 3
        return 2 + 2 + ns + nt
    if backend == "streaming_chunked":
        return 4 if not need_t else 2 + 2 + ns + nt
    if backend in ("hybrid", "triton"):
        return 2 + 2 + ns + nt
    if backend == "cuda":
        return 2 + ns * 3 + nt * 3
    raise ValueError(f"unknown backend {backend!r}")
