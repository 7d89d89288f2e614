"""Softmax GDPA on the fused path (online-softmax Triton kernels) vs the reference.

Runs on the CPU under TRITON_INTERPRET=1 (``RECOPT_GDPA_BACKEND=triton`` forces the
kernels; ``reference`` the plain-PyTorch semantics of recopt.ops.gdpa_ref). Random
inputs, never zeros; lengths 0 and 1, rows with no kept key, rows a float mask
empties, non-power-of-2 T and d, causal, window, GQA, broadcast q, boolean and
additive masks; forward values and gradients, and every masked_rows mode.
"""
import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
    pytest.skip("set TRITON_INTERPRET=1 to run the Triton kernels on the CPU", allow_module_level=True)

from recopt.ops import _gdpa_softmax_triton as S  # noqa: E402
from recopt.ops import gdpa  # noqa: E402
from recopt.ops import gdpa_ref as R  # noqa: E402
from recopt.ops import gdpa_softmax as GS  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) + 0.1).to(dtype).to(DEVICE)


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.equal(a.isnan(), b.isnan()), "NaN positions differ"
    a, b = a.nan_to_num(0.0), b.nan_to_num(0.0)
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _run(monkeypatch, backend, q, k, v, go, **kw):
    """gdpa(softmax) forward + backward on the given backend; inputs in their dtype (the
    reference gets fp32 copies of the same rounded values)."""
    monkeypatch.setenv("RECOPT_GDPA_BACKEND", backend)
    cast = (lambda t: t.float()) if backend == "reference" else (lambda t: t)
    leaves = [cast(t).clone().requires_grad_() for t in (q, k, v)]
    o = gdpa(*leaves, activation="softmax", **kw)
    o.backward(cast(go))
    return [o.detach()] + [t.grad for t in leaves]


def _compare(monkeypatch, q, k, v, dtype, grads=True, **kw):
    go = _rand((k.shape[0], q.shape[-3], q.shape[-2], v.shape[-1]), dtype, 99)
    got = _run(monkeypatch, "triton", q, k, v, go, **kw)
    want = _run(monkeypatch, "reference", q, k, v, go, **kw)
    names = ("o", "dq", "dk", "dv") if grads else ("o",)
    for name, a, b in zip(names, got, want):
        assert rel(a, b) <= TOL[dtype], f"{name}: rel err {rel(a, b):.2e} > {TOL[dtype]}"
    return got, want


# (dtype, GQA, causal, window): masks, non-power-of-2 sizes, lengths 0 and 1
CASES = [
    (torch.float32, False, False, -1),
    (torch.float32, True, True, -1),
    (torch.float32, False, False, 3),
    (torch.bfloat16, True, False, -1),
    (torch.bfloat16, False, True, 4),
]


