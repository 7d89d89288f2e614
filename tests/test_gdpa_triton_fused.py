"""The one-launch GDPA backward (atomic dQ), its per-call choice, and dbias only when needed.

Interpreter (TRITON_INTERPRET=1) vs the reference backward (``gdpa_bwd_ref`` /
autograd through ``gdpa_ref``), random inputs, on every variant the two-launch
backward serves: lengths (0 and 1), jagged, causal (with offsets), window, every
bias broadcast, GQA, broadcast q, fp32 (exact path) and bf16 (fast math), head
sizes equal to the block (EVEN_D) and not powers of two. Gradient buffers are
NaN-poisoned so every element must be written.
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

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _fused_vs_ref(q, k, v, go, bias=None, **kw):
    """Run the fused backward into NaN buffers; compare with the fp32 reference backward."""
    want = R.gdpa_bwd_ref(go.float(), q.float(), k.float(), v.float(), kw.get("q_lengths"),
                          kw.get("kv_lengths"), kw["activation"], kw["qk_scale"], kw["pre_scale"],
                          kw["window"], kw.get("causal", False),
                          bias.float() if bias is not None else None)
    grads = (_nan(q.shape, q.dtype), _nan(k.shape, k.dtype), _nan(v.shape, v.dtype))
    got = T.gdpa_bwd(go, q, k, v, bias=bias, bias_grad=bias is not None, out=grads, kernel="fused", **kw)
    n = 4 if bias is not None else 3
    for name, g, w in zip(("dq", "dk", "dv", "dbias")[:n], got, want):
        assert g.shape == w.shape, name
        assert rel(g, w) <= TOL[q.dtype], name
    return got


@pytest.mark.parametrize("act,dtype,window,causal", [
    ("gelu", torch.float32, -1, False),
    ("silu", torch.bfloat16, 3, False),
    ("gelu_tanh", torch.bfloat16, -1, True),
    ("relu_square", torch.float32, 4, True),
    ("hardswish", torch.float32, -1, False),
], ids=lambda x: str(x).replace("torch.", ""))
def test_fused_dense_gqa_lengths(act, dtype, window, causal):
    """GQA (4 query heads on 2 K/V heads), lengths 0 and 1, Tq != Tk, d and dv not powers of 2."""
    B, H, Hkv, Tq, Tk, d, dv = 3, 4, 2, 19, 23, 12, 10
    q, k, v = _rand((B, H, Tq, d), dtype, 1), _rand((B, Hkv, Tk, d), dtype, 2), _rand((B, Hkv, Tk, dv), dtype, 3)
    go = _rand((B, H, Tq, dv), dtype, 4)
    kw = dict(activation=act, qk_scale=0.8, pre_scale=0.35, window=window, causal=causal,
              q_lengths=torch.tensor([0, 1, 19], device=DEVICE), kv_lengths=torch.tensor([5, 23, 1], device=DEVICE))
    dq, dk, dv_ = _fused_vs_ref(q, k, v, go, **kw)
    assert (dq[0] == 0).all() and (dq[1, :, 1:] == 0).all(), "rows past q_lengths: zero dQ"


@pytest.mark.parametrize("causal_offset", [-3, 5])
def test_fused_causal_offset_even_d(causal_offset):
    """d == BLOCK_D (16): interior tiles load without predicates and add dQ unmasked."""
    B, H, Tq, Tk, d = 2, 2, 37, 29, 16
    q, k, v = _rand((B, H, Tq, d), torch.float32, 5), _rand((B, H, Tk, d), torch.float32, 6), \
        _rand((B, H, Tk, d), torch.float32, 7)
    go = _rand((B, H, Tq, d), torch.float32, 8)
    kw = dict(activation="gelu", qk_scale=0.7, pre_scale=0.3, window=-1, causal=True,
              causal_offset=causal_offset, kv_lengths=torch.tensor([29, 1], device=DEVICE))
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    # the reference op has no causal offset: mask by hand (row i keeps keys j <= i + offset)
    i = torch.arange(Tq)[:, None]
    j = torch.arange(Tk)[None, :]
    keep = (j <= i + causal_offset) & (j[None] < kw["kv_lengths"].view(-1, 1, 1))
    s = torch.where(keep[:, None], qq @ kk.transpose(-1, -2) * 0.3, 0.0)
    (R.act_fwd(s, "gelu") * 0.7 @ vv).backward(go)
    grads = (_nan(q.shape, q.dtype), _nan(k.shape, k.dtype), _nan(v.shape, v.dtype))
    T.gdpa_bwd(go, q, k, v, out=grads, kernel="fused", **kw)
    for g, w in zip(grads, (qq.grad, kk.grad, vv.grad)):
        assert rel(g, w) <= 1e-4


@pytest.mark.parametrize("bias_shape", [(2, 4, 21, 18), (1, 4, 21, 18), (2, 1, 1, 18), (1, 1, 21, 1),
                                        (1, 1, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_fused_dbias_every_broadcast(bias_shape):
    """Full-shape bias: dbias stored (each element once, GQA included); broadcast: atomics,
    summed over broadcast query / key axes inside the tile first."""
    q, k, v = _rand((2, 4, 21, 12), torch.float32, 1), _rand((2, 2, 18, 12), torch.float32, 2), \
        _rand((2, 2, 18, 12), torch.float32, 3)
    bias = _rand(bias_shape, torch.float32, 4)
    go = _rand((2, 4, 21, 12), torch.float32, 5)
    kw = dict(activation="gelu", qk_scale=0.7, pre_scale=0.35, window=-1, causal=True,
              q_lengths=torch.tensor([21, 1], device=DEVICE), kv_lengths=torch.tensor([7, 18], device=DEVICE))
    got = _fused_vs_ref(q, k, v, go, bias=bias, **kw)
    assert got[3].dtype == bias.dtype
    if bias_shape == (2, 4, 21, 18):
        assert (got[3].triu(1) == 0).all(), "the skipped causal triangle must be exact zeros"


def test_fused_dbias_bf16_window_causal():
    b, h, tq, tk, d = 3, 2, 33, 17, 20
    q, k, v = _rand((b, h, tq, d), torch.bfloat16, 6), _rand((b, h, tk, d), torch.bfloat16, 7), \
        _rand((b, h, tk, d), torch.bfloat16, 8)
    bias = _rand((1, h, tq, tk), torch.bfloat16, 9)
    go = _rand((b, h, tq, d), torch.bfloat16, 10)
    _fused_vs_ref(q, k, v, go, bias=bias, activation="silu", qk_scale=1.2, pre_scale=0.3, window=5, causal=True,
                  q_lengths=torch.tensor([33, 1, 0], device=DEVICE), kv_lengths=torch.tensor([17, 1, 5], device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_jagged(dtype):
    lq, lk = [0, 1, 9, 21], [6, 0, 1, 17]      # empty and length-1 sequences
    H, Hkv, d, dv = 2, 1, 20, 8
    qo = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), device=DEVICE)
    ko = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), device=DEVICE, dtype=torch.int32)
    q, k, v = _rand((sum(lq), H, d), dtype, 5), _rand((sum(lk), Hkv, d), dtype, 6), \
        _rand((sum(lk), Hkv, dv), dtype, 7)
    go = _rand((sum(lq), H, dv), dtype, 8)
    kw = dict(activation="gelu_tanh", qk_scale=1.3, pre_scale=0.25, window=4)
    qq, kk, vv = (t.float().requires_grad_() for t in (q, k, v))
    R.gdpa_jagged_ref(qq, kk, vv, qo, ko, max(lq), max(lk), **kw).backward(go.float())
    grads = (_nan(q.shape, dtype), _nan(k.shape, dtype), _nan(v.shape, dtype))
    T.gdpa_bwd(go, q, k, v, q_offsets=qo, kv_offsets=ko, max_seq_len_q=max(lq), max_seq_len_kv=max(lk),
               out=grads, kernel="fused", **kw)
    for g, w in zip(grads, (qq.grad, kk.grad, vv.grad)):
        assert rel(g, w) <= TOL[dtype]


def test_fused_broadcast_q_and_tiny_lengths():
    """A stride-0 query shared by the batch (dQ per sample, summed by autograd), and Tq = 1,
    Tk = 1, Tq = 0, Tk = 0."""
    qs = _rand((1, 2, 5, 8), torch.float32, 1).expand(3, -1, -1, -1)
    k, v = _rand((3, 2, 9, 8), torch.float32, 2), _rand((3, 2, 9, 8), torch.float32, 3)
    go = _rand((3, 2, 5, 8), torch.float32, 4)
    _fused_vs_ref(qs, k, v, go, activation="silu", qk_scale=1.0, pre_scale=0.5, window=-1)
    for tq, tk in ((1, 1), (0, 3), (2, 0)):
        q, k, v = _rand((2, 1, tq, 8), torch.float32, 1), _rand((2, 1, tk, 8), torch.float32, 2), \
            _rand((2, 1, tk, 8), torch.float32, 3)
        bias = _rand((2, 1, tq, tk), torch.float32, 4)
        go = _rand((2, 1, tq, 8), torch.float32, 5)
        got = T.gdpa_bwd(go, q, k, v, activation="silu", qk_scale=1.0, pre_scale=1.0, window=-1, causal=True,
                         bias=bias, bias_grad=True, kernel="fused")
        want = R.gdpa_bwd_ref(go, q, k, v, activation="silu", causal=True, bias=bias)
        for g, w in zip(got, want):
            assert g.shape == w.shape and torch.allclose(g, w, atol=1e-5), (tq, tk)


def test_fused_and_two_launch_agree_bf16():
    """The two backwards on the same bf16 inputs: dK, dV bit-identical (same tiles, same
    order), dQ within bf16 rounding (fp32 atomics vs one accumulator)."""
    q, k, v = _rand((2, 2, 40, 32), torch.bfloat16, 1), _rand((2, 2, 35, 32), torch.bfloat16, 2), \
        _rand((2, 2, 35, 32), torch.bfloat16, 3)
    go = _rand((2, 2, 40, 32), torch.bfloat16, 4)
    kw = dict(activation="gelu", qk_scale=0.9, pre_scale=0.2, window=-1)
    a = T.gdpa_bwd(go, q, k, v, kernel="fused", **kw)
    b = T.gdpa_bwd(go, q, k, v, kernel="two_launch", **kw)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert rel(a[0], b[0].float()) <= 1e-2


# ----------------------------------------------------------------------------- the choice


def test_choice_deterministic_and_forced(monkeypatch):
    monkeypatch.delenv(T.BACKWARD_ENV, raising=False)
    big = dict(t_q=1000, t_k=256, d=128, dv=128, nb=1152, h=4, hkv=4, dtype=torch.bfloat16)
    assert T.bwd_choice(**big, deterministic=False)[0] == "fused"
    fp32 = T.bwd_choice(**{**big, "dtype": torch.float32}, deterministic=False)
    assert fp32[0] == "two_launch" and "fp32" in fp32[1]
    kern, why = T.bwd_choice(**big, deterministic=True)
    assert kern == "two_launch" and "deterministic" in why
    monkeypatch.setenv(T.BACKWARD_ENV, "two_launch")
    assert T.bwd_choice(**big, deterministic=False) == ("two_launch", f"{T.BACKWARD_ENV}=two_launch")
    monkeypatch.setenv(T.BACKWARD_ENV, "fused")
    with pytest.raises(RuntimeError, match="deterministic"):
        T.bwd_choice(**big, deterministic=True)
    monkeypatch.setenv(T.BACKWARD_ENV, "bogus")
    with pytest.raises(ValueError, match="use auto, fused or two_launch"):
        T.bwd_choice(**big, deterministic=False)


def test_choice_keeps_two_launches_for_a_tiny_one_launch_grid(monkeypatch):
    """Tiny Tk with one sample and head: the one-launch grid is a single program walking all
    of Tq, while the dQ kernel spreads Tq over many; the wave model keeps two launches. The
    same Tk with a large batch fills the GPU and takes the one launch."""
    monkeypatch.delenv(T.BACKWARD_ENV, raising=False)
    monkeypatch.setattr(T, "interpreting", lambda: False)   # the GPU configs
    small = T.bwd_choice(4096, 16, 64, 64, 1, 1, 1, torch.bfloat16, deterministic=False)
    assert small[0] == "two_launch" and "one-launch grid is small" in small[1]
    assert T.bwd_choice(4096, 16, 64, 64, 512, 4, 4, torch.bfloat16, deterministic=False)[0] == "fused"


def test_op_backward_counts_the_choice_and_honours_determinism(monkeypatch):
    from recopt.ops import gdpa
    monkeypatch.setenv("RECOPT_GDPA_BACKEND", "triton")
    monkeypatch.setenv(T.BACKWARD_ENV, "fused")
    q, k, v = (_rand((2, 2, 9, 8), torch.float32, s).requires_grad_() for s in (1, 2, 3))
    T.BACKWARD_COUNTS.clear()
    gdpa(q, k, v, activation="gelu").sum().backward()
    assert list(T.BACKWARD_COUNTS) == [("fused", f"{T.BACKWARD_ENV}=fused")]
    monkeypatch.delenv(T.BACKWARD_ENV)
    T.BACKWARD_COUNTS.clear()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        gdpa(q, k, v, activation="gelu").sum().backward()
        with pytest.raises(RuntimeError, match="not deterministic"):
            T.gdpa_bwd(q, q, k, v, activation="gelu", qk_scale=1.0, pre_scale=1.0, window=-1, kernel="fused")
    finally:
        torch.use_deterministic_algorithms(before)
    [(kern, why)] = T.BACKWARD_COUNTS
    assert kern == "two_launch" and "deterministic" in why


# ----------------------------------------------------------------------------- dbias only when needed


def _record_launches(monkeypatch):
    """Record (kernel name, constexpr kwargs) of every Triton launch of the GDPA launcher."""
    launches = []
    real = T.wrap_triton

    def spy(kernel):
        launcher = real(kernel)

        class _Grid:
            def __getitem__(self, grid):
                run = launcher[grid]

                def call(*args, **kw):
                    launches.append((kernel.fn.__name__, kw))
                    return run(*args, **kw)
                return call
        return _Grid()

    monkeypatch.setattr(T, "wrap_triton", spy)
    return launches


@pytest.mark.parametrize("kernel", ["fused", "two_launch"])
def test_no_dbias_when_the_bias_needs_no_grad(monkeypatch, kernel):
    """A bias without requires_grad: every backward launch has DBIAS=0 and no dbias is
    returned; with requires_grad the launch that computes dS has DBIAS != 0 and every
    gradient matches the reference."""
    from recopt.ops import gdpa
    monkeypatch.setenv("RECOPT_GDPA_BACKEND", "triton")
    monkeypatch.setenv(T.BACKWARD_ENV, kernel)
    launches = _record_launches(monkeypatch)
    q0, k0, v0 = _rand((2, 2, 9, 8), torch.float32, 1), _rand((2, 2, 7, 8), torch.float32, 2), \
        _rand((2, 2, 7, 8), torch.float32, 3)
    b0 = _rand((1, 2, 9, 7), torch.float32, 4)
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    o = gdpa(q, k, v, activation="gelu", pre_scale=0.5, causal=True, bias=b0)
    o.backward(torch.ones_like(o))
    bwd = [kw for name, kw in launches if "bwd" in name]
    assert bwd and all(kw.get("DBIAS", 0) == 0 for kw in bwd), bwd
    want = R.gdpa_bwd_ref(torch.ones_like(o), q0, k0, v0, activation="gelu", pre_scale=0.5, causal=True, bias=b0)
    for t, w in zip((q, k, v), want):
        assert rel(t.grad, w) <= 1e-4
    launches.clear()
    q, k, v, b = (t.clone().requires_grad_() for t in (q0, k0, v0, b0))
    o = gdpa(q, k, v, activation="gelu", pre_scale=0.5, causal=True, bias=b)
    o.backward(torch.ones_like(o))
    assert any(kw.get("DBIAS", 0) == 2 for name, kw in launches if "bwd" in name)
    for t, w in zip((q, k, v, b), want):
        assert rel(t.grad, w) <= 1e-4
