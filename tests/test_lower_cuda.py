"""CUDA graphs lowering on a GPU (skipped without CUDA): optimize(cuda_graphs=True) really records
CUDA graphs for the eval graph, copies new inputs in, and leaves train mode without them."""
import math

import pytest
import torch
import torch.nn as nn

import recopt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.drop(torch.nn.functional.gelu(q @ k.transpose(-2, -1) / math.sqrt(16)) @ v)


def test_eval_graph_replays_cuda_graphs_on_new_values_and_train_mode_trains():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = Attn().cuda().eval()
    x = torch.randn(4, 32, 16, device="cuda")
    counters.clear()
    opt = recopt.optimize(model, (x,), target="auto", backend="inductor", cuda_graphs=True)
    assert opt.report.backend == "inductor + CUDA graphs (eval graph)"
    with torch.no_grad():
        for _ in range(4):                          # warm-up, record, replays on fresh values
            x = torch.randn(4, 32, 16, device="cuda")
            got = opt(x).clone()
            torch.testing.assert_close(got, model(x), rtol=2e-3, atol=2e-3)
    assert not counters["inductor"].get("cudagraph_skips"), dict(counters["inductor"])
    opt.train()
    loss = opt(torch.randn(4, 32, 16, device="cuda")).square().mean()
    loss.backward()
    assert model.qkv.weight.grad is not None and model.qkv.weight.grad.abs().sum() > 0
