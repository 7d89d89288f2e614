"""band_attention / sliding_window on the one attention matcher, on hand-written models.

Spellings the window passes now read through :mod:`recopt.graph.attention`
(einsum heads, additive / where / masked_fill masks, scale before or after the
mask, shape-derived scales, pointwise activations), decoys left alone with a
reason, and the band width read from the graph, never from the example.
"""
import math

import pytest
import torch
import torch.nn as nn

from recopt.capture import capture
from recopt.passes.base import PassContext
from recopt.ops.local_attention import local_attention
from recopt.passes.kunlun.window import BandAttention, SlidingWindow


class SelfAttn(nn.Module):
    """``spelling``: how the band is applied; ``w``: its half width (None: no band)."""

    def __init__(self, spelling="masked_fill", w=2, act="softmax", einsum=False, pad=False, fill=-1e9):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.spelling, self.w, self.act, self.einsum, self.pad, self.fill = spelling, w, act, einsum, pad, fill

    def forward(self, x, keep):
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, 2, 4).transpose(1, 2) for t in self.qkv(x).split(8, -1))
        if self.einsum:
            s = torch.einsum("bhid,bhjd->bhij", q, k)
        else:
            s = q @ k.transpose(-2, -1)
        s = s / math.sqrt(q.size(-1))
        i = torch.arange(T, device=x.device)
        band = (i[:, None] - i[None, :]).abs() <= self.w if self.w is not None else None
        m = band
        if self.pad:
            m = keep[:, None, None, :] if m is None else m & keep[:, None, None, :]
        if m is not None:
            if self.spelling == "masked_fill":
                s = s.masked_fill(~m, self.fill)
            elif self.spelling == "where":
                s = torch.where(m, s, torch.tensor(self.fill))
            elif self.spelling == "additive":
                s = s + torch.where(m, 0.0, self.fill)
        p = torch.softmax(s, -1) if self.act == "softmax" else torch.nn.functional.silu(s) / T
        o = p @ v
        return o.transpose(1, 2).flatten(2)


