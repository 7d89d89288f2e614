"""GDPA reference, op registration, autograd, fake impl, FLOPs (CPU, torch only)."""
import pytest
import torch

from recopt.ops import gdpa, gdpa_jagged
from recopt.ops import gdpa_ref as R

ACTS = sorted(R.ACTIVATIONS)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _offsets(lengths):
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(lengths).cumsum(0)])


@pytest.mark.parametrize("act", ACTS)
def test_explicit_backward_matches_autograd(act):
    """The §3.2 backward (what the kernels implement) equals autograd of the reference."""
    B, H, Hkv, Tq, Tk, d, dv = 2, 4, 2, 7, 5, 6, 3
    q, k, v = _rand(B, H, Tq, d), _rand(B, Hkv, Tk, d, seed=1), _rand(B, Hkv, Tk, dv, seed=2)
    ql, kl = torch.tensor([0, 6]), torch.tensor([1, 5])
    go = _rand(B, H, Tq, dv, seed=3)
    args = (ql, kl, act, 0.7, 0.4, 2)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    R.gdpa_ref(qq, kk, vv, *args).backward(go)
    dq, dk, dv_ = R.gdpa_bwd_ref(go, q, k, v, *args)
    for got, want in ((dq, qq.grad), (dk, kk.grad), (dv_, vv.grad)):
        assert rel(got, want) < 1e-10


def test_activation_gradients_are_derivatives():
    s = torch.linspace(-5, 5, 101, dtype=torch.float64).requires_grad_()
    for act in ACTS:
        y = R.act_fwd(s, act)
        (g,) = torch.autograd.grad(y.sum(), s)
        assert torch.allclose(R.act_grad(s.detach(), act), g, atol=1e-9), act
        assert R.act_fwd(torch.zeros(1), act).item() == 0.0, f"{act}(0) must be 0 for zero masking"


def test_zero_masking_and_lengths_semantics():
    q, k, v = _rand(2, 1, 4, 3), _rand(2, 1, 6, 3, seed=1), _rand(2, 1, 6, 2, seed=2)
    o = R.gdpa_ref(q, k, v, torch.tensor([2, 4]), torch.tensor([3, 0]), "silu")
    want0 = torch.nn.functional.silu(q[0, 0, :2] @ k[0, 0, :3].T) @ v[0, 0, :3]
    assert torch.allclose(o[0, 0, :2], want0)
    assert (o[0, 0, 2:] == 0).all() and (o[1] == 0).all()


def test_window_is_symmetric_band():
    q, k, v = _rand(1, 1, 9, 4), _rand(1, 1, 9, 4, seed=1), _rand(1, 1, 9, 4, seed=2)
    o = R.gdpa_ref(q, k, v, activation="gelu", window=2)
    i = torch.arange(9)
    s = torch.where((i[:, None] - i[None, :]).abs() <= 2, q[0, 0] @ k[0, 0].T, 0.0)
    assert torch.allclose(o[0, 0], torch.nn.functional.gelu(s) @ v[0, 0])


def test_softmax_mode_is_sdpa_and_empty_rows_are_zero():
    q, k, v = _rand(2, 2, 5, 4), _rand(2, 2, 6, 4, seed=1), _rand(2, 2, 6, 4, seed=2)
    o = gdpa(q, k, v, activation="softmax", pre_scale=0.5)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.5)
    assert rel(o, want) < 1e-12
    o = gdpa(q, k, v, activation="softmax", kv_lengths=torch.tensor([0, 3]))
    assert (o[0] == 0).all() and torch.isfinite(o).all()


def test_softmax_custom_op_backward():
    q, k, v = (t.requires_grad_() for t in (_rand(1, 2, 5, 4), _rand(1, 1, 6, 4, seed=1), _rand(1, 1, 6, 4, seed=2)))
    args = (torch.tensor([4]), torch.tensor([5]), "softmax", 0.5, 0.3, 1)
    go = _rand(1, 2, 5, 4, seed=5)
    grads = R.gdpa_bwd_ref(go, q.detach(), k.detach(), v.detach(), *args)
    R.gdpa_ref(q, k, v, *args).backward(go)
    for got, t in zip(grads, (q, k, v)):
        assert rel(got, t.grad) < 1e-10


