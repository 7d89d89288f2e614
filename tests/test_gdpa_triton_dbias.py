"""The bias gradient in the Triton GDPA backward, and causal/bias calls routed to the kernels.

Interpreter (TRITON_INTERPRET=1) vs the reference backward (``gdpa_bwd_ref``,
the spec): random inputs, every broadcast form of the bias (full, over the
batch, the heads, the queries, the keys, all of them), causal masks, lengths 0
and 1, non-power-of-2 sizes, GQA; outputs NaN-poisoned so every element must be
written.
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




B, H, HKV, TQ, TK, D = 2, 4, 2, 21, 18, 12


@pytest.mark.parametrize("bias_shape", [
    (B, H, TQ, TK),      # full: stored, no atomics
    (1, H, TQ, TK),      # over the batch: atomic adds
    (B, 1, TQ, TK),      # over the heads
    (1, 1, 1, TK),       # a key bias: summed over queries inside the tile
    (B, H, TQ, 1),       # a query bias: summed over keys
    (1, 1, 1, 1),        # a scalar
], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
def test_dbias_matches_the_reference(bias_shape, causal):
    q, k, v = _rand((B, H, TQ, D), torch.float32, 1), _rand((B, HKV, TK, D), torch.float32, 2), \
        _rand((B, HKV, TK, D), torch.float32, 3)
    bias = _rand(bias_shape, torch.float32, 4)
    go = _rand((B, H, TQ, D), torch.float32, 5)
    ql, kl = torch.tensor([TQ, 1], device=DEVICE), torch.tensor([0 if causal else 7, TK], device=DEVICE)
    kw = dict(activation="gelu", qk_scale=0.7, pre_scale=0.35, window=-1)
    want = R.gdpa_bwd_ref(go, q, k, v, ql, kl, causal=causal, bias=bias, **kw)
    grads = (_nan(q.shape, q.dtype), _nan(k.shape, k.dtype), _nan(v.shape, v.dtype))
    got = T.gdpa_bwd(go, q, k, v, q_lengths=ql, kv_lengths=kl, causal=causal, bias=bias, bias_grad=True,
                     out=grads, **kw)
    assert len(got) == 4 and got[3].shape == bias.shape and got[3].dtype == bias.dtype
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
        assert rel(g, w) <= 1e-4, name
    if causal and bias_shape == (B, H, TQ, TK):
        # the causal upper triangle is skipped by the kernel and must come back as exact zeros
        assert (got[3].triu(1) == 0).all()


@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "relu_square"])
def test_dbias_bf16_with_window_and_causal(act):
    """bf16 (fast activation math), a window and a causal mask together, length-1 and
    non-power-of-2 sequences, a bias shared over the batch in bf16."""
    b, h, tq, tk, d = 3, 2, 33, 17, 20
    q, k, v = _rand((b, h, tq, d), torch.bfloat16, 6), _rand((b, h, tk, d), torch.bfloat16, 7), \
        _rand((b, h, tk, d), torch.bfloat16, 8)
    bias = _rand((1, h, tq, tk), torch.bfloat16, 9)
    go = _rand((b, h, tq, d), torch.bfloat16, 10)
    ql, kl = torch.tensor([33, 1, 0], device=DEVICE), torch.tensor([17, 1, 5], device=DEVICE)
    kw = dict(activation=act, qk_scale=1.2, pre_scale=0.3, window=5)
    qq, kk, vv, bb = (t.float().requires_grad_() for t in (q, k, v, bias))
    o = R.gdpa_ref(qq, kk, vv, ql, kl, causal=True, bias=bb, **kw)
    o.backward(go.float())
    got = T.gdpa_bwd(go, q, k, v, q_lengths=ql, kv_lengths=kl, causal=True, bias=bias, bias_grad=True, **kw)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, (qq.grad, kk.grad, vv.grad, bb.grad)):
        assert rel(g, w) <= 2e-2, name


def test_dbias_of_empty_and_single_sequences():
    """Tq = 1, Tk = 1 and Tq = 0: dbias is written (zeros where nothing is seen)."""
    for tq, tk in ((1, 1), (0, 3), (2, 0)):
        q, k, v = _rand((2, 1, tq, 8), torch.float32, 1), _rand((2, 1, tk, 8), torch.float32, 2), \
            _rand((2, 1, tk, 8), torch.float32, 3)
        bias = _rand((2, 1, tq, tk), torch.float32, 4)
        go = _rand((2, 1, tq, 8), torch.float32, 5)
        got = T.gdpa_bwd(go, q, k, v, activation="silu", qk_scale=1.0, pre_scale=1.0, window=-1,
                         causal=True, bias=bias, bias_grad=True)
        want = R.gdpa_bwd_ref(go, q, k, v, activation="silu", causal=True, bias=bias)
        for g, w in zip(got, want):
            assert g.shape == w.shape and torch.allclose(g, w, atol=1e-5), (tq, tk)


def test_bias_grad_needs_a_bias():
    q = _rand((1, 1, 3, 8), torch.float32, 1)
    with pytest.raises(ValueError, match="needs the bias"):
        T.gdpa_bwd(q, q, q, q, activation="silu", qk_scale=1.0, pre_scale=1.0, window=-1, bias_grad=True)


def test_op_runs_causal_and_bias_in_the_kernels(monkeypatch):
    """torch.ops.recopt.gdpa with causal=True and a 3-D bias that requires grad runs the Triton
    kernels (forced backend) and matches the reference in value and in every gradient."""
    from recopt.ops import gdpa
    from recopt.ops.gdpa import backend_for, reference_reason

    q0, k0, v0 = _rand((2, 4, 9, 8), torch.float32, 1), _rand((2, 2, 7, 8), torch.float32, 2), \
        _rand((2, 2, 7, 8), torch.float32, 3)
    b0 = _rand((4, 9, 7), torch.float32, 4)
    assert reference_reason(True, b0) is None
    calls = []
    real_fwd, real_bwd = T.gdpa_fwd, T.gdpa_bwd
    monkeypatch.setattr(T, "gdpa_fwd", lambda *a, **kw: calls.append("fwd") or real_fwd(*a, **kw))
    monkeypatch.setattr(T, "gdpa_bwd", lambda *a, **kw: calls.append("bwd") or real_bwd(*a, **kw))
    monkeypatch.setenv("RECOPT_GDPA_BACKEND", "triton")
    assert backend_for(q0, k0, v0, "gelu", causal=True, bias=b0) == "triton"
    q, k, v, b = (t.clone().requires_grad_() for t in (q0, k0, v0, b0))
    o = gdpa(q, k, v, activation="gelu", pre_scale=0.5, qk_scale=0.8, causal=True, bias=b)
    o.backward(torch.ones_like(o))
    assert calls == ["fwd", "bwd"]
    monkeypatch.setenv("RECOPT_GDPA_BACKEND", "reference")
    qr, kr, vr, br = (t.clone().requires_grad_() for t in (q0, k0, v0, b0))
    o_ref = gdpa(qr, kr, vr, activation="gelu", pre_scale=0.5, qk_scale=0.8, causal=True, bias=br)
    o_ref.backward(torch.ones_like(o_ref))
    assert rel(o, o_ref) <= 1e-4
    for t, r in ((q, qr), (k, kr), (v, vr), (b, br)):
        assert t.grad.shape == r.grad.shape and rel(t.grad, r.grad) <= 1e-4
