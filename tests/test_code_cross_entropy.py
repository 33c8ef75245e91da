"""The streamed K-way code cross-entropy (SemMIM) against its naive float64 reference: values,
both gradients and the two teacher statistics, at odd shapes and tiles that do not divide them."""
import pytest
import torch
import torch.nn.functional as F

from rils_scale.ops import kl_streaming
from rils_scale.ops.code_cross_entropy import code_cross_entropy, code_cross_entropy_reference

TEMPS = dict(student_temp=0.1, teacher_temp=0.04)


def _inputs(rows, codes, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=-1)
    cs = F.normalize(torch.randn(codes, dim, generator=g, dtype=torch.float64), dim=-1)
    ct = F.normalize(cs + 0.3 * torch.randn(codes, dim, generator=g, dtype=torch.float64), dim=-1)
    center = 0.2 * torch.randn(codes, generator=g, dtype=torch.float64)
    weights = (torch.rand(rows, generator=g) > 0.2).to(torch.float64)
    upstream = torch.rand(rows, generator=g, dtype=torch.float64) + 0.5  # not uniform: exercises g_i
    return [x.to(dtype) for x in (s, t, cs, ct, center, weights, upstream)]


def _run(fn, s, t, cs, ct, center, weights, upstream, **kw):
    s, cs = s.clone().requires_grad_(), cs.clone().requires_grad_()
    t, ct, center = t.clone().requires_grad_(), ct.clone().requires_grad_(), center.clone().requires_grad_()
    ce, usage, entropy = fn(s, t, cs, ct, center, weights=weights, **TEMPS, **kw)
    (ce * upstream.to(ce.dtype)).sum().backward()
    assert t.grad is None and ct.grad is None and center.grad is None, "the teacher side took a gradient"
    return ce.detach(), usage, entropy, s.grad, cs.grad


@pytest.mark.parametrize("rows,codes,dim,blocks", [(37, 53, 7, (8, 16)), (5, 300, 16, (2, 64)), (64, 17, 9, (None, None)),
                                                  (1, 1, 3, (None, None))])
def test_streaming_matches_float64_reference(rows, codes, dim, blocks):
    x = _inputs(rows, codes, dim, torch.float64)
    ref = _run(code_cross_entropy_reference, *x)
    got = _run(code_cross_entropy, *x, block_rows=blocks[0], block_codes=blocks[1])
    for name, a, b in zip(("ce", "usage", "entropy", "d_student", "d_codes"), got, ref):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    # the statistics mean what they say: usage sums the weights, entropy lies in [0, log K]
    torch.testing.assert_close(ref[1].sum(), x[5].sum(), rtol=1e-12, atol=1e-12)
    assert (ref[2] >= -1e-12).all() and (ref[2] <= torch.log(torch.tensor(float(codes))) + 1e-9).all()


def test_float32_against_float64_and_gradcheck_of_the_reference():
    x64 = _inputs(29, 70, 12, torch.float64, seed=3)
    ref = _run(code_cross_entropy_reference, *x64)
    got = _run(code_cross_entropy, *[v.float() for v in x64], block_rows=8, block_codes=32)
    for name, a, b in zip(("ce", "usage", "entropy", "d_student", "d_codes"), got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-4 * max(1.0, b.abs().max().item()),
                                   msg=lambda m: f"fp32 {name}: {m}")
    # the oracle itself: its autograd gradient is the analytic (p - q) form of the docstring
    s, t, cs, ct, center, w, up = x64
    q = torch.softmax((t @ ct.T - center) / 0.04, dim=-1)
    p = torch.softmax(s @ cs.T / 0.1, dim=-1)
    gmat = (p - q) * up[:, None] / 0.1
    torch.testing.assert_close(ref[3], gmat @ cs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ref[4], gmat.T @ s, rtol=1e-10, atol=1e-12)


def test_low_precision_gemm_path(monkeypatch):
    """bf16 inputs take the tensor-core path on CUDA; on CPU the same code runs on the rounded operands."""
    monkeypatch.setattr(kl_streaming, "FORCE_LP_GEMM", [True])
    x64 = _inputs(33, 80, 16, torch.float64, seed=5)
    ref = _run(code_cross_entropy_reference, *[v.to(torch.bfloat16).double() for v in x64[:5]], *x64[5:])
    got = _run(code_cross_entropy, *[v.to(torch.bfloat16) for v in x64[:5]], *x64[5:], block_rows=16, block_codes=32)
    assert got[0].dtype == torch.float32 and got[3].dtype == torch.bfloat16
    torch.testing.assert_close(got[0].double(), ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[3].double(), ref[3], rtol=2e-2, atol=2e-2 * ref[3].abs().max().item())
    torch.testing.assert_close(got[4].double(), ref[4], rtol=2e-2, atol=2e-2 * ref[4].abs().max().item())


def test_bad_inputs_are_refused():
    s = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="centre"):
        code_cross_entropy(s, s, torch.zeros(5, 4), torch.zeros(5, 4), torch.zeros(4), **TEMPS)
    with pytest.raises(ValueError, match="codes"):
        code_cross_entropy(s, s, torch.zeros(5, 3), torch.zeros(5, 3), torch.zeros(5), **TEMPS)
