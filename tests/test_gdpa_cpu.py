"""The lean CPU path of GDPA (recopt.ops.gdpa_cpu): same values and gradients as the
reference, no custom-op dispatch on the CPU, and the custom op where it must stay."""
import pytest
import torch

from recopt.ops import gdpa, gdpa_jagged
from recopt.ops import gdpa_cpu as C
from recopt.ops import gdpa_ref as R
from recopt.ops.gdpa_site import specialize

ACTS = sorted(R.ACTIVATIONS)


def _rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed + 7 * sum(shape))
    return (torch.randn(*shape, generator=g, dtype=torch.float64) + 0.1).to(dtype)


def _grads(fn, tensors, go):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(go)
    return out.detach(), [t.grad for t in leaves]


def _uses_custom_op(out: torch.Tensor) -> bool:
    """Walk the autograd graph: does any node come from recopt's custom op?"""
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "CppFunction" in type(fn).__name__ or "Generated" in type(fn).__name__ or "recopt" in fn.name():
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", ["plain", "lengths", "window_gqa"])
def test_lean_matches_reference_values_and_gradients(act, case, monkeypatch):
    monkeypatch.delenv(C.BACKEND_ENV, raising=False)
    B, H, Hkv, Tq, Tk, d, dv = 3, 4, 4, 7, 5, 6, 3  # non-power-of-2 lengths
    kw = dict(qk_scale=0.7, pre_scale=0.4)
    if case == "lengths":
        kw.update(q_lengths=torch.tensor([0, 1, 7]), kv_lengths=torch.tensor([1, 0, 5]))  # empty rows, all-masked rows
    if case == "window_gqa":
        Hkv = 2
        kw.update(window=1, kv_lengths=torch.tensor([5, 2, 3]))
    q, k, v = _rand(B, H, Tq, d), _rand(B, Hkv, Tk, d, seed=1), _rand(B, Hkv, Tk, dv, seed=2)
    go = _rand(B, H, Tq, dv, seed=3)
    ref_kw = dict(q_lengths=kw.get("q_lengths"), kv_lengths=kw.get("kv_lengths"), activation=act,
                  qk_scale=kw["qk_scale"], pre_scale=kw["pre_scale"], window=kw.get("window", -1))
    want, want_g = _grads(lambda a, b, c: R.gdpa_ref(a, b, c, **ref_kw), (q, k, v), go)
    got, got_g = _grads(lambda a, b, c: gdpa(a, b, c, activation=act, **kw), (q, k, v), go)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    if case == "lengths":
        assert (got[0] == 0).all() and (got[1, :, 1:] == 0).all()


def test_lean_path_skips_the_custom_op_on_cpu(monkeypatch):
    monkeypatch.delenv(C.BACKEND_ENV, raising=False)
    q, k, v = (_rand(2, 2, 5, 4, seed=s).requires_grad_() for s in range(3))
    assert C.use_lean(q)
    assert not _uses_custom_op(gdpa(q, k, v, activation="gelu_tanh"))
    monkeypatch.setenv(C.BACKEND_ENV, "reference")  # forcing a backend keeps the custom op
    assert not C.use_lean(q)
    assert _uses_custom_op(gdpa(q, k, v, activation="gelu_tanh"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lean_low_precision_matches_reference(dtype, monkeypatch):
    """fp32 scores and activation, p cast to v.dtype: the reference's precision contract."""
    monkeypatch.delenv(C.BACKEND_ENV, raising=False)
    q, k, v = (_rand(2, 2, 9, 8, dtype=dtype, seed=s) for s in range(3))
    got = gdpa(q, k, v, activation="silu", pre_scale=0.3, kv_lengths=torch.tensor([9, 4]))
    want = R.gdpa_ref(q, k, v, None, torch.tensor([9, 4]), "silu", 1.0, 0.3, -1)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_lean_broadcast_and_length_one(monkeypatch):
    monkeypatch.delenv(C.BACKEND_ENV, raising=False)
    q = _rand(3, 1, 4)  # one query shared by the batch
    k, v = _rand(5, 3, 1, 4, seed=1), _rand(5, 3, 1, 2, seed=2)  # Tk = 1
    got = gdpa(q, k, v, activation="relu", broadcast_q=True)
    want = R.gdpa_ref(q.unsqueeze(0).expand(5, -1, -1, -1), k, v, activation="relu")
    torch.testing.assert_close(got, want)


def test_lean_jagged_matches_reference(monkeypatch):
    monkeypatch.delenv(C.BACKEND_ENV, raising=False)
    lengths = [3, 0, 1, 5]
    off = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(lengths).cumsum(0)])
    N = int(off[-1])
    q, k, v = _rand(N, 2, 4), _rand(N, 2, 4, seed=1), _rand(N, 2, 3, seed=2)
    go = _rand(N, 2, 3, seed=3)
    want, want_g = _grads(lambda a, b, c: R.gdpa_jagged_ref(a, b, c, off, off, 5, 5, "gelu", 1.0, 0.5, -1),
                          (q, k, v), go)
    got, got_g = _grads(lambda a, b, c: gdpa_jagged(a, b, c, off, off, 5, 5, activation="gelu", pre_scale=0.5),
                        (q, k, v), go)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w)


