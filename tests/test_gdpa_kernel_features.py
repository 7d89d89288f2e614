"""GDPA kernel features beyond the op's reference: causal masks (fully masked tiles
skipped), an additive bias, fast activation math (FAST=1: the fast formulas without
inline asm), unpredicated interior tiles (head sizes equal to the block) and the
flattened grid. Interpreter (TRITON_INTERPRET=1) vs a PyTorch reference written
here, random inputs, lengths 0 and 1, non-power-of-2 sizes, NaN-poisoned outputs.
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("set TRITON_INTERPRET=1 to run the Triton kernels on the CPU", allow_module_level=True)

from recopt.ops import _gdpa_triton as T  # noqa: E402
from recopt.ops import gdpa_ref as R  # noqa: E402
from triton_test_helpers import DEVICE, nan_filled as _nan, rand as _rand, rel  # noqa: E402




def ref(q, k, v, act, qk_scale, pre_scale, window=-1, q_len=None, k_len=None, causal=False,
        causal_offset=0, bias=None):
    """fp32 reference with causal and bias: s = pre*q.k + bias, masked -> 0, act, * qk."""
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * pre_scale
    if bias is not None:
        s = s + bias.float()
    i = torch.arange(Tq, device=q.device)[:, None]
    j = torch.arange(Tk, device=q.device)[None, :]
    keep = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if window >= 0:
        keep &= (i - j).abs() <= window
    if causal:
        keep &= j <= i + causal_offset
    keep = keep[None, None].expand(B, 1, Tq, Tk)
    if k_len is not None:
        keep = keep & (j[None, None] < k_len.view(-1, 1, 1, 1))
    s = torch.where(keep, s, 0.0)
    o = torch.matmul(R.act_fwd(s, act) * qk_scale, v.float())
    if q_len is not None:
        o = torch.where(i[None, None] < q_len.view(-1, 1, 1, 1), o, 0.0)
    return o


def _check(q, k, v, tol, **kw):
    out = _nan((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), q.dtype)
    launch = {x: kw[x] for x in ("activation", "qk_scale", "pre_scale", "window")}
    extra = dict(q_lengths=kw.get("q_len"), kv_lengths=kw.get("k_len"), causal=kw.get("causal", False),
                 causal_offset=kw.get("causal_offset", 0), bias=kw.get("bias"))
    T.gdpa_fwd(q, k, v, out=out, **launch, **extra)
    qq, kk, vv = (t.float().requires_grad_() for t in (q, k, v))
    o_ref = ref(qq, kk, vv, kw["activation"], kw["qk_scale"], kw["pre_scale"], kw["window"],
                kw.get("q_len"), kw.get("k_len"), kw.get("causal", False), kw.get("causal_offset", 0),
                kw.get("bias"))
    assert rel(out, o_ref) <= tol
    go = _rand(out.shape, q.dtype, 9)
    o_ref.backward(go.float())
    grads = (_nan(q.shape, q.dtype), _nan(k.shape, k.dtype), _nan(v.shape, v.dtype))
    T.gdpa_bwd(go, q, k, v, out=grads, **launch, **extra)
    for name, got, want in zip("qkv", grads, (qq.grad, kk.grad, vv.grad)):
        assert rel(got, want) <= tol, name
    return out


@pytest.mark.parametrize("act", ["gelu", "silu", "relu_square"])
@pytest.mark.parametrize("causal_offset", [0, -3, 5])
def test_causal(act, causal_offset):
    """Causal masks, top-left aligned with an offset; tiles above the diagonal are skipped."""
    B, H, Tq, Tk, d = 2, 2, 37, 29, 16
    q, k, v = _rand((B, H, Tq, d), torch.float32, 1), _rand((B, 1, Tk, d), torch.float32, 2), \
        _rand((B, 1, Tk, d), torch.float32, 3)
    kl = torch.tensor([29, 1], device=DEVICE)
    ql = torch.tensor([0, 37], device=DEVICE)
    out = _check(q, k, v, 1e-4, activation=act, qk_scale=0.7, pre_scale=0.3, window=-1, q_len=ql, k_len=kl,
                 causal=True, causal_offset=causal_offset)
    if causal_offset < 0:  # rows i < -offset see no key: exactly zero
        assert (out[:, :, :-causal_offset] == 0).all()


def test_causal_with_window_and_bias_bf16():
    B, H, Tq, Tk, d = 2, 2, 33, 33, 24
    q, k, v = _rand((B, H, Tq, d), torch.bfloat16, 4), _rand((B, H, Tk, d), torch.bfloat16, 5), \
        _rand((B, H, Tk, d), torch.bfloat16, 6)
    bias = _rand((1, H, Tq, Tk), torch.bfloat16, 7)             # broadcast over the batch
    _check(q, k, v, 2e-2, activation="gelu_tanh", qk_scale=1.1, pre_scale=0.25, window=4, causal=True,
           bias=bias, k_len=torch.tensor([33, 17], device=DEVICE))


@pytest.mark.parametrize("bias_shape", [(2, 3, 21, 18), (2, 1, 21, 18), (1, 1, 21, 18)])
def test_bias_broadcasts(bias_shape):
    B, H, Tq, Tk, d = 2, 3, 21, 18, 8
    q, k, v = _rand((B, H, Tq, d), torch.float32, 1), _rand((B, H, Tk, d), torch.float32, 2), \
        _rand((B, H, Tk, d), torch.float32, 3)
    bias = _rand(bias_shape, torch.float32, 4)
    _check(q, k, v, 1e-4, activation="gelu", qk_scale=0.5, pre_scale=0.4, window=-1, bias=bias,
           q_len=torch.tensor([21, 1], device=DEVICE), k_len=torch.tensor([0, 18], device=DEVICE))


def test_bias_of_wrong_shape_is_rejected():
    q = _rand((2, 2, 5, 8), torch.float32, 1)
    with pytest.raises(ValueError, match="does not broadcast"):
        T.gdpa_fwd(q, q, q, activation="gelu", qk_scale=1.0, pre_scale=1.0, window=-1,
                   bias=_rand((2, 2, 5, 4), torch.float32, 2))


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu"])
def test_even_head_dim_interior_tiles_bf16_fast_math(act):
    """d == BLOCK_D (16): interior key/query tiles load without predicates; lengths 0, 1 and
    a non-multiple of the 16-wide tile exercise the bounds-checked tail; bf16 uses FAST=1."""
    assert T.fast_math(torch.bfloat16) == 1 and T.fast_math(torch.float32) == 0
    B, H, Tq, Tk, d = 3, 2, 50, 47, 16
    q, k, v = _rand((B, H, Tq, d), torch.bfloat16, 1), _rand((B, H, Tk, d), torch.bfloat16, 2), \
        _rand((B, H, Tk, d), torch.bfloat16, 3)
    _check(q, k, v, 2e-2, activation=act, qk_scale=0.9, pre_scale=0.3, window=-1,
           q_len=torch.tensor([50, 0, 1], device=DEVICE), k_len=torch.tensor([47, 1, 0], device=DEVICE))


def test_many_programs_on_axis_0():
    """B*H programs all on grid axis 0 (CUDA's y axis stops at 65,535): every (b, h) is written."""
    B, H, T_, d = 24, 5, 3, 4
    q, k, v = _rand((B, H, T_, d), torch.float32, 1), _rand((B, H, T_, d), torch.float32, 2), \
        _rand((B, H, T_, d), torch.float32, 3)
    _check(q, k, v, 1e-4, activation="relu", qk_scale=1.0, pre_scale=1.0, window=-1)


def test_launcher_configs_fit_every_head_size():
    """Every d in 1..256, both dtypes: the launcher's configs stay within shared memory and
    never put more than one warpgroup on 64 rows (no duplicated score tiles)."""
    for dtype in (torch.bfloat16, torch.float32):
        for d in range(1, 257):
            for tq, tk, arch, heavy in ((1, 1, 90, False), (100, 30, 100, True), (1000, 256, 90, False),
                                        (4096, 4096, 100, False), (1000, 256, 90, True)):
                f = T._fwd_config_gpu(tq, tk, d, d, dtype, arch, heavy)
                b1, b2 = T._bwd_config_gpu(tq, tk, d, d, dtype, arch, heavy)
                b3 = T._fused_config_gpu(tq, tk, d, d, dtype, arch, heavy)
                bd = T._pow2(d)
                elt = 4 if dtype == torch.float32 else 2
                for kind, (bm, bn, w, st) in (("fwd", f), ("dkdv", b1), ("dq", b2), ("fused", b3)):
                    assert T.smem_estimate(kind, bm, bn, bd, bd, st, elt) <= T.SMEM_LIMIT, (d, dtype, kind)
                assert f[2] <= 4 * max(f[0] // 64, 1)
                assert b1[2] <= 4 * max(b1[1] // 64, 1) and b2[2] <= 4 * max(b2[0] // 64, 1)
                assert b3[2] <= 4 * max(b3[1] // 64, 1)     # the one launch: warpgroups split keys
