"""The fused BlockNorm → row-wise e4m3 Triton kernel vs its PyTorch reference (TRITON_INTERPRET=1)."""
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
# Triton decides interpreter vs compiler when each @jit function (its own tl.sum included) is
# decorated, i.e. when triton is first imported. This module never changes the environment of the
# test process (other modules read TRITON_INTERPRET); when the process is not already in
# interpreter mode, the module runs itself once in a fresh interpreter with TRITON_INTERPRET=1.
_IN_PROCESS = torch.cuda.is_available() or type(triton.language.standard.sum).__name__ == "InterpretedFunction"


@pytest.fixture(scope="module")
def _subprocess_results():
    if _IN_PROCESS:
        return None
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                          os.path.abspath(__file__)], cwd=root, env=env, capture_output=True, text=True,
                         timeout=900)
    passed = {line.split("::", 1)[1].split(" ")[0] for line in res.stdout.splitlines()
              if line.startswith("PASSED ") and "::" in line}
    return passed, res.stdout[-4000:] + res.stderr[-2000:]


@pytest.fixture
def interpreted(request, _subprocess_results):
    """True: run the test here. False: it ran (and was checked) in the fresh interpreter."""
    if _subprocess_results is None:
        return True
    passed, log = _subprocess_results
    assert request.node.name in passed, f"{request.node.name} failed under TRITON_INTERPRET=1:\n{log}"
    return False


CASES = [  # M, N, block, norm
    (5, 512, 256, True),
    (3, 48, 16, True),
    (4, 40, 40, True),   # block not a power of two
    (2, 96, 32, False),  # plain row-wise quantization
    (1, 24, 8, True),
]


@pytest.mark.parametrize("m,n,block,norm", CASES)
def test_kernel_matches_reference(interpreted, m, n, block, norm):
    if not interpreted:
        return
    from recopt.fp8.fused_quant import blocknorm_quant, blocknorm_quant_reference

    g = torch.Generator().manual_seed(m * n)
    x = torch.randn(m, n, generator=g) * 3
    x[0, 1] = 250.0  # an outlier in one block
    if m > 1:
        x[1] = torch.randn(n, generator=g) * 1e-3  # a tiny row: subnormal-range values after scaling
    q, s, y = blocknorm_quant(x, block, norm, use_triton=True)
    qr, sr, yr = blocknorm_quant_reference(x, block, norm)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (m, 1)
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    # Same fp8 codes except where fp32 rsqrt rounding moves a value across a rounding boundary.
    mismatch = (q.float() != qr.float()).float().mean()
    assert float(mismatch) <= 0.01
    torch.testing.assert_close(q.float() * s, qr.float() * sr, rtol=0.0625, atol=1e-6)


def test_kernel_bf16_input_and_no_y(interpreted):
    if not interpreted:
        return
    from recopt.fp8.fused_quant import blocknorm_quant, blocknorm_quant_reference

    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    q, s, y = blocknorm_quant(x, 32, True, write_y=False, use_triton=True)
    qr, sr, _ = blocknorm_quant_reference(x, 32, True)
    assert y is None
    assert float((q.float() != qr.float()).float().mean()) <= 0.01
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)


def test_rounding_helper_carries_into_exponent(interpreted):
    # 126.2 must round to 128 (the interpreter's own cast gives 64).
    if not interpreted:
        return
    from recopt.fp8.fused_quant import blocknorm_quant

    x = torch.tensor([[448.0, 126.2, -31.1, 0.004, -0.0031, 1e-5, 0.0, 240.0]])
    q, s, _ = blocknorm_quant(x, 8, norm=False, use_triton=True)
    expect = x.to(torch.float8_e4m3fn).float()  # torch rounds to nearest even
    torch.testing.assert_close(expect[0, :3], torch.tensor([448.0, 128.0, -32.0]))
    torch.testing.assert_close(q.float(), expect)
    assert float(s) == 1.0


def test_launcher_errors():
    from recopt.fp8.fused_quant import blocknorm_quant

    with pytest.raises(ValueError, match="multiple of block"):
        blocknorm_quant(torch.randn(2, 30), 16)
    with pytest.raises(ValueError, match="2-D"):
        blocknorm_quant(torch.randn(2, 3, 16), 16)
    q, s, y = blocknorm_quant(torch.randn(2, 32), 16, use_triton=False)
    assert q.shape == (2, 32) and y.shape == (2, 32)
