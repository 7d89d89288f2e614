"""The rule layer: match -> check (reason) -> rewrite (traced function, never rejects)."""
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import recopt
from recopt.passes.base import PassContext


def _match(gm, node):
    if node.op == "call_function" and node.target in (operator.mul, torch.mul):
        a, b = node.args[:2]
        if getattr(a, "target", None) is torch.sigmoid and a.args[0] is b:
            return {"x": b, "sig": a}
    return None


def _check(gm, m):
    return recopt.Reason("sigmoid_reused", "used twice") if len(m["sig"].users) > 1 else None


class Silu(recopt.RulePass):
    name = "test_rule_silu"
    semantics = recopt.Semantics.EXACT
    rules = (recopt.Rule("silu", _match, lambda m: (lambda x, c: F.silu(x) * c, [m["x"], 1.0]),
                         check=_check),)


class M(nn.Module):
    def forward(self, x, y):
        s = torch.sigmoid(y)
        return torch.sigmoid(x) * x + s * y + s.sum()


def test_rule_pass_rewrites_checks_and_reports():
    gm = fx.symbolic_trace(M())
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    want = gm(x, y)
    res = Silu().run(gm, PassContext(target=None, example_inputs=(x, y)))
    assert sorted(s.status for s in res.sites) == ["rejected", "rewritten"]
    assert [s.reason_code for s in res.sites if s.status == "rejected"] == ["sigmoid_reused"]
    assert sum(n.target is F.silu for n in gm.graph.nodes) == 1
    assert sum(n.target is torch.sigmoid for n in gm.graph.nodes) == 1   # dead one removed
    torch.testing.assert_close(gm(x, y), want)