@pytest.mark.parametrize("dtype,gqa,causal,window", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_lengths_causal_window_gqa(monkeypatch, dtype, gqa, causal, window):
    B, H, Tq, Tk, d, dv = 4, 2, 19, 21, 12, 10
    hkv = 1 if gqa else H
    q, k, v = _rand((B, H, Tq, d), dtype, 1), _rand((B, hkv, Tk, d), dtype, 2), _rand((B, hkv, Tk, dv), dtype, 3)
    ql = torch.tensor([0, 1, 17, 3], device=DEVICE)
    kl = torch.tensor([5, 21, 9, 1], device=DEVICE)
    got, _ = _compare(monkeypatch, q, k, v, dtype, q_lengths=ql, kv_lengths=kl, causal=causal,
                      window=None if window < 0 else window, pre_scale=1 / math.sqrt(d), qk_scale=0.7)
    assert (got[0][0] == 0).all(), "rows past q_lengths are zeros"


def test_no_lengths_and_broadcast_q(monkeypatch):
    """Dense (no mask) with a query shared by the batch (stride 0); Tq = 1 with lengths."""
    dtype = torch.float32
    q = _rand((2, 1, 23), dtype, 4)
    k, v = _rand((3, 2, 17, 23), dtype, 5), _rand((3, 2, 17, 9), dtype, 6)
    _compare(monkeypatch, q, k, v, dtype, broadcast_q=True, pre_scale=0.3)
    q1 = _rand((3, 2, 1, 23), dtype, 7)
    _compare(monkeypatch, q1, k, v, dtype, kv_lengths=torch.tensor([1, 17, 6], device=DEVICE))


@pytest.mark.parametrize("masked_rows", ["zero", "uniform", "nan"])
def test_float_padding_mask_all_masked_rows(monkeypatch, masked_rows):
    """A key-padding mask as the model writes it (-1e9 with "uniform", -inf otherwise, as the
    pass pairs them); sample 1 has no valid key. Rows with no kept key follow masked_rows; the backward recomputes probabilities from
    the saved row max and sum, exact even at -1e9 (where an fp32 log-sum-exp is not)."""
    dtype = torch.float32
    B, H, T, d = 3, 2, 13, 8
    q, k, v = _rand((B, H, T, d), dtype, 8), _rand((B, H, T, d), dtype, 9), _rand((B, H, T, d), dtype, 10)
    lens = torch.tensor([9, 0, 13], device=DEVICE)
    pad = torch.arange(T, device=DEVICE)[None, :] >= lens[:, None]
    fill = -1e9 if masked_rows == "uniform" else float("-inf")
    mask = torch.zeros(B, 1, 1, T, device=DEVICE).masked_fill(pad[:, None, None, :], fill)
    got, want = _compare(monkeypatch, q, k, v, dtype, grads=masked_rows != "nan", attn_mask=mask,
                         masked_rows=masked_rows, pre_scale=0.4)
    o = got[0]
    if masked_rows == "zero":
        assert (o[1] == 0).all()
    elif masked_rows == "uniform":
        torch.testing.assert_close(o[1], v[1].mean(dim=-2, keepdim=True).expand_as(o[1]))
    else:
        assert o[1].isnan().all() and not o[0].isnan().any()
        assert got[3][1].isnan().all() and not got[3][0].isnan().any(), "NaN gradients into v of sample 1 only"


@pytest.mark.parametrize("masked_rows", ["zero", "uniform", "nan"])
def test_lengths_empty_rows_fill(monkeypatch, masked_rows):
    """kv_lengths 0 and a window that empties rows: filled per masked_rows, gradients too."""
    dtype = torch.float32
    B, H, Tq, Tk, d = 2, 2, 11, 7, 6
    q, k, v = _rand((B, H, Tq, d), dtype, 11), _rand((B, 1, Tk, d), dtype, 12), _rand((B, 1, Tk, d), dtype, 13)
    kl = torch.tensor([0, 3], device=DEVICE)
    got, _ = _compare(monkeypatch, q, k, v, dtype, grads=masked_rows != "nan", kv_lengths=kl, window=2,
                      masked_rows=masked_rows)
    if masked_rows == "uniform":
        torch.testing.assert_close(got[0][0], v[0].mean(dim=-2, keepdim=True).expand(H, Tq, d))


def test_bias_rows_all_neg_inf_and_bool_mask(monkeypatch):
    """An additive bias with -inf everywhere on some rows (NaN under "nan", 0 under "zero"),
    and a boolean attn_mask that empties rows (filled, as the reference)."""
    dtype = torch.float32
    B, H, Tq, Tk, d = 2, 2, 9, 10, 8
    q, k, v = _rand((B, H, Tq, d), dtype, 14), _rand((B, H, Tk, d), dtype, 15), _rand((B, H, Tk, d), dtype, 16)
    bias = _rand((1, H, Tq, Tk), dtype, 17)
    bias[0, 1, 3] = float("-inf")
    got, _ = _compare(monkeypatch, q, k, v, dtype, attn_mask=bias, causal=True)
    assert (got[0][:, 1, 3] == 0).all()
    got, _ = _compare(monkeypatch, q, k, v, dtype, grads=False, attn_mask=bias, masked_rows="nan")
    assert got[0][:, 1, 3].isnan().all() and not got[0][:, 0].isnan().any()
    keep = torch.rand(B, 1, Tq, Tk, generator=torch.Generator().manual_seed(3)).to(DEVICE) > 0.4
    keep[1, 0, 2] = False
    for rows in ("zero", "uniform"):
        got, _ = _compare(monkeypatch, q, k, v, dtype, attn_mask=keep, masked_rows=rows)


def test_launcher_writes_every_element_and_jagged(monkeypatch):
    """NaN-poisoned dense output is fully written; jagged values (lengths 0, 1) match the
    padded reference."""
    dtype = torch.float32
    q, k, v = _rand((2, 2, 9, 16), dtype, 18), _rand((2, 2, 5, 16), dtype, 19), _rand((2, 2, 5, 16), dtype, 20)
    out = torch.full((2, 2, 9, 16), float("nan"), device=DEVICE)
    S.softmax_fwd(q, k, v, qk_scale=1.0, pre_scale=0.3, q_lengths=torch.tensor([3, 9]),
                  kv_lengths=torch.tensor([0, 5]), out=out)
    assert out.isfinite().all() and (out[0, :, 3:] == 0).all()

    lq, lk = [0, 1, 9, 13], [6, 1, 0, 11]
    qo = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), device=DEVICE)
    ko = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), device=DEVICE, dtype=torch.int32)
    H, d = 2, 12
    qj, kj, vj = _rand((sum(lq), H, d), dtype, 21), _rand((sum(lk), 1, d), dtype, 22), _rand((sum(lk), 1, d), dtype, 23)
    kw = dict(q_offsets=qo, kv_offsets=ko, max_seq_len_q=max(lq), max_seq_len_kv=max(lk),
              qk_scale=0.9, pre_scale=0.3, causal=True)
    o, m, l_inv = S.softmax_fwd(qj, kj, vj, **kw)
    go = _rand(o.shape, dtype, 24)
    dq, dk, dv = S.softmax_bwd(go, qj, kj, vj, o, m, l_inv, **kw)
    qq, kk, vv = (t.clone().requires_grad_() for t in (qj, kj, vj))
    pad = R.jagged_to_padded
    qp, kp, vp = (pad(t, off, n).transpose(1, 2) for t, off, n in
                  ((qq, qo, max(lq)), (kk, ko, max(lk)), (vv, ko, max(lk))))
    ql, kl = qo[1:] - qo[:-1], ko[1:] - ko[:-1]
    monkeypatch.setenv("RECOPT_GDPA_BACKEND", "reference")
    ref = gdpa(qp, kp, vp, activation="softmax", q_lengths=ql, kv_lengths=kl, causal=True,
               qk_scale=0.9, pre_scale=0.3)
    ref = R.padded_to_jagged(ref.transpose(1, 2), qo, sum(lq))
    ref.backward(go)
    for a, b in zip((o, dq, dk, dv), (ref, qq.grad, kk.grad, vv.grad)):
        assert rel(a, b) <= 2e-5


