"""Attention as public model code writes it: fused exactly, at the example's sizes and others.

Each model is captured at one size and the fused graph is then run at other
batch sizes and lengths (incl. 1): a decision read from the example's sizes
would fail here (band width, causal at length 1, a [B,1,1] gate at B = 1).
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from recopt.capture import capture
from recopt.ops import gdpa as gdpa_fn
from recopt.passes.base import PassContext
from recopt.passes.gdpa_fusion import GDPAFusion


def fuse(model, *inputs):
    """decompose_attention (opens nn.MultiheadAttention / encoders), then the gdpa pass."""
    from recopt.capture import propagate_shapes
    from recopt.passes.gdpa.decompose import DecomposeAttention

    model.eval()
    gm = capture(model, inputs).graph_module
    ctx = PassContext(target=None, example_inputs=inputs)
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        DecomposeAttention().run(gm, ctx)
        propagate_shapes(gm, inputs)
    res = GDPAFusion().run(gm, ctx)
    return res, res.graph_module


def n_gdpa(gm):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is gdpa_fn)


def gdpa_kwargs(gm):
    return [n.kwargs for n in gm.graph.nodes if n.op == "call_function" and n.target is gdpa_fn]


def check_same(model, gm, inputs, grad=True):
    torch.testing.assert_close(gm(*inputs), model(*inputs), equal_nan=True)
    if grad:
        xs = [x.clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
        ys = [x.clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
        gm(*xs).sum().backward()
        model(*ys).sum().backward()
        for a, b in zip(xs, ys):
            if a.is_floating_point():
                torch.testing.assert_close(a.grad, b.grad, equal_nan=True)


# ----------------------------------------------------------------------------- models


class CausalSelfAttention(nn.Module):
    """GPT/SASRec style: one QKV linear, heads by view/transpose, a tril mask."""

    def __init__(self, d=16, heads=2, float_mask=False, fill=float("-inf")):
        super().__init__()
        self.qkv, self.proj, self.h = nn.Linear(d, 3 * d), nn.Linear(d, d), heads
        self.float_mask, self.fill = float_mask, fill

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        if self.float_mask:
            mask = torch.tril(torch.ones((T, T), device=x.device))
            att = att.masked_fill(mask == 0, self.fill)
        else:
            mask = torch.ones((T, T), dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~mask, self.fill)
        y = F.softmax(att, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class PaddedSelfAttention(nn.Module):
    """A key padding mask from lengths, filled with -1e9 (or -inf) before softmax."""

    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, lengths):
        T = k.size(2)
        pad = torch.arange(T, device=k.device)[None, :] >= lengths[:, None]      # [B, T]
        s = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
        s = s.masked_fill(pad[:, None, None, :], self.fill)
        return torch.softmax(s, dim=-1) @ v


class HSTUBlock(nn.Module):
    """HSTU-class pointwise attention: relative bias before SiLU, causal and length masks
    built from arange, division by N, and a per-sample gate after the activation."""

    def __init__(self, d=8, heads=2, max_len=32, gate=False, div_lengths=False):
        super().__init__()
        self.uvqk = nn.Linear(d * heads, 4 * d * heads)
        self.rab = nn.Parameter(torch.randn(heads, 2 * max_len - 1) * 0.1)
        self.h, self.d, self.max_len = heads, d, max_len
        self.gate, self.div_lengths = gate, div_lengths

    def forward(self, x, lengths):
        B, N, _ = x.shape
        u, v, q, k = F.silu(self.uvqk(x)).split(self.h * self.d, dim=-1)
        q, k, v = (t.view(B, N, self.h, self.d).transpose(1, 2) for t in (q, k, v))
        pos = torch.arange(N, device=x.device)
        rel = pos[None, :] - pos[:, None] + self.max_len - 1                      # [N, N]
        bias = self.rab[:, rel]                                                   # [H, N, N]
        valid = (pos[None, :] < lengths[:, None]).float()                         # [B, N]
        causal = (pos[:, None] >= pos[None, :]).float()                           # [N, N]
        mask = causal[None, None] * valid[:, None, None, :]                       # [B,1,N,N]
        s = torch.einsum("bhnd,bhmd->bhnm", q, k) + bias[None]
        a = F.silu(s) / N * mask
        if self.gate:
            a = a * torch.sigmoid(x.mean((1, 2))).view(B, 1, 1, 1)
        if self.div_lengths:
            a = a / lengths.clamp(min=1)[:, None, None, None]
        o = (a @ v).transpose(1, 2).reshape(B, N, -1)
        return o * u


class AutoIntLayer(nn.Module):
    """AutoInt-style interacting layer: heads by torch.stack(torch.split(...)), einsum spelling."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.W_q, self.W_k, self.W_v = (nn.Parameter(torch.randn(d, d) * 0.1) for _ in range(3))
        self.h = heads

    def forward(self, x):
        q = torch.tensordot(x, self.W_q, dims=([-1], [0]))
        k = torch.tensordot(x, self.W_k, dims=([-1], [0]))
        v = torch.tensordot(x, self.W_v, dims=([-1], [0]))
        dh = q.shape[-1] // self.h
        q = torch.stack(torch.split(q, dh, dim=2))       # [h, B, F, dh]
        k = torch.stack(torch.split(k, dh, dim=2))
        v = torch.stack(torch.chunk(v, self.h, dim=2))
        s = torch.einsum("bnik,bnjk->bnij", q, k)
        a = F.softmax(s, dim=-1)
        o = torch.matmul(a, v)
        o = torch.cat(torch.split(o, 1), dim=-1).squeeze(0)
        return F.relu(o + x)


