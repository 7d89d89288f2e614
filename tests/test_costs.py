import math

import pytest

import torch
import torch.fx as fx
import torch.nn as nn

import recopt
from recopt.capture import propagate_shapes
from recopt.costs import count_graph_flops, graph_activation_bytes


def test_linear_flops_are_2mnk_and_need_no_real_compute():
    gm = fx.symbolic_trace(nn.Linear(32, 16))
    assert count_graph_flops(gm, (torch.randn(8, 32),)) == 2 * 8 * 32 * 16


def test_activation_bytes_count_each_write_and_read():
    class Two(nn.Module):
        def forward(self, x):
            y = torch.relu(x)          # written once, read by two nodes
            return y + 1, y * 2        # each written once, read once (by the output)

    gm = fx.symbolic_trace(Two())
    propagate_shapes(gm, (torch.randn(4, 8),))
    per_tensor = 4 * 8 * 4
    assert graph_activation_bytes(gm) == per_tensor * (1 + 2) + 2 * per_tensor * (1 + 1)


def test_fusing_attention_lowers_the_reported_activation_traffic():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return torch.nn.functional.gelu(q @ k.transpose(-2, -1) / math.sqrt(16)) @ v

    x = torch.randn(2, 64, 16)
    opt = recopt.optimize(Attn().eval(), (x,), target="cpu", passes=["gdpa"], strict=True)
    assert opt.report.bytes_after < opt.report.bytes_before
    assert "activation traffic" in str(opt.report)


# -- the report's FLOPs agree with torch's FlopCounterMode (issue #13) -------

def _flop_counter_mode(model, args):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as c:
        model(*args)
    return c.get_total_flops()


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 8))

    def forward(self, x, w):
        return self.net(x) @ w


class _SDPA(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (t.reshape(B, T, 4, D // 4).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)


class _Encoder(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 4, 64, batch_first=True), 2)
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


class _TwoTowerMHA(nn.Module):
    """A retrieval two-tower model whose user tower attends over the history."""

    def __init__(self, d=32):
        super().__init__()
        self.hist, self.item = nn.Embedding(100, d), nn.Embedding(200, d)
        self.mha = nn.MultiheadAttention(d, 4, batch_first=True)
        self.ut = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, d))
        self.it = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, d))

    def forward(self, hist_ids, item_ids):
        h = self.hist(hist_ids)
        u = self.ut(self.mha(h, h, h, need_weights=False)[0].mean(1))
        return (u * self.it(self.item(item_ids))).sum(-1)


class _PointwiseAttention(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return torch.nn.functional.silu(q @ k.transpose(-2, -1)) @ v


@pytest.mark.parametrize("make,args", [
    (_MLP, lambda: (torch.randn(16, 24), torch.randn(8, 5))),
    (_SDPA, lambda: (torch.randn(2, 10, 32),)),
    (_Encoder, lambda: (torch.randn(4, 10, 32),)),
    (_TwoTowerMHA, lambda: (torch.randint(0, 100, (8, 20)), torch.randint(0, 200, (8,)))),
    (_PointwiseAttention, lambda: (torch.randn(2, 12, 16),)),
], ids=["mlp_matmul", "sdpa", "transformer_encoder", "two_tower_mha", "pointwise_attention"])
def test_report_flops_match_flop_counter_mode_before_and_after(make, args):
    torch.manual_seed(0)
    model, a = make().eval(), args()
    want_before = _flop_counter_mode(model, a)
    opt = recopt.optimize(model, a, target="cpu")
    want_after = _flop_counter_mode(opt, a)
    assert want_before > 0
    assert opt.report.flops_before == pytest.approx(want_before, rel=0.02)
    assert opt.report.flops_after == pytest.approx(want_after, rel=0.02)
