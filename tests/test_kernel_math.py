"""The GDPA kernels' fast activation math stays below bf16 rounding.

Runs the kernels' own ``_act`` / ``_act_grad`` (FAST=1: the fast formulas with
a portable tanh; FAST=2 only differs by tanh.approx/ex2.approx, which the CPU
interpreter cannot run) on a dense grid and compares with exact fp64 math:
error <= 2^-9 * |exact| + 2^-24 for the GELU (the fitted exp2-polynomial),
and the same bound loosened by tanh's own fp32 error for the tanh forms;
derivatives (O(1), crossing 0) within 2^-9 * |exact| + 2^-12.
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("runs the kernel helpers under TRITON_INTERPRET=1", allow_module_level=True)

import triton.language as tl  # noqa: E402

from recopt.kernels import gdpa as K  # noqa: E402
from recopt.ops import gdpa_ref as R  # noqa: E402


@triton.jit
def _act_kernel(X, Y, G, N, ACT: tl.constexpr, FAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(X + offs, mask=m, other=0.0)
    tl.store(Y + offs, K._act(x, ACT, FAST), mask=m)
    tl.store(G + offs, K._act_grad(x, ACT, FAST), mask=m)


def _run(x, act, fast):
    y, g = torch.empty_like(x), torch.empty_like(x)
    block = 4096
    _act_kernel[(triton.cdiv(x.numel(), block),)](x, y, g, x.numel(), ACT=R.ACTIVATIONS[act], FAST=fast,
                                                  BLOCK=block)
    return y.double(), g.double()


pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # exp(2x) -> inf is intended

X = torch.cat([torch.linspace(-12, 12, 48001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0])]).float()


@pytest.mark.parametrize("act,extra", [("gelu", 0.0), ("gelu_tanh", 2e-6), ("silu", 2e-6)])
def test_fast_activation_error_below_bf16_rounding(act, extra):
    y, g = _run(X, act, 1)
    xd = X.double()
    want = R.act_fwd(xd, act)
    gwant = R.act_grad(xd, act)
    bound = 2.0 ** -9 * want.abs() + 2.0 ** -24 + extra * xd.abs()
    assert ((y - want).abs() <= bound).all(), (y - want).abs().max()
    # the derivative is O(1) (|gelu'| <= 1.13) and crosses 0: absolute 2^-12 plus relative 2^-9
    gbound = 2.0 ** -9 * gwant.abs() + 2.0 ** -12 + extra
    assert ((g - gwant).abs() <= gbound).all(), (g - gwant).abs().max()


def test_exact_math_path_is_fp32_accurate():
    y, g = _run(X, "gelu", 0)
    want = R.act_fwd(X.double(), "gelu")
    assert ((y - want).abs() <= 1e-6 * (1 + want.abs())).all()