class BaddbmmAttention(nn.Module):
    """Scores via baddbmm with an additive mask as the bias input (alpha = scale)."""

    def forward(self, q, k, v, add_mask):
        s = torch.baddbmm(add_mask, q, k.transpose(1, 2), alpha=1.0 / math.sqrt(q.size(-1)))
        return torch.bmm(torch.softmax(s, dim=-1), v)


class BandSelfAttention(nn.Module):
    """A band |i - j| <= 5 built from index differences, scale after the mask."""

    def forward(self, q, k, v):
        T = q.size(2)
        i = torch.arange(T, device=q.device)
        band = (i[:, None] - i[None, :]).abs() <= 5
        s = torch.where(band, q @ k.transpose(-1, -2), 0.0) / math.sqrt(q.size(-1))
        return F.gelu(s) @ v


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("float_mask", [False, True])
def test_causal_tril_masks_fused_at_every_length(float_mask):
    torch.manual_seed(0)
    model = CausalSelfAttention(float_mask=float_mask).eval()
    res, gm = fuse(model, torch.randn(2, 1, 16))            # captured at length 1
    assert [s.status for s in res.sites] == ["rewritten"], [(s.reason_code, s.reason) for s in res.sites]
    assert gdpa_kwargs(gm)[0].get("causal") is True and "attn_mask" not in gdpa_kwargs(gm)[0]
    for B, T in ((2, 1), (3, 6), (1, 9)):
        check_same(model, gm, (torch.randn(B, T, 16),))


@pytest.mark.parametrize("fill,rows", [(-1e9, "uniform"), (float("-inf"), "nan")])
def test_fully_masked_rows_through_the_pass(fill, rows):
    torch.manual_seed(1)
    model = PaddedSelfAttention(fill)
    q, k, v = (torch.randn(3, 2, 5, 4) for _ in range(3))
    lengths = torch.tensor([5, 0, 2])                       # sample 1: every key padded
    res, gm = fuse(model, q, k, v, lengths)
    assert [s.status for s in res.sites] == ["rewritten"]
    assert gdpa_kwargs(gm)[0]["masked_rows"] == rows
    check_same(model, gm, (q, k, v, lengths))
    out = gm(q, k, v, lengths)
    assert torch.isnan(out[1]).all() == (rows == "nan") and not torch.isnan(out[0]).any()


