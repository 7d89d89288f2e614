"""nn.MultiheadAttention opened by decompose_attention, then fused by gdpa: every option, both modes.

The models are written the way public code writes them; the reference is the
module itself (its slow path with gradients on, its fast path under no_grad).
"""
import pytest
import torch
import torch.nn as nn

from recopt.capture import capture, propagate_shapes
from recopt.ops import gdpa as gdpa_fn
from recopt.passes.base import PassContext
from recopt.passes.gdpa.decompose import DecomposeAttention
from recopt.passes.gdpa_fusion import GDPAFusion

E, H, B, T, S = 16, 4, 3, 5, 6


class Attn(nn.Module):
    """One MHA call; ``mask``: None | "bool2d" | "float2d" | "bool3d" | "float3d" | "causal"."""

    def __init__(self, batch_first=True, self_attn=True, kdim=None, bias=True, mask=None, kpm=None,
                 need_weights=False, use_weights=False, average=True, is_causal=False, dropout=0.0):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias,
                                         dropout=dropout)
        self.bf, self.self_attn, self.mask, self.kpm = batch_first, self_attn, mask, kpm
        self.nw, self.use_w, self.avg, self.causal = need_weights, use_weights, average, is_causal

    def forward(self, x, kv, pad):
        L = x.size(1) if self.bf else x.size(0)
        Sk = L if self.self_attn else (kv.size(1) if self.bf else kv.size(0))
        k = x if self.self_attn else kv
        m = None
        if self.mask in ("causal", "bool2d"):
            m = torch.triu(torch.ones((L, Sk), dtype=torch.bool, device=x.device), diagonal=1)
        elif self.mask == "float2d":
            m = torch.triu(torch.full((L, Sk), float("-inf"), device=x.device), diagonal=1) \
                + torch.arange(Sk, device=x.device) * 0.1
        elif self.mask in ("bool3d", "float3d"):
            # per (batch, head): sample i masks keys past i + 2
            n = x.size(0) if self.bf else x.size(1)
            lim = (torch.arange(n * H, device=x.device) // H + 2)[:, None, None]
            m = torch.arange(Sk, device=x.device)[None, None, :].expand(n * H, L, Sk) > lim
            if self.mask == "float3d":
                m = m.float() * -1e4
        p = None if self.kpm is None else (pad if self.kpm == "bool" else pad.float() * -1e9)
        o, w = self.mha(x, k, k, key_padding_mask=p, attn_mask=m, need_weights=self.nw,
                        average_attn_weights=self.avg, is_causal=self.causal)
        return o * 1.5 + (w.sum(-1, keepdim=True).mean() if self.use_w else 0.0)


def _inputs(bf=True, kdim=E, fully_padded=False):
    g = torch.Generator().manual_seed(3)
    x = torch.randn((B, T, E) if bf else (T, B, E), generator=g)
    kv = torch.randn((B, S, kdim) if bf else (S, B, kdim), generator=g)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 3:] = True
    if fully_padded:
        pad[2] = True
    return x, kv, pad


def _open_and_fuse(model, inputs, training=False):
    model.train(training)
    gm = capture(model, inputs, training=training).graph_module
    gm.train(training)
    ctx = PassContext(target=None, example_inputs=inputs)
    opened = DecomposeAttention().run(gm, ctx)
    propagate_shapes(gm, inputs)
    fused = GDPAFusion().run(gm, ctx)
    return gm, opened.sites, fused.sites


def _same(model, gm, inputs, grad=True):
    torch.testing.assert_close(gm(*inputs), model(*inputs), equal_nan=True, rtol=1e-5, atol=1e-5)
    if not grad:
        return
    xs = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    ys = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    gm(*xs).sum().backward()
    model(*ys).sum().backward()
    for a, b in zip(xs, ys):
        if a.is_floating_point():
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    for (n, p), q in zip(model.named_parameters(), [gm.get_parameter(n) for n, _ in model.named_parameters()]):
        assert p is q  # the graph uses the module's own parameters
    model.zero_grad()


VARIANTS = {
    "plain": dict(),
    "seq_first": dict(batch_first=False),
    "kpm_bool": dict(kpm="bool"),
    "kpm_float": dict(kpm="float"),
    "causal_bool": dict(mask="causal"),
    "causal_kpm": dict(mask="causal", kpm="bool"),
    "float2d": dict(mask="float2d"),
    "bool3d_kpm": dict(mask="bool3d", kpm="bool"),
    "float3d": dict(mask="float3d"),
    "is_causal": dict(mask="causal", is_causal=True),
    "is_causal_kpm": dict(mask="causal", is_causal=True, kpm="float"),
    "cross_kdim": dict(self_attn=False, kdim=8, kpm=None),
    "cross_seq_first": dict(self_attn=False, batch_first=False),
    "no_bias": dict(bias=False, kpm="bool"),
    "weights_unused": dict(need_weights=True, kpm="bool", mask="causal"),
    "weights_used": dict(need_weights=True, use_weights=True, kpm="bool"),
    "weights_per_head": dict(need_weights=True, use_weights=True, average=False, mask="float2d"),
}


TRAIN = ("seq_first", "causal_kpm", "is_causal", "cross_kdim", "weights_used")   # train mode too (time)


