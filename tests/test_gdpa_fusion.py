"""The GDPA fusion pass: spellings it rewrites, and look-alikes it rejects with a reason."""
import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from recopt.ops import gdpa as gdpa_fn
from recopt.passes.base import PassContext
from recopt.passes.gdpa_fusion import REASONS, GDPAConfig, GDPAFusion


class Fn(nn.Module):
    """Wrap a function of (q, k, v, lens) so fx traces it."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.gelu = nn.GELU(approximate="tanh")

    def forward(self, q, k, v, lens):
        return self.fn(self, q, k, v, lens)


def run(model, *inputs, config=None):
    model.eval()
    gm = fx.symbolic_trace(model)
    ShapeProp(gm).propagate(*inputs)
    res = GDPAFusion(config).run(gm, PassContext(target=None, example_inputs=inputs))
    return res, res.graph_module


def n_gdpa(gm):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is gdpa_fn)


def _keep(k, lens):
    return (torch.arange(k.shape[2])[None, :] < lens[:, None])[:, None, None, :]


def _band(q):
    i = torch.arange(q.shape[2])
    return (i[:, None] - i[None, :]).abs() <= 2


POSITIVE = {
    "matmul_div_module_gelu": lambda m, q, k, v, l: torch.matmul(m.gelu(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])), v),
    "at_mT_hstu_silu": lambda m, q, k, v, l: F.silu(q @ k.mT * 0.5) / 17 @ v,
    "permute_relu": lambda m, q, k, v, l: F.relu(q @ k.permute(0, 1, 3, 2)) @ v,
    "einsum_relu_square": lambda m, q, k, v, l: torch.einsum("bhqk,bhkd->bhqd", F.relu(torch.einsum("bhqd,bhkd->bhqk", q, k)) ** 2, v),
    "bmm_flattened_heads": lambda m, q, k, v, l: torch.bmm(F.gelu(torch.bmm(q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2))), v.flatten(0, 1)),
    "zero_masked_fill": lambda m, q, k, v, l: F.gelu((q @ k.transpose(2, 3)).masked_fill(~_keep(k, l), 0.0)) @ v,
    "where_band_and_keys": lambda m, q, k, v, l: F.gelu(torch.where(_band(q) & _keep(k, l), q @ k.transpose(-1, -2), 0.0)) @ v,
    "neg_inf_before_relu": lambda m, q, k, v, l: torch.relu((q @ k.transpose(2, 3)).masked_fill(~_keep(k, l), float("-inf"))) @ v,
    "eval_dropout_hardswish": lambda m, q, k, v, l: F.dropout(F.hardswish(q @ k.transpose(-2, -1)), 0.1, training=False) @ v,
    "softmax_additive_mask": lambda m, q, k, v, l: torch.softmax(q @ k.transpose(-2, -1) * 0.3 + torch.where(_keep(k, l), 0.0, -1e9), -1) @ v,
    "raw_linear_attention": lambda m, q, k, v, l: (q @ k.transpose(-2, -1)) @ v,
}


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_rewrites_each_spelling(name):
    torch.manual_seed(0)
    B, H, T, d = 2, 3, 9, 8
    q, k, v = (torch.randn(B, H, T, d) for _ in range(3))
    lens = torch.tensor([4, 9])
    model = Fn(POSITIVE[name])
    want = model(q, k, v, lens)
    res, gm = run(model, q, k, v, lens)
    assert [s.status for s in res.sites] == ["rewritten"], [(s.reason_code, s.reason) for s in res.sites]
    assert n_gdpa(gm) == 1
    assert not any(n.target in (torch.matmul, torch.bmm) for n in gm.graph.nodes if n.op == "call_function")
    torch.testing.assert_close(gm(q, k, v, lens), want, rtol=1e-5, atol=1e-5)


def test_band_mask_becomes_window_and_key_mask_is_folded():
    q, k, v = (torch.randn(2, 2, 9, 8) for _ in range(3))
    res, _ = run(Fn(POSITIVE["where_band_and_keys"]), q, k, v, torch.tensor([4, 9]))
    (site,) = res.sites
    assert site.details["window"] == 2 and site.details["masks_folded"] == 1


NEGATIVE = {
    # key permuted over the wrong axes (Inductor's silent-wrong-result case): shapes line up when H == T == d
    "permuted_key": (lambda m, q, k, v, l: F.gelu(q @ k.permute(0, 2, 1, 3)) @ v, "key_not_transposed"),
    "row_normalised": (lambda m, q, k, v, l: (lambda p: (p / p.sum(-1, keepdim=True)) @ v)(F.relu(q @ k.transpose(-1, -2))),
                       "reduction_between_matmuls"),
    "score_used_twice": (lambda m, q, k, v, l: (lambda s: F.gelu(s) @ v + s.mean())(q @ k.transpose(-1, -2)), "score_used_twice"),
    "neg_inf_before_silu": (lambda m, q, k, v, l: F.silu((q @ k.transpose(2, 3)).masked_fill(~_keep(k, l), float("-inf"))) @ v,
                            "neg_inf_mask_nan"),
    "neg_inf_before_gelu": (lambda m, q, k, v, l: F.gelu(torch.where(_keep(k, l), q @ k.transpose(2, 3), float("-inf"))) @ v,
                            "neg_inf_mask_nan"),
    "softmax_over_queries": (lambda m, q, k, v, l: torch.softmax(q @ k.transpose(-1, -2), dim=-2) @ v, "softmax_wrong_dim"),
    "dropout_before_activation": (lambda m, q, k, v, l: F.gelu(F.dropout(q @ k.transpose(-1, -2), 0.1, training=True)) @ v,
                                  "dropout_training"),
    "sigmoid": (lambda m, q, k, v, l: torch.sigmoid(q @ k.transpose(-1, -2)) @ v, "activation_unsupported"),
    "general_2d_mask": (lambda m, q, k, v, l: F.gelu(torch.where(q[..., :1] @ k[..., :1].transpose(-1, -2) > 0,
                                                                 q @ k.transpose(-1, -2), 0.0)) @ v,
                        "mask_not_separable"),
    "contract_over_queries": (lambda m, q, k, v, l: F.gelu(q @ k.transpose(-1, -2)).transpose(-1, -2) @ v, "layout"),
}


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_rejects_lookalikes_with_reason(name):
    fn, code = NEGATIVE[name]
    q, k, v = (torch.randn(2, 8, 8, 8) for _ in range(3))
    res, gm = run(Fn(fn), q, k, v, torch.tensor([3, 8]))
    rejected = [s for s in res.sites if s.status == "rejected"]
    assert [s.reason_code for s in rejected] == [code], [(s.reason_code, s.reason) for s in res.sites]
    assert code in REASONS and rejected[0].reason
    assert n_gdpa(gm) == 0


def test_convert_nan_masks_opt_in():
    fn, _ = NEGATIVE["neg_inf_before_silu"]
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    lens = torch.tensor([6, 6])  # no masked key: the original has no NaN either
    want = Fn(fn)(q, k, v, lens)
    res, gm = run(Fn(fn), q, k, v, lens, config={"convert_nan_masks": True})
    assert res.sites[0].status == "rewritten" and "converted" in res.sites[0].reason
    torch.testing.assert_close(gm(q, k, v, lens), want)


class PFFN(nn.Module):
    """Kunlun-style PFFN: per-sample W1, W2 generated from context, act(S W1ᵀ) W2 (one head)."""

    def __init__(self, d=16, n_kv=6, d_ctx=8):
        super().__init__()
        self.gen1, self.gen2 = nn.Linear(d_ctx, n_kv * d), nn.Linear(d_ctx, n_kv * d)
        self.n_kv, self.d = n_kv, d

    def forward(self, s, ctx):
        w1 = self.gen1(ctx).view(-1, self.n_kv, self.d)
        w2 = self.gen2(ctx).view(-1, self.n_kv, self.d)
        return torch.bmm(F.gelu(torch.bmm(s, w1.transpose(1, 2)), approximate="tanh"), w2)


def test_pffn_is_one_head_gdpa():
    s, ctx = torch.randn(3, 11, 16), torch.randn(3, 8)
    model = PFFN().eval()
    gm = fx.symbolic_trace(model)
    ShapeProp(gm).propagate(s, ctx)
    res = GDPAFusion().run(gm, PassContext(target=None, example_inputs=(s, ctx)))
    (site,) = res.sites
    assert site.status == "rewritten" and site.details["pattern"] == "pffn"
    assert site.details["batch_dims"] == 1  # [B, 1, T, d]: never split into heads
    torch.testing.assert_close(res.graph_module(s, ctx), model(s, ctx))


class InterFormerPFFN(nn.Module):
    def __init__(self, d=32, n_sum=4):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_sum, d) / d)

    def forward(self, s, x_sum):
        wp = torch.einsum("bkd,ke->bde", x_sum, self.w)      # per-sample [B, d, d]
        return torch.bmm(s, wp.transpose(1, 2))


def test_interformer_pffn_is_reassociated():
    s, x_sum = torch.randn(3, 20, 32), torch.randn(3, 4, 32)
    model = InterFormerPFFN().eval()
    gm = fx.symbolic_trace(model)
    ShapeProp(gm).propagate(s, x_sum)
    res = GDPAFusion().run(gm, PassContext(target=None, example_inputs=(s, x_sum)))
    (site,) = res.sites
    assert site.status == "rewritten" and site.details["pattern"] == "pffn_reassociated"
    assert site.flops_after < site.flops_before
    assert not any(n.target is torch.einsum for n in res.graph_module.graph.nodes)
    torch.testing.assert_close(res.graph_module(s, x_sum), model(s, x_sum), rtol=1e-4, atol=1e-5)


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x, pad):
        return self.mha(x, x, x, key_padding_mask=pad)[0]


def test_mha_module_split_into_projections_and_gdpa():
    x, pad = torch.randn(2, 7, 16), torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    model = MHA().eval()
    gm = fx.symbolic_trace(model)
    ShapeProp(gm).propagate(x, pad)
    from recopt.passes.gdpa.decompose import DecomposeAttention

    ctx = PassContext(target=None, example_inputs=(x, pad))
    opened = DecomposeAttention().run(gm, ctx)
    assert [s.details.get("pattern") for s in opened.sites] == ["mha"]
    ShapeProp(gm).propagate(x, pad)
    res = GDPAFusion().run(gm, ctx)
    assert [s.status for s in res.sites] == ["rewritten"]
    assert not any(n.op == "call_module" for n in res.graph_module.graph.nodes)
    torch.testing.assert_close(res.graph_module(x, pad), model(x, pad), rtol=1e-5, atol=1e-5)


def test_sdpa_call_routed_causal_included():
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    for causal in (False, True):
        model = Fn(lambda m, q, k, v, l, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c))
        res, gm = run(model, q, k, v, torch.tensor([1, 1]))
        assert [s.status for s in res.sites] == ["rewritten"]
        torch.testing.assert_close(gm(q, k, v, None), model(q, k, v, None))
        q7, k7, v7 = (torch.randn(3, 2, 7, 8) for _ in range(3))   # other sizes
        torch.testing.assert_close(gm(q7, k7, v7, None), model(q7, k7, v7, None))


def test_plain_mlp_with_weights_is_not_a_candidate():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.randn(16, 8))

        def forward(self, x):
            return F.gelu(x @ self.w1) @ self.w2

    x = torch.randn(4, 8)
    gm = fx.symbolic_trace(MLP())
    ShapeProp(gm).propagate(x)
    assert GDPAFusion().run(gm, PassContext(target=None, example_inputs=(x,))).sites == []


def test_dynamo_captured_graph():
    """Graphs from torch._dynamo.export (torch-level calls, no module leaves) match too."""
    fn = lambda q, k, v: F.gelu(q @ k.transpose(-2, -1) * 0.25, approximate="tanh") @ v
    q, k, v = (torch.randn(2, 2, 6, 8) for _ in range(3))
    gm = torch._dynamo.export(fn)(q, k, v).graph_module
    ShapeProp(gm).propagate(q, k, v)
    res = GDPAFusion().run(gm, PassContext(target=None, example_inputs=(q, k, v)))
    assert [s.status for s in res.sites] == ["rewritten"]
    torch.testing.assert_close(res.graph_module(q, k, v), fn(q, k, v))


def test_config_round_trips_and_switches_patterns_off():
    cfg = GDPAConfig.from_json(GDPAConfig(softmax=False).to_json())
    fn = POSITIVE["softmax_additive_mask"]
    q, k, v = (torch.randn(2, 2, 6, 8) for _ in range(3))
    res, _ = run(Fn(fn), q, k, v, torch.tensor([3, 6]), config=cfg)
    assert [s.reason_code for s in res.sites] == ["disabled"]


@pytest.mark.parametrize("act", ["gelu", "softmax"])
def test_train_mode_dropout_is_kept_and_follows_the_graph_mode(act):
    """Dropout after the activation becomes gdpa's dropout_p: same mask under the same
    seed in train mode, none in eval mode (the graph's own self.training decides)."""
    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.3)

        def forward(self, q, k, v, lens):
            s = q @ k.transpose(-1, -2)
            p = F.gelu(s) if act == "gelu" else torch.softmax(s, -1)
            return self.drop(p) @ v

    model = Drop()
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    res, gm = run(model, q, k, v, torch.tensor([1, 1]))
    assert [s.status for s in res.sites] == ["rewritten"]
    torch.testing.assert_close(gm(q, k, v, None), model(q, k, v, None))     # eval: no dropout
    model.train(), gm.train()
    torch.manual_seed(3)
    want = model(q, k, v, None)
    torch.manual_seed(3)
    got = gm(q, k, v, None)
    torch.testing.assert_close(got, want)
    assert not torch.equal(got, gm.eval()(q, k, v, None))