@pytest.mark.parametrize("gate,div_lengths", [(False, False), (True, False), (False, True)])
def test_hstu_block_fused_with_bias_causal_lengths(gate, div_lengths):
    torch.manual_seed(2)
    model = HSTUBlock(gate=gate, div_lengths=div_lengths).eval()
    x, lengths = torch.randn(1, 5, 16), torch.tensor([3])   # B = 1: a [B,1,1,1] gate is no scalar
    res, gm = fuse(model, x, lengths)
    assert [s.status for s in res.sites] == ["rewritten"], [(s.reason_code, s.reason) for s in res.sites]
    kw = gdpa_kwargs(gm)[0]
    assert kw["activation"] == "silu" and kw["causal"] is True and "kv_lengths" in kw and "bias" in kw
    assert res.sites[0].details["kernel"] == "default backend"   # causal/bias are in the Triton kernels
    assert "one launch with atomic fp32 dQ" in res.sites[0].details["backward"]   # chosen per call
    for B, T in ((1, 5), (3, 7), (2, 1)):
        x = torch.randn(B, T, 16)
        lengths = torch.randint(0, T + 1, (B,))
        check_same(model, gm, (x, lengths))


def test_autoint_stack_split_einsum_heads():
    torch.manual_seed(3)
    model = AutoIntLayer().eval()
    res, gm = fuse(model, torch.randn(4, 6, 16))
    assert [s.status for s in res.sites] == ["rewritten"], [(s.reason_code, s.reason) for s in res.sites]
    for B, Fn in ((4, 6), (1, 3)):
        check_same(model, gm, (torch.randn(B, Fn, 16),))


def test_baddbmm_scores_with_additive_mask():
    torch.manual_seed(4)
    model = BaddbmmAttention()
    q, k, v = torch.randn(6, 5, 8), torch.randn(6, 7, 8), torch.randn(6, 7, 4)
    m = torch.zeros(6, 5, 7).masked_fill(torch.rand(6, 5, 7) < 0.3, -1e4)
    res, gm = fuse(model, q, k, v, m)
    assert [s.status for s in res.sites] == ["rewritten"], [(s.reason_code, s.reason) for s in res.sites]
    check_same(model, gm, (q, k, v, m))


def test_band_width_is_read_from_the_construction_not_the_example():
    torch.manual_seed(5)
    model = BandSelfAttention()
    small = [torch.randn(2, 2, 3, 4) for _ in range(3)]     # length 3: every pair is within the band
    res, gm = fuse(model, *small)
    assert [s.status for s in res.sites] == ["rewritten"]
    assert gdpa_kwargs(gm)[0]["window"] == 5
    check_same(model, gm, tuple(torch.randn(2, 2, 10, 4) for _ in range(3)))


def test_sdpa_is_causal_and_mha_attn_mask():
    torch.manual_seed(6)

    class Enc(nn.Module):
        def __init__(self, batch_first):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)
            self.batch_first = batch_first

        def forward(self, x, kpm):
            T = x.size(1) if self.batch_first else x.size(0)
            causal = torch.triu(torch.ones((T, T), dtype=torch.bool, device=x.device), diagonal=1)
            y = self.mha(x, x, x, attn_mask=causal, key_padding_mask=kpm, need_weights=False)[0]
            return F.scaled_dot_product_attention(y[None], y[None], y[None], is_causal=True)[0]

    for batch_first in (True, False):
        model = Enc(batch_first).eval()
        x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
        kpm = torch.tensor([[False] * 5, [False, False, False, True, True], [True] * 5])
        res, gm = fuse(model, x, kpm)
        assert [s.status for s in res.sites] == ["rewritten", "rewritten"], \
            [(s.reason_code, s.reason) for s in res.sites]
        # sample 2 all padded. Inference (no_grad): batch_first self-attention takes the
        # module's fast path, NaN there; with grad SDPA's 0. The rewrite gives the same.
        with torch.no_grad():
            check_same(model, gm, (x, kpm), grad=False)
        check_same(model, gm, (x, kpm))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("stack", [False, True])
