"""GDPA's causal mask, additive bias (with dbias) and the semantics of fully-masked rows.

Differential tests against naive PyTorch written the way models write attention.
The fully-masked-row tests state the contract the Triton kernels must meet too
(see docs/gdpa.md, "Fully-masked rows").
"""
import math

import pytest
import torch
import torch.nn.functional as F

from recopt.ops import gdpa
from recopt.ops import gdpa_ref as R


def _rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed * 131 + sum(shape))
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _naive_pointwise(q, k, v, act, pre, post, causal, bias, kv_len=None):
    s = (q @ k.transpose(-2, -1)) * pre
    if bias is not None:
        s = s + bias
    Tq, Tk = s.shape[-2:]
    keep = torch.ones(Tq, Tk, dtype=torch.bool)
    if causal:
        keep = torch.tril(keep)
    keep = keep.expand(s.shape)
    if kv_len is not None:
        keep = keep & (torch.arange(Tk)[None, :] < kv_len[:, None])[:, None, None, :]
    s = s.masked_fill(~keep, 0.0)
    return (R.act_fwd(s, act) * post) @ v


@pytest.mark.parametrize("Tq,Tk", [(0, 3), (1, 1), (5, 5), (7, 4), (3, 6)])
@pytest.mark.parametrize("act", ["silu", "relu_square", "gelu"])
def test_causal_and_bias_forward_backward(Tq, Tk, act):
    B, H, d, dv = 2, 3, 5, 4
    q = _rand(B, H, Tq, d).requires_grad_()
    k = _rand(B, H, Tk, d, seed=1).requires_grad_()
    v = _rand(B, H, Tk, dv, seed=2).requires_grad_()
    bias = _rand(1, H, Tq, Tk, seed=3).requires_grad_()   # broadcast over the batch
    kl = torch.tensor([Tk, max(Tk - 2, 0)])
    got = gdpa(q, k, v, activation=act, pre_scale=0.3, qk_scale=0.5, causal=True, bias=bias,
               kv_lengths=kl)
    want = _naive_pointwise(q, k, v, act, 0.3, 0.5, True, bias, kl)
    torch.testing.assert_close(got, want)
    go = _rand(*got.shape, seed=4)
    g1 = torch.autograd.grad(got, (q, k, v, bias), go)
    g2 = torch.autograd.grad(want, (q, k, v, bias), go)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    assert g1[3].shape == bias.shape


def test_bias_without_grad_and_gqa_and_opcheck():
    q, k, v = _rand(2, 4, 5, 3), _rand(2, 2, 5, 3, seed=1), _rand(2, 2, 5, 2, seed=2)
    bias = _rand(5, 5, seed=3)
    got = gdpa(q, k, v, activation="silu", bias=bias, causal=True)
    want = _naive_pointwise(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), "silu", 1.0, 1.0,
                            True, bias)
    torch.testing.assert_close(got, want)
    from torch.library import opcheck
    res = opcheck(torch.ops.recopt.gdpa.default,
                  (q.float().requires_grad_(), k.float().requires_grad_(), v.float(), None, None,
                   "silu", 0.5, 0.7, -1, True, bias.float()[None, None].expand(2, 4, 5, 5).contiguous()
                   .requires_grad_()))
    assert all(r == "SUCCESS" for r in res.values()), res


def test_causal_and_bias_follow_the_default_backend(monkeypatch):
    """The Triton kernels implement causal masks and a bias (dbias included,
    tests/test_gdpa_triton_dbias.py): no feature forces the reference."""
    from recopt.ops.gdpa import HAS_TRITON, backend_for, reference_reason
    q = torch.randn(1, 1, 2, 4)
    assert reference_reason(False, None) is None
    assert reference_reason(True, q) is None
    assert backend_for(q, q, q, "silu", causal=True, bias=q) == "reference"  # CPU tensors
    if HAS_TRITON:
        monkeypatch.setenv("RECOPT_GDPA_BACKEND", "triton")
        assert backend_for(q, q, q, "silu", causal=True, bias=q) == "triton"


def test_flops_count_the_bias():
    from torch.utils.flop_counter import FlopCounterMode
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 6)
    with FlopCounterMode(display=False) as fc:
        gdpa(q, k, v, activation="gelu", bias=torch.randn(4, 5, 3), causal=True)
    assert fc.get_total_flops() == 2 * 2 * 4 * 5 * 3 * (8 + 6) + 2 * 4 * 5 * 3