def test_broadcast_q_and_gqa_match_explicit_expansion():
    seeds = _rand(4, 3, 8)                      # [H, Tq, d], shared by the batch
    k, v = _rand(5, 2, 7, 8, seed=1), _rand(5, 2, 7, 8, seed=2)
    o = gdpa(seeds, k, v, activation="gelu_tanh", broadcast_q=True)
    want = R.gdpa_ref(seeds.expand(5, -1, -1, -1), k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                      activation="gelu_tanh")
    assert rel(o, want) < 1e-12


def test_op_autograd_and_opcheck():
    q = _rand(2, 2, 5, 4).requires_grad_()
    k, v = _rand(2, 1, 3, 4, seed=1).requires_grad_(), _rand(2, 1, 3, 6, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, k, v: gdpa(q, k, v, activation="gelu", window=1, kv_lengths=torch.tensor([2, 3])),
        (q, k, v))
    from torch.library import opcheck
    res = opcheck(torch.ops.recopt.gdpa.default,
                  (q.float(), k.float(), v.float(), torch.tensor([1, 5]), None, "silu", 0.5, 0.7, 2))
    assert all(v == "SUCCESS" for v in res.values()), res


def test_jagged_matches_per_sample_loop_with_grads():
    lq, lk = [3, 0, 1, 6], [4, 2, 0, 7]
    qo, ko = _offsets(lq), _offsets(lk)
    q = _rand(sum(lq), 2, 5).requires_grad_()
    k, v = _rand(sum(lk), 1, 5, seed=1).requires_grad_(), _rand(sum(lk), 1, 3, seed=2).requires_grad_()
    o = gdpa_jagged(q, k, v, qo, ko, activation="hardswish", window=2, pre_scale=0.6)
    go = _rand(*o.shape, seed=9)
    (o * go).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    outs = []
    for b in range(4):
        qb, kb, vb = (x[o_[b]:o_[b + 1]].transpose(0, 1)[None] for x, o_ in ((q, qo), (k, ko), (v, ko)))
        outs.append(R.gdpa_ref(qb, kb, vb, activation="hardswish", window=2, pre_scale=0.6)[0].transpose(0, 1))
    want = torch.cat(outs)
    assert rel(o, want) < 1e-12
    (want * go).sum().backward()
    for g, t in zip(got, (q, k, v)):
        assert rel(g, t.grad) < 1e-10


def test_fake_impl_and_flops(monkeypatch):
    # The custom op's FLOP formula: force the op (on the CPU, gdpa() otherwise
    # runs the lean plain-aten path of recopt.ops.gdpa_cpu, counted op by op).
    monkeypatch.setenv("RECOPT_GDPA_BACKEND", "reference")
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    with FakeTensorMode():
        o = torch.ops.recopt.gdpa(torch.empty(2, 4, 5, 8), torch.empty(2, 2, 3, 8), torch.empty(2, 2, 3, 6),
                                  None, None, "gelu", 1.0, 1.0, -1)
        assert o.shape == (2, 4, 5, 6)
        o = torch.ops.recopt.gdpa_jagged(torch.empty(9, 4, 8), torch.empty(7, 2, 8), torch.empty(7, 2, 6),
                                         torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                                         5, 4, "silu", 1.0, 1.0, -1)
        assert o.shape == (9, 4, 6)
    q = torch.randn(2, 4, 5, 8, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        gdpa(q, torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 6), activation="gelu").sum().backward()
    assert fc.get_total_flops() == 2 * 2 * 4 * 5 * 3 * (8 + 6) * 3.5


def test_compile_fullgraph_cpu():
    q, k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    f = torch.compile(lambda q, k, v: gdpa(q, k, v, activation="gelu_tanh", window=1), fullgraph=True)
    assert rel(f(q, k, v), R.gdpa_ref(q, k, v, activation="gelu_tanh", window=1)) < 1e-6


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown GDPA activation"):
        gdpa(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2), activation="tanh")
    with pytest.raises(ValueError, match="GQA"):
        gdpa(torch.randn(1, 3, 2, 2), torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2))
    with pytest.raises(ValueError, match="attn_mask is only supported"):
        gdpa(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2),
             attn_mask=torch.ones(2, 2, dtype=torch.bool))
