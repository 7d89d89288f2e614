"""Property: optimize never changes what a model computes (default, exact passes).

Random small models are built from blocks (linear, norm, activation,
attention in three spellings, embedding bag, concat) at random sizes.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import recopt

BLOCKS = ("linear", "layernorm", "relu", "gelu", "silu", "softmax_attn", "gelu_attn", "mha", "embbag", "concat")


class ManualAttention(nn.Module):
    def __init__(self, d, act):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.act = act

    def forward(self, x):
        s = self.q(x) @ self.k(x).transpose(-2, -1) / math.sqrt(x.shape[-1])
        a = torch.softmax(s, dim=-1) if self.act == "softmax" else F.gelu(s) / x.shape[1]
        return a @ self.v(x)


class Concat(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.b(torch.cat([x, self.a(x)], dim=-1))


class MHA(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.m = nn.MultiheadAttention(d, 2 if d % 2 == 0 else 1, batch_first=True)

    def forward(self, x):
        return self.m(x, x, x, need_weights=False)[0]


class BlockModel(nn.Module):
    def __init__(self, blocks, d, n_ids=30):
        super().__init__()
        self.kinds = list(blocks)
        layers = []
        for b in blocks:
            layers.append({
                "linear": lambda: nn.Linear(d, d), "layernorm": lambda: nn.LayerNorm(d),
                "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU,
                "softmax_attn": lambda: ManualAttention(d, "softmax"), "gelu_attn": lambda: ManualAttention(d, "gelu"),
                "mha": lambda: MHA(d), "embbag": lambda: nn.EmbeddingBag(n_ids, d, mode="mean"),
                "concat": lambda: Concat(d),
            }[b]())
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(d, 1)

    def forward(self, x, ids, offsets):
        for kind, layer in zip(self.kinds, self.layers):
            if kind == "embbag":
                x = x + layer(ids, offsets)[:, None, :]
            elif kind in ("softmax_attn", "gelu_attn", "mha", "concat"):
                x = x + layer(x)
            else:
                x = layer(x)
        return self.head(x.mean(1)).squeeze(-1)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=5),
    d=st.sampled_from([4, 6, 8]),
    T=st.integers(1, 5),
    B=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_optimize_never_changes_outputs(blocks, d, T, B, seed):
    torch.manual_seed(seed)
    model = BlockModel(blocks, d).eval()
    x = torch.randn(B, T, d)
    ids = torch.randint(0, 30, (2 * B,))
    offsets = torch.arange(0, 2 * B, 2)
    opt = recopt.optimize(model, (x, ids, offsets), target="cpu", backend="eager")
    assert not [p for p in opt.report.passes if p.status == "failed"], str(opt.report)
    with torch.no_grad():
        for inputs in ((x, ids, offsets), (torch.randn(B, T, d) * 3, ids.flip(0), offsets)):
            torch.testing.assert_close(opt(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