def test_routes_name_their_reason(monkeypatch):
    q, k, v = _rand((1, 2, 5, 8), torch.float32, 25), _rand((1, 2, 6, 8), torch.float32, 26), \
        _rand((1, 2, 6, 8), torch.float32, 27)
    monkeypatch.setenv("RECOPT_GDPA_BACKEND", "auto")
    if DEVICE == "cpu":
        r = GS.softmax_route(q, k, v, causal=True)
        assert r.backend == "reference" and "CPU" in r.reason
    monkeypatch.setenv("RECOPT_GDPA_BACKEND", "triton")
    assert GS.softmax_route(q, k, v, kv_lengths=torch.tensor([3])).backend == "triton"
    r = GS.softmax_route(q, k, v, dropout_p=0.1)
    assert r.backend == "reference" and "dropout" in r.reason
    rab = torch.zeros(1, 2, 5, 6, requires_grad=True)
    r = GS.softmax_route(q, k, v, bias=rab)
    assert r.backend == "reference" and "dbias" in r.reason
    r = GS.softmax_route(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool), bias=rab.detach(),
                         masked_rows="nan")
    assert r.backend == "reference" and "boolean and a float" in r.reason
    big = torch.zeros(1, 1, 2, 96)
    assert "fp32 at head size 96" in GS.softmax_route(big, big, big, causal=True).reason
    assert GS.softmax_route(big.bfloat16(), big.bfloat16(), big.bfloat16(), causal=True).backend == "triton"
    # train mode with live dropout keeps the reference; eval goes to the kernel
    GS.ROUTE_COUNTS.clear()
    gdpa(q, k, v, activation="softmax", dropout_p=0.2, training=False, kv_lengths=torch.tensor([4]))
    assert sum(n for (b, _), n in GS.ROUTE_COUNTS.items() if b == "triton") == 1
    GS.ROUTE_COUNTS.clear()
    gdpa(q, k, v, activation="softmax", dropout_p=0.2, training=True)
    [(backend, reason)] = GS.ROUTE_COUNTS
    assert backend == "reference" and "dropout" in reason   # the route not taken is visible


