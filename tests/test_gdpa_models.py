"""optimize() with the GDPA pass on the reference InterFormer and Kunlun models:
every PFFN and attention site is rewritten, outputs unchanged, sites reported."""
import pytest
import torch

import recopt
from recopt.data.synthetic import SyntheticConfig, SyntheticCTR
from recopt.models import build_model
from recopt.models.kunlun import EventTowerConfig, KunlunConfig


@pytest.fixture(scope="module")
def source():
    return SyntheticCTR(SyntheticConfig(n_dense=8, sparse_cardinalities=(100, 50, 20), max_seq_len=24),
                        n_train=64, n_test=16)


def _inputs(source):
    b = source.generate(4, 0)
    return b.inputs() if callable(b.inputs) else b.inputs


# On the cpu target the gdpa pass leaves non-FLOP-saving sites alone (not_faster_on_target);
# these tests check the rewrite itself, so they ask for every site.
ALL_SITES = {"gdpa": {"cpu_sites": "all"}}

CASES = {
    "kunlun_softmax": ("kunlun", None),
    "kunlun_gelu_window": ("kunlun", KunlunConfig(attn_activation="gelu_tanh", towers=(
        EventTowerConfig(window=3), EventTowerConfig(d_model=16, n_heads=2)))),
    "interformer": ("interformer", None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_site_rewritten(source, case):
    name, cfg = CASES[case]
    model = build_model(name, source.spec, cfg).eval()
    inputs = _inputs(source)
    want = model(*inputs)
    opt = recopt.optimize(model, inputs, target="cpu", passes=["gdpa"], configs=ALL_SITES)
    sites = opt.report.sites_for("gdpa")
    rejected = [(s.node, s.reason_code, s.reason) for s in sites if s.status != "rewritten"]
    assert not rejected, rejected
    patterns = {s.details["pattern"] for s in sites}
    if name == "kunlun":
        assert "pffn" in patterns
        assert ("attention" in patterns) == (cfg is not None)
    else:
        assert "pffn_reassociated" in patterns
    left = [n for n in opt.graph_module.graph.nodes
            if n.op == "call_function" and n.target in (torch.matmul, torch.bmm, torch.softmax)]
    assert not left, [n.name for n in left]
    torch.testing.assert_close(opt(*inputs), want, rtol=1e-4, atol=1e-5)


def test_softmax_rewrite_keeps_gradients_with_fully_masked_rows():
    """A -1e9 additive mask over a whole row (a length-0 sequence) must not
    change the backward: SDPA's fused backward is orders of magnitude off
    there, so float-masked softmax stays on the math path."""
    import math

    import torch.nn as nn

    import recopt

    class Attn(nn.Module):
        def __init__(self, d=16, h=2):
            super().__init__()
            self.h, self.qkv, self.out = h, nn.Linear(d, 3 * d), nn.Linear(d, 1)

        def forward(self, x, lengths):
            B, T, D = x.shape[0], x.shape[1], x.shape[2]
            keep = torch.arange(T)[None, :] < lengths[:, None]
            bias = torch.where(keep, 0.0, -1e9)[:, None, None, :]
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            q = q.reshape(B, T, self.h, -1).transpose(1, 2)
            k = k.reshape(B, T, self.h, -1).transpose(1, 2)
            v = v.reshape(B, T, self.h, -1).transpose(1, 2)
            a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // self.h) + bias, dim=-1) @ v
            return self.out(a.transpose(1, 2).reshape(B, T, D)).sum((1, 2))

    torch.manual_seed(0)
    model = Attn()
    x, lengths = torch.randn(4, 6, 16), torch.tensor([0, 1, 4, 6])
    opt = recopt.optimize(model, (x, lengths), target="cpu", passes=["gdpa"], strict=True, configs=ALL_SITES)
    assert opt.report.sites_for("gdpa", "rewritten")
    g_ref = torch.autograd.grad(model(x, lengths).sum(), list(model.parameters()))
    g_opt = torch.autograd.grad(opt(x, lengths).sum(), list(model.parameters()))
    for a, b in zip(g_ref, g_opt):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