def _inputs(B=2, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[0, T - 3:] = False
    return torch.randn(B, T, 8, generator=g), keep


def _run(pass_cls, model, inputs, **cfg):
    model.eval()
    gm = capture(model, inputs).graph_module
    res = pass_cls(pass_cls.config_cls(**cfg)).run(gm, PassContext(target=None, example_inputs=inputs))
    return res.graph_module, res.sites


def _n_local(gm):
    return sum(n.target is local_attention for n in gm.graph.nodes)


@pytest.mark.parametrize("spelling,pad,einsum,act,fill", [
    ("masked_fill", False, False, "softmax", -1e9),
    ("where", True, False, "softmax", -1e9),
    ("additive", True, True, "softmax", -1e9),       # what the bundled models write, einsum scores
    ("masked_fill", False, True, "softmax", float("-inf")),
    ("masked_fill", True, False, "silu", 0.0),      # pointwise: zero masking
])
def test_band_is_fused_exactly_for_every_spelling(spelling, pad, einsum, act, fill):
    torch.manual_seed(1)
    model = SelfAttn(spelling, 2, act, einsum, pad, fill)
    inputs = _inputs()
    gm, sites = _run(BandAttention, model, inputs)
    assert [s.status for s in sites] == ["rewritten"], [(s.reason_code, s.reason) for s in sites]
    assert sites[0].details["window"] == 2 and _n_local(gm) == 1
    for B, T in ((2, 12), (1, 9), (3, 20)):        # other lengths than the example
        x, keep = _inputs(B, T, seed=T)
        torch.testing.assert_close(gm(x, keep), model(x, keep), rtol=1e-5, atol=1e-6)
    x, keep = _inputs()
    keep[1] = False                                  # a fully padded sample: the model's uniform rows
    if fill > -math.inf:
        torch.testing.assert_close(gm(x, keep), model(x, keep), rtol=1e-5, atol=1e-6)


def test_band_width_comes_from_the_graph_not_the_example():
    """Length 3 with w = 5: every pair is within the band there, not at length 16."""
    model = SelfAttn("masked_fill", 5)
    gm, sites = _run(BandAttention, model, _inputs(T=3))
    assert [s.reason_code for s in sites] == ["too_short"]
    gm, sites = _run(BandAttention, model, _inputs(T=16))
    assert sites[0].details["window"] == 5
    x, keep = _inputs(T=40, seed=4)
    torch.testing.assert_close(gm(x, keep), model(x, keep), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case,code", [
    ("no_band", "no_band"),
    ("neg_inf_padding", "mask_fill"),
    ("causal", "mask_not_band"),
    ("cross", "not_self_attention"),
])
def test_sites_left_alone_say_why(case, code):
    class Causal(SelfAttn):
        def forward(self, x, keep):
            B, T, _ = x.shape
            q, k, v = (t.view(B, T, 2, 4).transpose(1, 2) for t in self.qkv(x).split(8, -1))
            c = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
            s = (q @ k.transpose(-2, -1)).masked_fill(~c, -1e9)
            return (torch.softmax(s, -1) @ v).sum(1)

    class Cross(SelfAttn):
        def forward(self, x, keep):
            B, T, _ = x.shape
            q = self.qkv(x[:, :4])[..., :8].view(B, 4, 2, 4).transpose(1, 2)
            k, v = (t.view(B, T, 2, 4).transpose(1, 2) for t in self.qkv(x)[..., 8:].split(8, -1))
            return (torch.softmax(q @ k.transpose(-2, -1), -1) @ v).sum(1)

    model = {"no_band": lambda: SelfAttn(w=None), "neg_inf_padding": lambda: SelfAttn(pad=True, fill=float("-inf")),
             "causal": lambda: Causal(), "cross": lambda: Cross()}[case]()
    gm, sites = _run(BandAttention, model, _inputs())
    assert [s.reason_code for s in sites] == [code], [(s.reason_code, s.reason) for s in sites]
    assert _n_local(gm) == 0


def test_sliding_window_adds_a_band_and_keeps_an_existing_one():
    torch.manual_seed(2)
    model = SelfAttn(w=None, pad=True, spelling="additive")
    x, keep = _inputs(T=16)
    gm, sites = _run(SlidingWindow, model, (x, keep), window=3, n_global=1)
    (site,) = sites
    assert site.status == "rewritten" and site.details["kind"] == "added" and site.details["n_global"] == 1
    # the added band is the architecture change: compare with the band written into the model
    ref = SelfAttn(w=3, pad=True, spelling="additive")
    ref.load_state_dict(model.state_dict())
    i = torch.arange(16)
    glob = (i[:, None] < 1) | (i[None, :] < 1)
    # (global tokens are exempt from the band: write that into the reference's mask)
    ref_band = lambda x, keep: _with_globals(ref, x, keep, glob)  # noqa: E731
    torch.testing.assert_close(gm(x, keep), ref_band(x, keep), rtol=1e-5, atol=1e-6)
    gm2, sites2 = _run(SlidingWindow, SelfAttn(w=2), _inputs(T=16), window=3)
    assert sites2[0].details["kind"] == "exact" and sites2[0].details["window"] == 2


def _with_globals(model, x, keep, glob):
    B, T, _ = x.shape
    q, k, v = (t.view(B, T, 2, 4).transpose(1, 2) for t in model.qkv(x).split(8, -1))
    s = q @ k.transpose(-2, -1) / math.sqrt(4)
    i = torch.arange(T)
    m = (((i[:, None] - i[None, :]).abs() <= model.w) | glob) & keep[:, None, None, :]
    s = s + torch.where(m, 0.0, -1e9)
    return (torch.softmax(s, -1) @ v).transpose(1, 2).flatten(2)