def test_export_keeps_the_custom_op(monkeypatch):
    """torch.export must see recopt::gdpa (ONNX export wraps it into one recopt::GDPA function)."""
    monkeypatch.delenv(C.BACKEND_ENV, raising=False)

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return gdpa(q, k, v, activation="silu")

    args = tuple(torch.randn(2, 2, 5, 4) for _ in range(3))
    ep = torch.export.export(M(), args)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "recopt.gdpa.default" in targets, targets


SITE_CASES = {
    # name: (const kwargs, q/k/v shapes, tensor kwargs factory)
    "pointwise": (dict(activation="gelu_tanh", pre_scale=0.5), ((3, 2, 5, 4), (3, 2, 7, 4), (3, 2, 7, 3)), dict),
    "pointwise_lengths_window": (dict(activation="swish", window=1, qk_scale=0.3),
                                 ((3, 2, 5, 4), (3, 2, 5, 4), (3, 2, 5, 3)),
                                 lambda: dict(q_lengths=torch.tensor([0, 1, 5]), kv_lengths=torch.tensor([2, 0, 5]))),
    "pointwise_gqa": (dict(activation="relu"), ((2, 4, 3, 4), (2, 2, 6, 4), (2, 2, 6, 5)), dict),
    "pointwise_q_one_head": (dict(activation="raw"), ((2, 1, 3, 4), (2, 2, 6, 4), (2, 2, 6, 5)), dict),
    "pointwise_batch_broadcast": (dict(activation="silu"), ((1, 2, 3, 4), (4, 2, 6, 4), (4, 2, 6, 5)), dict),
    "softmax_float_mask": (dict(activation="softmax", pre_scale=0.25, qk_scale=2.0),
                           ((3, 2, 5, 4), (3, 2, 7, 4), (3, 2, 7, 4)),
                           lambda: dict(attn_mask=torch.zeros(3, 1, 1, 7).masked_fill(torch.arange(7) >= 3, -1e9))),
    "softmax_bool_mask": (dict(activation="softmax"), ((3, 2, 5, 4), (3, 2, 7, 4), (3, 2, 7, 4)),
                          lambda: dict(attn_mask=(torch.arange(7) < 3)[None, None, None])),
    "softmax_lengths": (dict(activation="softmax", window=2), ((3, 2, 5, 4), (3, 2, 5, 4), (3, 2, 5, 4)),
                        lambda: dict(kv_lengths=torch.tensor([0, 1, 4]))),
    "softmax_no_mask": (dict(activation="softmax"), ((2, 2, 1, 4), (2, 2, 1, 4), (2, 2, 1, 4)), dict),
}


@pytest.mark.parametrize("name", sorted(SITE_CASES))
def test_specialised_site_equals_generic_gdpa(name, monkeypatch):
    """The per-site function of the lean forward gives gdpa()'s values and gradients, on the
    shapes it serves itself and on those it hands back to the generic call."""
    monkeypatch.delenv(C.BACKEND_ENV, raising=False)
    const, shapes, tensors = SITE_CASES[name]
    site = specialize(const)
    assert site is not None
    q, k, v = (_rand(*s, seed=i) for i, s in enumerate(shapes))
    tk = tensors()
    go = None
    want, want_g = None, None
    for fn in (lambda a, b, c: gdpa(a, b, c, **const, **tk), lambda a, b, c: site(a, b, c, **tk)):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        go = _rand(*out.shape, seed=9) if go is None else go
        out.backward(go)
        if want is None:
            want, want_g = out.detach(), [t.grad for t in leaves]
        else:
            torch.testing.assert_close(out.detach(), want, rtol=1e-12, atol=1e-12)
            for g, w in zip((t.grad for t in leaves), want_g):
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_specialise_declines_non_constant_options_and_respects_forced_backend(monkeypatch):
    assert specialize(dict(activation="silu", broadcast_q=True)) is None
    assert specialize(dict(activation="silu"), dynamic=["bias"]) is None  # an option it does not serve
    assert specialize(dict(activation="silu", qk_scale=torch.tensor(2.0))) is None
    with pytest.raises(ValueError, match="unknown GDPA activation"):
        specialize(dict(activation="nope"))
    site = specialize(dict(activation="gelu"))
    q, k, v = (_rand(2, 2, 4, 4, seed=s).requires_grad_() for s in range(3))
    monkeypatch.setenv(C.BACKEND_ENV, "reference")
    assert _uses_custom_op(site(q, k, v))  # a forced backend goes through the generic op
    monkeypatch.delenv(C.BACKEND_ENV)
    assert not _uses_custom_op(site(q, k, v))
