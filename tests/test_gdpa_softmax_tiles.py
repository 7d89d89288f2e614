"""The softmax GDPA kernels do no work past the lengths (CPU, TRITON_INTERPRET=1).

White-box: under the interpreter the per-tile helpers of recopt.kernels.gdpa_softmax are
plain Python called through the module's globals, so a wrapper records every tile a
kernel visits. For every (sample, head, query block, key block) the test checks that

- no tile starts past the key length (forward, dQ) or query length (dK/dV), and no
  query block past the query length (dK/dV: no key block past the key length) runs;
- exactly the tiles that hold a kept score run (causal: tiles fully above the
  diagonal are skipped);
- only tiles that cross a length (or the causal diagonal) carry masks; interior tiles
  run the mask-free code;

and, separately, that values past the lengths cannot leak: Q, K, V and dO are NaN there
and outputs and gradients still equal the reference (lengths 0, 1, T, non-powers of 2).
"""
import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("the tile trace needs TRITON_INTERPRET=1 (the kernels as Python)", allow_module_level=True)

import recopt.kernels.gdpa_softmax as K  # noqa: E402
from recopt.ops import _gdpa_softmax_triton as S  # noqa: E402
from recopt.ops import gdpa  # noqa: E402

from triton_test_helpers import rand  # noqa: E402

BM = BN = 16   # the interpreter's tiles (S.fwd_config / S.bwd_config under TRITON_INTERPRET)


def _val(x):
    """A scalar argument of an interpreted kernel (tl tensor or Python int) as an int."""
    h = getattr(x, "handle", None)
    return int(h.data.reshape(-1)[0]) if h is not None else int(x)


def _first(x):
    return int(x.handle.data.reshape(-1)[0])


def _trace(monkeypatch):
    """Record (kind, q_start, k_start, q_len, k_len, masked, mask_pos) of every tile visited."""
    calls = []

    def wrap(name, kind, pick):
        orig = getattr(K, name)

        def tile(*args):
            calls.append((kind,) + pick(args))
            return orig(*args)
        monkeypatch.setattr(K, name, tile)

    # _fwd_tile(acc, m, l, q, k_base, v_base, bias_base, offs_m, start_n, offs_n, offs_d, offs_dv,
    #           q_len, k_len, ..., MASKED)
    wrap("_fwd_tile", "fwd", lambda a: (_first(a[7]), _val(a[8]), _val(a[12]), _val(a[13]), a[-1], a[-1]))
    # _dkdv_tile(dk, dv, k, v, q_base, do_base, st_base, bias_base, offs_n, start_m, offs_m, offs_d,
    #            offs_dv, q_len, k_len, ..., MASKED, MASK_POS, OUT_DK, OUT_DV)
    wrap("_dkdv_tile", "dkdv", lambda a: (_val(a[9]), _first(a[8]), _val(a[13]), _val(a[14]), a[-4], a[-3]))
    # _dq_tile(dq, q, do, m, l_inv, delta, k_base, v_base, bias_base, offs_m, start_n, offs_n, offs_d,
    #          offs_dv, q_len, k_len, ..., MASKED)
    wrap("_dq_tile", "dq", lambda a: (_first(a[9]), _val(a[10]), _val(a[14]), _val(a[15]), a[-1], a[-1]))
    return calls