# ---------------------------------------------------------------- softmax, fully-masked rows

def _model_softmax(q, k, v, drop, fill, scale):
    """Attention as models write it: masked_fill(drop, fill) then softmax."""
    s = (q @ k.transpose(-2, -1)) * scale
    s = s.masked_fill(drop, fill)
    return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("fill,rows", [(-1e9, "uniform"), (float("-inf"), "nan"), (-1e4, "uniform")])
def test_fully_masked_rows_follow_the_source(fill, rows):
    """A query row whose keys are all masked: uniform over all keys with a finite
    fill, NaN with -inf; other rows exact; forward and backward."""
    B, H, T, d = 2, 2, 5, 4
    q, k, v = (_rand(B, H, T, d, seed=s).requires_grad_() for s in range(3))
    drop = torch.zeros(B, 1, T, T, dtype=torch.bool)
    drop[0, :, 1] = True           # sample 0: query row 1 sees no key
    drop[1, :, :, 3:] = True       # sample 1: keys past 3 are padding
    scale = 1 / math.sqrt(d)
    want = _model_softmax(q, k, v, drop, fill, scale)
    got = gdpa(q, k, v, activation="softmax", pre_scale=scale, attn_mask=~drop, masked_rows=rows)
    torch.testing.assert_close(got, want, equal_nan=True)
    assert torch.isnan(got).any() == (rows == "nan")
    go = _rand(B, H, T, d, seed=7)
    g_want = torch.autograd.grad(want, (q, k, v), go, allow_unused=True)
    g_got = torch.autograd.grad(got, (q, k, v), go, allow_unused=True)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_zero_rows_is_the_length_convention():
    q, k, v = _rand(1, 1, 3, 4), _rand(1, 1, 3, 4, seed=1), _rand(1, 1, 3, 4, seed=2)
    o = gdpa(q, k, v, activation="softmax", kv_lengths=torch.tensor([0]))
    assert torch.equal(o, torch.zeros_like(o))


def test_additive_neg_inf_mask_row_zero_like_sdpa_nan_like_eager():
    """An all -inf additive float mask row: 0 as SDPA gives ("zero"), NaN as the
    model's own softmax gives ("nan")."""
    q, k, v = _rand(1, 1, 3, 4), _rand(1, 1, 3, 4, seed=1), _rand(1, 1, 3, 4, seed=2)
    m = torch.zeros(3, 3)
    m[2] = float("-inf")
    o = gdpa(q, k, v, activation="softmax", attn_mask=m)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v, attn_mask=m.double(), scale=1.0))
    assert (o[..., 2, :] == 0).all()
    o = gdpa(q, k, v, activation="softmax", attn_mask=m, masked_rows="nan")
    want = torch.softmax(q @ k.transpose(-2, -1) + m, -1) @ v
    torch.testing.assert_close(o, want, equal_nan=True)
    assert torch.isnan(o[..., 2, :]).all() and not torch.isnan(o[..., :2, :]).any()


def test_causal_softmax_matches_sdpa_is_causal():
    q, k, v = _rand(2, 2, 6, 4), _rand(2, 2, 6, 4, seed=1), _rand(2, 2, 6, 3, seed=2)
    o = gdpa(q, k, v, activation="softmax", causal=True, pre_scale=0.5)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5))


def test_masked_rows_is_checked():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="masked_rows"):
        gdpa(q, q, q, activation="softmax", masked_rows="ones")


def test_onnx_translation_follows_causal_and_bias(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import importlib

    rx = importlib.import_module("recopt.export")

    class Causal(torch.nn.Module):
        def forward(self, q, k, v, bias):
            return gdpa(q, k, v, activation="silu", causal=True, bias=bias, pre_scale=0.5)

    q, k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    bias = torch.randn(1, 2, 5, 5)
    path = str(tmp_path / "causal.onnx")
    rx.export(Causal(), (q, k, v, bias), path, n_random_inputs=1)
    got = rx.load(path)(q, k, v, bias)
    got = got[0] if isinstance(got, (list, tuple)) else got
    torch.testing.assert_close(torch.as_tensor(got), R.gdpa_ref(q, k, v, activation="silu", causal=True,
                                                                  bias=bias, pre_scale=0.5),
                               rtol=1e-5, atol=1e-5)
