"""The FP8 paths on a CUDA device (skipped without one): kernels vs references, the op vs bf16, no fallback.

Written for a GPU machine (H100/B200; torch ≥ 2.11 with FP8 `_scaled_mm`, triton 3.6); this
session had no GPU, so these tests have not run yet.
"""
import pytest
import torch
import torch.nn as nn

cuda = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                          reason="needs a CUDA GPU with FP8 tensor cores (sm_89+)")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@cuda
@pytest.mark.parametrize("r,c", [(1, 48), (37, 100), (4096, 1024)])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("gran", ["rowwise", "tensorwise"])
def test_rowcol_quant_kernel_matches_reference_on_gpu(r, c, fmt, gran):
    from recopt.fp8.dual_quant import rowcol_quant, rowcol_quant_reference
    from recopt.fp8.recipes import FP8_DTYPES

    dt = FP8_DTYPES[fmt]
    g = torch.Generator().manual_seed(r + c)
    x = (torch.randn(r, c, generator=g) * (torch.rand(r, 1, generator=g) * 30 + 0.01)).to(torch.bfloat16)
    got = rowcol_quant(x.cuda(), dt, gran, pad_cols_to=16)
    ref = rowcol_quant_reference(x, dt, gran, pad_cols_to=16)
    for (gq, gs), (rq, rs) in zip(got, ref):
        assert gq.shape == rq.shape and gq.dtype == rq.dtype
        torch.testing.assert_close(gs.cpu(), rs, rtol=1e-6, atol=0)
        # The GPU's fp32 division may differ from the CPU's in the last ulp: at most a rare one-step flip.
        diff = (gq.cpu().float() != rq.float()).float().mean().item()
        assert diff < 1e-3, diff


@cuda
@pytest.mark.parametrize("recipes", [
    {"forward": "rowwise", "dgrad": "rowwise", "wgrad": "rowwise"},
    {"forward": "tensorwise", "dgrad": "tensorwise", "wgrad": "tensorwise"},
    {"forward": "rowwise", "dgrad": "rowwise", "wgrad": "bf16"},
])
@pytest.mark.parametrize("rows", [37, 1024])
def test_fp8_linear_on_gpu_is_bf16_in_bf16_out_and_takes_no_fallback(recipes, rows):
    from recopt.fp8 import fallbacks, reset_fallbacks
    from recopt.fp8.linear import FP8Linear

    torch.manual_seed(0)
    lin = nn.Linear(256, 128).cuda().to(torch.bfloat16)
    f = FP8Linear.from_linear(lin, recipes)
    x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(rows, 128, device="cuda", dtype=torch.bfloat16)
    reset_fallbacks()
    y = f(x)
    y.backward(gy)
    assert fallbacks() == {}
    dx, dw, db = x.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone()
    assert y.dtype == dx.dtype == dw.dtype == torch.bfloat16
    x.grad = None
    lin.zero_grad()
    y_ref = lin(x)
    y_ref.backward(gy)
    bound = 0.1 if recipes["dgrad"] == "tensorwise" else 0.06
    assert _rel(y, y_ref) < 0.06
    assert _rel(dx, x.grad) < bound
    assert _rel(dw, lin.weight.grad) < (0.02 if recipes["wgrad"] == "bf16" else bound)
    torch.testing.assert_close(db, lin.bias.grad)


@cuda
def test_blocknorm_fused_op_on_gpu_matches_the_composition():
    from recopt.fp8 import fallbacks, reset_fallbacks
    from recopt.fp8.fused_quant import block_rms_norm

    torch.manual_seed(0)
    d = 512
    w = (torch.randn(256, d, device="cuda") / d ** 0.5).to(torch.bfloat16).requires_grad_(True)
    b = torch.randn(256, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    x = torch.randn(100, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    reset_fallbacks()
    y = torch.ops.recopt.blocknorm_fp8_linear(x, w, b, 256, 1e-6, "rowwise", "rowwise", "rowwise")
    gy = torch.randn_like(y)
    y.backward(gy)
    assert fallbacks() == {} and y.dtype == torch.bfloat16
    dx, dw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    y_ref = torch.nn.functional.linear(block_rms_norm(x, 256, 1e-6), w, b)
    y_ref.backward(gy)
    assert _rel(y, y_ref) < 0.06 and _rel(dx, x.grad) < 0.08 and _rel(dw, w.grad) < 0.06


@cuda
def test_time_site_runs_with_the_default_timer_on_gpu():
    from recopt.fp8.timing import time_site

    cand = {"backend": "recopt", "recipes": {"forward": "rowwise", "dgrad": "rowwise", "wgrad": "rowwise"}}
    for mode in ("inference", "training"):
        t = time_site(256, 256, 256, cand, mode=mode, lowering="eager", rounds=1)
        assert t.bf16_s > 0 and t.fp8_s > 0