def test_transformer_encoder_opened_and_fused(norm_first, stack):
    from recopt.capture import propagate_shapes
    from recopt.passes.gdpa.decompose import DecomposeAttention

    torch.manual_seed(7)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True, norm_first=norm_first,
                                       activation="gelu" if stack else "relu")
    model = (nn.TransformerEncoder(layer, 2, enable_nested_tensor=False) if stack else layer)

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = model

        def forward(self, x, pad):
            T = x.size(1)
            causal = torch.triu(torch.ones((T, T), dtype=torch.bool, device=x.device), diagonal=1)
            return self.enc(x, causal, pad)

    seq = Seq().eval()
    x, pad = torch.randn(2, 5, 16), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    gm = capture(seq, (x, pad)).graph_module
    res = DecomposeAttention().run(gm, PassContext(target=None, example_inputs=(x, pad)))
    n_layers = 2 if stack else 1
    assert [s.status for s in res.sites] == ["rewritten"] * (1 + n_layers)
    assert [s.details.get("pattern") for s in res.sites[1:]] == ["mha"] * n_layers
    propagate_shapes(gm, (x, pad))
    res2 = GDPAFusion().run(gm, PassContext(target=None, example_inputs=(x, pad)))
    assert [s.status for s in res2.sites] == ["rewritten"] * (2 if stack else 1)
    for B, T in ((2, 5), (3, 2)):
        x = torch.randn(B, T, 16)
        pad = torch.zeros(B, T, dtype=torch.bool)
        pad[0, T // 2 + 1:] = True
        check_same(seq, gm, (x, pad))
    # train mode: dropout modules are kept and follow .train()
    seq.train(), gm.train()
    assert any(isinstance(m, nn.Dropout) for m in gm.modules())


def test_band_attention_pass_reads_the_band_symbolically():
    """kunlun's band_attention uses the same mask reader: width 5 from a length-3 example."""
    from recopt.passes.kunlun.window import BandAttention

    class Band(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = (t.view(B, T, 2, 4).transpose(1, 2) for t in self.qkv(x).split(8, -1))
            i = torch.arange(T, device=q.device)
            s = (q @ k.transpose(-1, -2)).masked_fill((i[:, None] - i[None, :]).abs() > 5, float("-inf"))
            return torch.softmax(s, -1) @ v

    model = Band().eval()
    small = (torch.randn(2, 3, 8),)
    gm = capture(model, small).graph_module
    res = BandAttention().run(gm, PassContext(target=None, example_inputs=small))
    assert all(s.status == "rejected" and s.reason_code == "too_short" for s in res.sites), \
        [(s.reason_code, s.reason) for s in res.sites]
    big = (torch.randn(2, 16, 8),)
    gm = capture(model, big).graph_module
    res = BandAttention().run(gm, PassContext(target=None, example_inputs=big))
    assert [s.status for s in res.sites] == ["rewritten"], [(s.reason_code, s.reason) for s in res.sites]
    torch.testing.assert_close(res.graph_module(*big), model(*big))


@pytest.mark.parametrize("kind,code", [
    ("no_diagonal", "mask_not_separable"),     # triu(diagonal=0) drops the diagonal: not causal
    ("lagged", "mask_not_separable"),          # 1 <= i - j <= 3: not a symmetric band
    ("random", "mask_not_separable"),          # data-dependent query x key mask
])
def test_mask_decoys_are_left_alone(kind, code):
    class Decoy(nn.Module):
        def forward(self, q, k, v):
            T = q.size(2)
            i = torch.arange(T, device=q.device)
            if kind == "no_diagonal":
                drop = torch.triu(torch.ones((T, T), dtype=torch.bool, device=q.device))
            elif kind == "lagged":
                d = i[:, None] - i[None, :]
                drop = (d < 1) | (d > 3)
            else:
                drop = (q[..., :1] @ k[..., :1].transpose(-1, -2)) > 0
            s = (q @ k.transpose(-1, -2)).masked_fill(drop, 0.0)
            return F.gelu(s) @ v

    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    res, gm = fuse(Decoy(), q, k, v)
    assert [(s.status, s.reason_code) for s in res.sites] == [("rejected", code)], \
        [(s.reason_code, s.reason) for s in res.sites]
    assert n_gdpa(gm) == 0


def test_additive_mask_row_of_neg_inf_stays_nan():
    """softmax(s + m) with a row of m all -inf is NaN in the model: also after fusion."""
    class Add(nn.Module):
        def forward(self, q, k, v, m):
            return torch.softmax(q @ k.transpose(-1, -2) * 0.5 + m, dim=-1) @ v

    q, k, v = (torch.randn(2, 2, 4, 8) for _ in range(3))
    m = torch.zeros(2, 1, 4, 4)
    m[1, :, 2] = float("-inf")
    m[0, :, :, 3] = -1e9
    res, gm = fuse(Add(), q, k, v, m)
    assert [s.status for s in res.sites] == ["rewritten"]
    check_same(Add(), gm, (q, k, v, m), grad=False)
    assert torch.isnan(gm(q, k, v, m)[1, :, 2]).all()