def _kept(q_lens, k_lens, heads, causal, window):
    """The (q_start, k_start, q_len, k_len) tiles holding at least one kept score (brute force)."""
    want = []
    for ql, kl in zip(q_lens, k_lens):
        i = torch.arange(ql)[:, None]
        j = torch.arange(kl)[None, :]
        keep = torch.ones(ql, kl, dtype=torch.bool)
        if causal:
            keep &= j <= i
        if window is not None:
            keep &= (i - j).abs() <= window
        for m in range(0, ql, BM):
            for n in range(0, kl, BN):
                if keep[m:m + BM, n:n + BN].any():
                    want += [(m, n, ql, kl)] * heads
    return sorted(want)


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 20)])
def test_tiles_stop_at_the_lengths(monkeypatch, causal, window):
    """Two query heads on one K/V head: dK/dV walks (head, tile) pairs of the group."""
    B, H, Tq, Tk, d = 5, 2, 40, 50, 16
    q_lens, k_lens = [0, 1, 40, 33, 17], [50, 1, 0, 32, 45]
    q, k, v = rand((B, H, Tq, d), torch.float32, 1), rand((B, 1, Tk, d), torch.float32, 2), \
        rand((B, 1, Tk, d), torch.float32, 3)
    ql, kl = torch.tensor(q_lens), torch.tensor(k_lens)
    kw = dict(qk_scale=1.0, pre_scale=0.25, q_lengths=ql, kv_lengths=kl, causal=causal,
              window=-1 if window is None else window)
    calls = _trace(monkeypatch)
    o, m, l_inv = S.softmax_fwd(q, k, v, **kw)
    S.softmax_bwd(rand(o.shape, torch.float32, 4), q, k, v, o, m, l_inv, **kw)
    want = _kept(q_lens, k_lens, H, causal, window)
    for kind in ("fwd", "dkdv", "dq"):
        got = [c[1:] for c in calls if c[0] == kind]
        assert sorted(t[:4] for t in got) == want, f"{kind}: the tiles visited are not the kept ones"
        for qs, ks, qlen, klen, masked, mask_pos in got:
            # a tile runs mask-free only when inside the lengths and fully kept; without a window
            # (whose tiles all take the mask) every such tile does
            inside = qs + BM <= qlen if kind == "dkdv" else ks + BN <= klen
            full = not (causal and ks + BN - 1 > qs) and window is None
            if kind == "dkdv":
                assert bool(mask_pos) == (not full), (kind, qs, ks, qlen, klen)
            assert bool(masked) == (not (inside and full)), (kind, qs, ks, qlen, klen)


def _poison(t, lens, dim):
    """t with NaN at positions >= lens[b] along ``dim`` (a sequence dim of a [B, ...] tensor)."""
    t = t.clone()
    for b, n in enumerate(lens):
        t[b].narrow(dim - 1, n, t.shape[dim] - n).fill_(float("nan"))
    return t


@pytest.mark.parametrize("dtype,causal", [(torch.float32, False), (torch.bfloat16, True)])
def test_values_past_the_lengths_never_leak(monkeypatch, dtype, causal):
    """NaN in Q/K/V/dO past the lengths (padding a caller need not clear) changes nothing:
    outputs and gradients equal the reference run on clean inputs, rows past q_len are 0."""
    B, H, Tq, Tk, d = 4, 2, 35, 37, 24
    q_lens, k_lens = [35, 0, 1, 18], [5, 37, 20, 0]
    q, k, v = rand((B, H, Tq, d), dtype, 5), rand((B, 1, Tk, d), dtype, 6), rand((B, 1, Tk, d), dtype, 7)
    go = rand((B, H, Tq, d), dtype, 8)
    ql, kl = torch.tensor(q_lens), torch.tensor(k_lens)
    kw = dict(qk_scale=0.8, pre_scale=1 / math.sqrt(d), q_lengths=ql, kv_lengths=kl, causal=causal)

    def run(backend, q, k, v, go):
        monkeypatch.setenv("RECOPT_GDPA_BACKEND", backend)
        cast = (lambda t: t.float()) if backend == "reference" else (lambda t: t)
        leaves = [cast(t).clone().requires_grad_() for t in (q, k, v)]
        o = gdpa(*leaves, activation="softmax", **kw)
        o.backward(cast(go))
        return [o.detach()] + [t.grad for t in leaves]

    got = run("triton", _poison(q, q_lens, 2), _poison(k, k_lens, 2), _poison(v, k_lens, 2),
              _poison(go, q_lens, 2))
    want = run("reference", q, k, v, go)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for name, a, b, lens in zip(("o", "dq", "dk", "dv"), got, want, (q_lens, q_lens, k_lens, k_lens)):
        # the valid rows of every sample together (a sample with one key has dq == 0 exactly,
        # where a per-sample relative error would measure rounding noise)
        a_in = torch.cat([a[s, :, :n].reshape(-1) for s, n in enumerate(lens)]).double()
        b_in = torch.cat([b[s, :, :n].reshape(-1) for s, n in enumerate(lens)]).double()
        assert not a_in.isnan().any(), f"{name}: NaN from the padding leaked into a valid row"
        err = ((a_in - b_in).norm() / b_in.norm().clamp_min(1e-12)).item()
        assert err <= tol, f"{name}: rel err {err:.2e}"
    assert (got[0][0, :, 35:] == 0).all() and (got[0][1] == 0).all(), "rows past q_len are zeros"
