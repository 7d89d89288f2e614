import math

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
