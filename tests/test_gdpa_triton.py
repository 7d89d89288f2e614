"""Triton GDPA kernels vs the PyTorch reference, on the CPU under TRITON_INTERPRET=1.

Small shapes (non-powers of two, lengths 0 and 1, GQA, Tq != Tk), every
activation, dense and jagged, with and without a window, fp32 and bf16.
Outputs and gradients are pre-filled with NaN to prove every element is
written. Skipped when triton is not installed or the interpreter is off.
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("set TRITON_INTERPRET=1 to run the Triton kernels on the CPU", allow_module_level=True)

from recopt.ops import _gdpa_triton as T  # noqa: E402
from recopt.ops import gdpa_ref as R  # noqa: E402
from triton_test_helpers import DEVICE, nan_filled as _poison, rand as _rand, rel  # noqa: E402


ACTS = sorted(R.ACTIVATIONS)
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def _ref_grads(q, k, v, go, **kw):
    """fp32 reference forward and autograd grads from the (rounded) inputs."""
    qq, kk, vv = (t.float().requires_grad_() for t in (q, k, v))
    o = R.gdpa_ref(qq, kk, vv, **kw)
    o.backward(go.float())
    return o.detach(), qq.grad, kk.grad, vv.grad


# (activation, dtype, window): every activation in both dtypes, windows alternating
CASES = [(a, dt, (3 if (i + j) % 2 else -1)) for i, a in enumerate(ACTS)
         for j, dt in enumerate((torch.float32, torch.bfloat16))]


@pytest.mark.parametrize("act,dtype,window", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_dense_fwd_bwd(act, dtype, window):
    B, H, Hkv, Tq, Tk, d, dv = 3, 2, 1, 19, 13, 12, 10
    q, k, v = _rand((B, H, Tq, d), dtype, 1), _rand((B, Hkv, Tk, d), dtype, 2), _rand((B, Hkv, Tk, dv), dtype, 3)
    ql = torch.tensor([0, 1, 17], device=DEVICE)
    kl = torch.tensor([5, 13, 1], device=DEVICE)
    kw = dict(activation=act, qk_scale=0.8, pre_scale=0.35, window=window)
    out = _poison((B, H, Tq, dv), dtype)
    T.gdpa_fwd(q, k, v, q_lengths=ql, kv_lengths=kl, out=out, **kw)
    go = _rand((B, H, Tq, dv), dtype, 4)
    o_ref, dq_ref, dk_ref, dv_ref = _ref_grads(q, k, v, go, q_lengths=ql, kv_lengths=kl, **kw)
    assert rel(out, o_ref) <= TOL[dtype]
    assert (out[0] == 0).all(), "rows past q_lengths must be written as zeros"
    grads = (_poison(q.shape, dtype), _poison(k.shape, dtype), _poison(v.shape, dtype))
    T.gdpa_bwd(go, q, k, v, q_lengths=ql, kv_lengths=kl, out=grads, **kw)
    for got, want in zip(grads, (dq_ref, dk_ref, dv_ref)):
        assert rel(got, want) <= TOL[dtype]


@pytest.mark.parametrize("act,dtype,window", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_jagged_fwd_bwd(act, dtype, window):
    lq, lk = [0, 1, 9, 21], [6, 0, 1, 17]      # includes empty and length-1 sequences
    H, Hkv, d, dv = 2, 2, 20, 8
    qo = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), device=DEVICE)
    ko = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), device=DEVICE, dtype=torch.int32)
    q, k, v = _rand((sum(lq), H, d), dtype, 5), _rand((sum(lk), Hkv, d), dtype, 6), _rand((sum(lk), Hkv, dv), dtype, 7)
    kw = dict(activation=act, qk_scale=1.3, pre_scale=0.25, window=window)
    out = _poison((sum(lq), H, dv), dtype)
    T.gdpa_fwd(q, k, v, q_offsets=qo, kv_offsets=ko, max_seq_len_q=max(lq), max_seq_len_kv=max(lk), out=out, **kw)
    go = _rand(out.shape, dtype, 8)
    qq, kk, vv = (t.float().requires_grad_() for t in (q, k, v))
    o_ref = R.gdpa_jagged_ref(qq, kk, vv, qo, ko, max(lq), max(lk), **kw)
    o_ref.backward(go.float())
    assert rel(out, o_ref) <= TOL[dtype]
    grads = (_poison(q.shape, dtype), _poison(k.shape, dtype), _poison(v.shape, dtype))
    T.gdpa_bwd(go, q, k, v, q_offsets=qo, kv_offsets=ko, max_seq_len_q=max(lq), max_seq_len_kv=max(lk),
               out=grads, **kw)
    for got, want in zip(grads, (qq.grad, kk.grad, vv.grad)):
        assert rel(got, want) <= TOL[dtype]


def test_strided_and_broadcast_inputs_are_read_in_place():
    """Transposed views and a stride-0 (broadcast) query need no copy."""
    dtype = torch.float32
    qs = _rand((1, 2, 9, 16), dtype, 1).expand(3, -1, -1, -1)          # broadcast_q
    k = _rand((3, 11, 2, 16), dtype, 2).transpose(1, 2)                # [B, T, H, d] storage
    v = _rand((3, 2, 16, 11), dtype, 3).transpose(2, 3)                # d-major storage
    out = _poison((3, 2, 9, 16), dtype)
    T.gdpa_fwd(qs, k, v, activation="gelu_tanh", qk_scale=1.0, pre_scale=0.5, window=-1, out=out)
    assert rel(out, R.gdpa_ref(qs, k, v, activation="gelu_tanh", pre_scale=0.5)) <= 1e-4


def test_op_dispatches_to_triton_when_forced(monkeypatch):
    """torch.ops.recopt.gdpa uses the kernels with RECOPT_GDPA_BACKEND=triton (autograd included)."""
    from recopt.ops import backend_for, gdpa
    monkeypatch.setenv("RECOPT_GDPA_BACKEND", "triton")
    q = _rand((2, 2, 7, 8), torch.float32, 1).requires_grad_()
    k = _rand((2, 1, 5, 8), torch.float32, 2).requires_grad_()
    v = _rand((2, 1, 5, 8), torch.float32, 3).requires_grad_()
    assert backend_for(q, k, v, "silu") == "triton"
    o = gdpa(q, k, v, activation="silu", window=2)
    o.sum().backward()
    o_ref, dq, dk, dv = _ref_grads(q.detach(), k.detach(), v.detach(), torch.ones_like(o),
                                   activation="silu", window=2)
    assert rel(o, o_ref) <= 1e-4
    for t, want in ((q, dq), (k, dk), (v, dv)):
        assert rel(t.grad, want) <= 1e-4