@pytest.mark.parametrize("name,training", [(n, False) for n in VARIANTS] + [(n, True) for n in TRAIN])
def test_mha_variant_is_opened_fused_and_exact(name, training):
    torch.manual_seed(0)
    cfg = VARIANTS[name]
    model = Attn(**cfg)
    inputs = _inputs(cfg.get("batch_first", True), cfg.get("kdim") or E)
    gm, opened, fused = _open_and_fuse(model, inputs, training)
    assert [(s.status, s.details.get("pattern")) for s in opened] == [("rewritten", "mha")]
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    n_gdpa = sum(n.target is gdpa_fn for n in gm.graph.nodes)
    if cfg.get("use_weights"):
        # the weights are an output: the softmax is used twice and stays plain ops (exact weights)
        assert n_gdpa == 0 and [s.reason_code for s in fused] == ["score_used_twice"]
    else:
        assert n_gdpa == 1, [(s.reason_code, s.reason) for s in fused]
    _same(model, gm, inputs)
    # another batch and length than the example: nothing was read from its sizes
    g = torch.Generator().manual_seed(9)
    bf = cfg.get("batch_first", True)
    for L in (7, 1):                                   # length 1 too
        x2 = torch.randn((2, L, E) if bf else (L, 2, E), generator=g)
        kv2 = torch.randn((2, 9, cfg.get("kdim") or E) if bf else (9, 2, cfg.get("kdim") or E), generator=g)
        pad2 = torch.zeros(2, L, dtype=torch.bool)
        pad2[0, 5:] = True
        if not (cfg.get("mask") in ("bool3d", "float3d") or (cfg.get("self_attn", True) is False and cfg.get("kpm"))):
            _same(model, gm, (x2, kv2, pad2))


@pytest.mark.parametrize("need_weights", [True, False])
def test_fully_padded_sample_keeps_the_module_nan(need_weights):
    """An all-True key_padding_mask row is NaN in the module; the rewrite keeps it."""
    torch.manual_seed(1)
    model = Attn(kpm="bool", need_weights=need_weights)
    inputs = _inputs(fully_padded=True)
    gm, _, fused = _open_and_fuse(model, inputs)
    assert [s.status for s in fused] == ["rewritten"]
    # with weights the softmax row is NaN (masked_rows="nan"); without, SDPA's 0, made NaN
    # at run time where the module would take its eval fast path (no grad)
    assert [n.kwargs.get("masked_rows") for n in gm.graph.nodes if n.target is gdpa_fn] == \
        (["nan"] if need_weights else [None])
    with torch.no_grad():          # inference: the module's fast path without weights
        ref, out = model(*inputs), gm(*inputs)
    assert torch.isnan(ref[2]).all() and torch.isnan(out[2]).all()
    torch.testing.assert_close(out, ref, equal_nan=True, rtol=1e-5, atol=1e-5)
    ref, out = model(*inputs), gm(*inputs)      # gradients on: the module's slow path
    assert torch.isnan(ref[2]).all() == need_weights
    torch.testing.assert_close(out, ref, equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("need_weights", [True, False])
def test_train_mode_dropout_draws_the_module_stream(need_weights):
    torch.manual_seed(2)
    model = Attn(kpm="bool", mask="causal", need_weights=need_weights, dropout=0.25)
    inputs = _inputs()
    gm, _, fused = _open_and_fuse(model, inputs, training=True)
    # with weights: softmax -> dropout -> bmm fused, GDPA's dropout draws as F.dropout does;
    # without: dropout inside SDPA, which stays SDPA in a train graph
    assert [s.reason_code or s.status for s in fused] == (["rewritten"] if need_weights else ["sdpa_dropout"])
    for seed in (4, 5):
        torch.manual_seed(seed)
        want = model(*inputs)
        torch.manual_seed(seed)
        torch.testing.assert_close(gm(*inputs), want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(gm(*inputs), gm(*inputs)), "dropout is live"
    model.eval(), gm.eval()        # the same graph follows .eval(): no dropout
    torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


def test_eval_graph_dropout_follows_the_mode_flag():
    torch.manual_seed(3)
    model = Attn(kpm="bool", dropout=0.25)
    inputs = _inputs()
    gm, _, fused = _open_and_fuse(model, inputs, training=False)
    (call,) = [n for n in gm.graph.nodes if n.target is gdpa_fn]
    assert call.kwargs["dropout_p"] == 0.25 and call.kwargs["training"].target == "training"
    _same(model, gm, inputs)
    gm.train()
    assert not torch.equal(gm(*inputs), gm(*inputs))


@pytest.mark.parametrize("kind", ["add_bias_kv", "add_zero_attn", "subclass"])
def test_unsupported_options_are_left_alone_with_a_reason(kind):
    class Sub(nn.MultiheadAttention):
        pass

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            cls = Sub if kind == "subclass" else nn.MultiheadAttention
            self.mha = cls(E, H, batch_first=True, add_bias_kv=kind == "add_bias_kv",
                           add_zero_attn=kind == "add_zero_attn")

        def forward(self, x):
            return self.mha(x, x, x)[0]

    x = torch.randn(2, 5, E)
    gm = capture(M().eval(), (x,), leaf_modules=(Sub,)).graph_module
    (site,) = DecomposeAttention().run(gm, PassContext(target=None, example_inputs=(x,))).sites
    assert site.status == "rejected"
    assert site.reason_code == ("mha_subclass" if kind == "subclass" else "mha_options")
    assert kind == "subclass" or kind in site.reason
    assert any(n.op == "call_module" for n in gm.graph.nodes)
