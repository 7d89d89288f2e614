"""Kunlun passes say so when the FLOP figures on their sites come from an incomplete count
(a FLOP formula that raised is counted as 0: recopt.costs.FlopCounter.failed)."""
import torch
import torch.nn as nn
from torch.utils.flop_counter import flop_registry

import recopt
from recopt.passes.kunlun import structure as S


class Pool(nn.Module):
    def __init__(self):
        super().__init__()
        self.seeds = nn.Parameter(torch.randn(3, 16))
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, s):
        q = self.seeds.unsqueeze(0).expand(s.shape[0], -1, -1)
        return self.attn(q, s, s, need_weights=False)[0]


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = Pool()
        self.head = nn.Linear(48, 1)

    def forward(self, s):
        return self.head(self.pool(s).flatten(1))


def _broken_formula(*args, **kwargs):
    raise RuntimeError("formula exploded")


def test_node_flops_names_failing_formulas(monkeypatch):
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    x = (torch.randn(2, 4),)
    table = S.node_flops(gm, x)
    assert table and table.failed == {}
    monkeypatch.setitem(flop_registry, torch.ops.aten.addmm, _broken_formula)
    table = S.node_flops(gm, x)
    assert "aten.addmm" in table.failed and "formula exploded" in table.failed["aten.addmm"]
    assert table.get("_0", 0) == 0          # counted as 0: the figure is too low


def test_hsp_sites_say_their_flops_are_incomplete(monkeypatch):
    x = torch.randn(2, 10, 16)
    opt = recopt.optimize(M().eval(), (x,), target="cpu", passes=["hsp"], backend="eager")
    (site,) = [s for s in opt.report.sites if s.status == "rewritten"]
    assert "flops_incomplete" not in site.details and "FLOP figures incomplete" not in site.reason
    monkeypatch.setitem(flop_registry, torch.ops.aten.bmm, _broken_formula)
    opt = recopt.optimize(M().eval(), (x,), target="cpu", passes=["hsp"], backend="eager")
    (site,) = [s for s in opt.report.sites if s.status == "rewritten"]
    assert site.flops_before is not None and site.details["flops_incomplete"] == ["aten.bmm"]
    assert ("[FLOP figures incomplete: the FLOP formula of aten.bmm: RuntimeError: formula exploded (node "
            in site.reason) and site.reason.endswith("failed and was counted as 0]")
    assert "FLOP figures incomplete" in opt.report.to_text()


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
                                    for _ in range(2))
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x).sum(1)


def test_compskip_sites_say_their_flops_are_incomplete(monkeypatch):
    torch.backends.mha.set_fastpath_enabled(False)   # the fused fast path has no FLOP formula at all
    try:
        monkeypatch.setitem(flop_registry, torch.ops.aten.addmm, _broken_formula)
        x = torch.randn(2, 12, 16)
        opt = recopt.optimize(Encoder().eval(), (x,), target="cpu", passes=["compskip"], backend="eager")
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    sites = [s for s in opt.report.sites if s.status == "rewritten"]
    assert sites and all(s.details["flops_incomplete"] == ["aten.addmm"] for s in sites if s.flops_before is not None)
    assert any("[FLOP figures incomplete: the FLOP formula of aten.addmm" in s.reason for s in sites)