def test_sdpa_route_matches_reference(monkeypatch):
    """The unmasked/causal route (SDPA flash on CUDA) equals the reference, GQA included."""
    q, k, v = _rand((2, 4, 7, 8), torch.float32, 28), _rand((2, 2, 9, 8), torch.float32, 29), \
        _rand((2, 2, 9, 8), torch.float32, 30)
    route = GS.SoftmaxRoute("sdpa", "test")
    for causal in (False, True):
        got = GS.softmax_fused(route, q, k, v, None, None, None, None, 0.5, 0.3, -1, causal, "zero")
        monkeypatch.setenv("RECOPT_GDPA_BACKEND", "reference")
        want = gdpa(q, k, v, activation="softmax", qk_scale=0.5, pre_scale=0.3, causal=causal)
        assert rel(got, want) <= 1e-6


class _PaddedCausalAttention(torch.nn.Module):
    """A model's own softmax attention: causal plus a key-padding mask filled with `fill`."""

    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, lengths):
        T = k.size(2)
        pad = torch.arange(T, device=k.device)[None, :] >= lengths[:, None]
        s = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
        s = s.masked_fill(pad[:, None, None, :], self.fill)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=k.device).triu(1), self.fill)
        return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("fill", [-1e9, float("-inf")])
def test_fused_graph_runs_the_kernel_and_matches_the_model(monkeypatch, fill):
    """Through the gdpa pass: the fused site reports its kernel route, and with the kernels
    forced it equals the model (values, NaN rows, gradients) at new batch sizes and lengths."""
    from recopt.capture import capture
    from recopt.passes.base import PassContext
    from recopt.passes.gdpa_fusion import GDPAFusion

    model = _PaddedCausalAttention(fill).eval()
    ex = tuple(_rand((2, 2, 6, 8), torch.float32, s) for s in (31, 32, 33)) + (torch.tensor([6, 3]),)
    res = GDPAFusion().run(capture(model, ex).graph_module, PassContext(target=None, example_inputs=ex))
    assert [s.status for s in res.sites] == ["rewritten"], [(s.reason_code, s.reason) for s in res.sites]
    assert "online-softmax" in res.sites[0].details["kernel"]
    gm = res.graph_module
    monkeypatch.setenv("RECOPT_GDPA_BACKEND", "triton")
    for B, T, lens in ((3, 7, [7, 0, 1]), (1, 5, [2])):
        xs = [_rand((B, 2, T, 8), torch.float32, 40 + i).requires_grad_() for i in range(3)]
        ys = [x.detach().clone().requires_grad_() for x in xs]
        lengths = torch.tensor(lens, device=DEVICE)
        GS.ROUTE_COUNTS.clear()
        got = gm(*xs, lengths)
        assert sum(n for (b, _), n in GS.ROUTE_COUNTS.items() if b == "triton") == 1
        want = model(*ys, lengths)
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-5, atol=1e-5)
        if fill == float("-inf"):
            assert got.isnan().any() == (0 in lens)   # a length-0 sample: NaN rows, as the model
            continue
        got.sum().backward()
        want.sum().backward()
        for a, b in zip(xs, ys):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_gdpa_jagged_softmax_routes_to_the_kernel(monkeypatch):
    """gdpa_jagged(activation="softmax"): the kernels (forced) equal the padded reference,
    values and gradients, with empty and length-1 sequences and a window."""
    from recopt.ops import gdpa_jagged

    lq, lk = [3, 0, 1, 10], [0, 4, 1, 9]
    qo = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), device=DEVICE)
    ko = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), device=DEVICE)
    q, k, v = _rand((sum(lq), 2, 10), torch.float32, 50), _rand((sum(lk), 1, 10), torch.float32, 51), \
        _rand((sum(lk), 1, 6), torch.float32, 52)
    go = _rand((sum(lq), 2, 6), torch.float32, 53)
    outs = []
    for backend in ("triton", "reference"):
        monkeypatch.setenv("RECOPT_GDPA_BACKEND", backend)
        GS.ROUTE_COUNTS.clear()
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = gdpa_jagged(*leaves, qo, ko, activation="softmax", pre_scale=0.4, qk_scale=1.1, window=3)
        assert [b for b, _ in GS.ROUTE_COUNTS] == [backend]
        o.backward(go)
        outs.append([o.detach()] + [t.grad for t in leaves])
    for a, b in zip(*outs):
        assert rel(a, b) <= 2e-5
    assert (outs[0][0][:3] == 0).all(), "sample 0 has no keys: zero rows"
