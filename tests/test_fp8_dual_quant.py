"""The row+column FP8 quantization kernels vs their PyTorch reference (TRITON_INTERPRET=1)."""
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
# As in test_fp8_kernels: triton picks interpreter vs compiler at import; a process that is not in
# interpreter mode runs this module once more in a fresh one with TRITON_INTERPRET=1.
_IN_PROCESS = torch.cuda.is_available() or type(triton.language.standard.sum).__name__ == "InterpretedFunction"

from recopt.fp8.dual_quant import quant_rows, rowcol_quant, rowcol_quant_reference  # noqa: E402
from recopt.fp8.recipes import E4M3, E5M2, quantize  # noqa: E402


@pytest.fixture(scope="module")
def _subprocess_results():
    if _IN_PROCESS:
        return None
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                          os.path.abspath(__file__)], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    passed = {line.split("::", 1)[1].split(" ")[0] for line in res.stdout.splitlines()
              if line.startswith("PASSED ") and "::" in line}
    return passed, res.stdout[-4000:] + res.stderr[-2000:]


@pytest.fixture
def interpreted(request, _subprocess_results):
    if _subprocess_results is None:
        return True
    passed, log = _subprocess_results
    assert request.node.name in passed, f"{request.node.name} failed under TRITON_INTERPRET=1:\n{log}"
    return False


def _x(r, c, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    # Rows and columns of very different magnitude, so row and column scales differ.
    x = torch.randn(r, c, generator=g) * (torch.rand(r, 1, generator=g) * 30 + 0.01) \
        * (torch.rand(1, c, generator=g) * 3 + 0.1)
    return x.to(dtype)


def _same(a, b):
    assert (a is None) == (b is None)
    if a is None:
        return
    assert a[0].dtype == b[0].dtype and a[0].shape == b[0].shape and a[1].shape == b[1].shape
    assert torch.equal(a[0].float(), b[0].float()), (a[0].float() - b[0].float()).abs().max()
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


@pytest.mark.parametrize("r,c", [(37, 100), (1, 48), (130, 70), (64, 64), (0, 16)])
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("gran", ["rowwise", "tensorwise"])
def test_kernel_matches_reference(interpreted, r, c, dtype, gran):
    if not interpreted:
        return
    x = _x(r, c, r * 1000 + c)
    for rows, cols, pad in ((True, True, 16), (True, False, 1), (False, True, 1)):
        got = rowcol_quant(x, dtype, gran, rows=rows, cols=cols, pad_cols_to=pad, use_triton=True)
        ref = rowcol_quant_reference(x, dtype, gran, rows=rows, cols=cols, pad_cols_to=pad)
        _same(got[0], ref[0])
        _same(got[1], ref[1])


def test_kernel_fp32_input_and_transposed_view(interpreted):
    if not interpreted:
        return
    x = _x(33, 17, 7, torch.float32)
    got = rowcol_quant(x.t(), E4M3, "rowwise", use_triton=True)  # non-contiguous input
    ref = rowcol_quant_reference(x.t().contiguous(), E4M3, "rowwise")
    _same(got[0], ref[0])
    _same(got[1], ref[1])


def test_reference_matches_quantize_and_padding_is_zero():
    x = _x(21, 40, 3)
    (qr, sr), (qc, sc) = rowcol_quant_reference(x, E4M3, "rowwise", pad_cols_to=16)
    q, s = quantize(x, E4M3, "rowwise", reduce_dim=1)
    assert torch.equal(qr.float(), q.float()) and torch.equal(sr, s)
    qt, st = quantize(x.t(), E4M3, "rowwise", reduce_dim=1)
    assert qc.shape == (40, 32) and qc.is_contiguous()
    assert torch.equal(qc[:, :21].float(), qt.float()) and torch.equal(sc, st)
    assert not qc[:, 21:].float().any()
    # The dequantized copies reproduce x within e4m3 precision.
    torch.testing.assert_close(qr.float() * sr, x.float(), rtol=0.07, atol=1e-6)
    torch.testing.assert_close((qc[:, :21].float() * sc).t(), x.float(), rtol=0.07, atol=1e-6)


def test_quant_rows_of_a_transposed_view_uses_the_column_copy():
    x = _x(9, 24, 5)
    q, s = quant_rows(x.t(), E4M3, "rowwise")
    ref_q, ref_s = quantize(x.t().contiguous(), E4M3, "rowwise", reduce_dim=1)
    assert q.is_contiguous() and torch.equal(q.float(), ref_q.float()) and torch.equal(s, ref_s)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="2-D"):
        rowcol_quant(torch.randn(2, 3, 4), E4M3, "rowwise")
    with pytest.raises(ValueError, match="blockwise"):
        rowcol_quant(torch.randn(2, 3), E4M3, "blockwise")
    with pytest.raises(ValueError, match="unsupported FP8 dtype"):
        rowcol_quant(torch.randn(2, 3), torch.float16, "rowwise")


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("gran", ["rowwise", "tensorwise"])
def test_kernel_keeps_non_finite_slices_nan(interpreted, dtype, gran):
    # Bug: tl.minimum/tl.maximum drop NaN, so an inf row (scale inf: inf/inf = NaN) or a NaN value was
    # written as a finite FP8 value; on a GPU the GEMM then returned a finite row where eager's is inf/NaN.
    if not interpreted:
        return
    x = _x(37, 48, 7)
    x[3, 5], x[10, 7], x[20, 1] = float("inf"), float("nan"), -float("inf")
    got = rowcol_quant(x, dtype, gran, pad_cols_to=16, use_triton=True)
    ref = rowcol_quant_reference(x, dtype, gran, pad_cols_to=16)
    for g, r, bad in ((got[0], ref[0], [3, 10, 20]), (got[1], ref[1], [1, 5, 7])):
        nan_g = g[0].float().isnan().any(1).nonzero().flatten().tolist()
        nan_r = r[0].float().isnan().any(1).nonzero().flatten().tolist()
        assert nan_g == nan_r == bad
        ok = [i for i in range(g[0].shape[0]) if i not in bad]
        assert torch.equal(g[0][ok].float(), r[0][ok].float())


def test_fused_row_quantizer_keeps_non_finite_rows_nan(interpreted, monkeypatch):
    if not interpreted:
        return
    from recopt.fp8 import fused_quant as fq

    monkeypatch.setattr(fq, "_use_triton", lambda t: True)
    x = _x(9, 48, 3)
    x[2, 4], x[6, 0] = float("inf"), float("nan")
    q, s, _ = fq.blocknorm_quant(x, block=48, norm=False, write_y=False)
    assert q.float().isnan().any(1).nonzero().flatten().tolist() == [2, 6]
    assert torch.isfinite(q.float()[[0, 1, 3, 4, 5, 7, 8]]).all()
