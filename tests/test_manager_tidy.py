"""The pass manager tidies every pass's graph once (dead code by the side-effect rule, lint,
recompile), so a pass need not; the dead-code rule keeps random draws and in-place ops."""
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import recopt
from recopt.graph.nodes import has_side_effects
from recopt.passes.base import Pass, PassResult, Semantics


class _M(nn.Module):
    def forward(self, x):
        y = torch.relu(x) * 2.0
        return y + 1.0


class _NoTidy(Pass):
    """Replaces ``relu(x) * 2`` by ``relu(x) + relu(x)``; leaves the old mul and an unused
    random draw in the graph and does not recompile (the manager must)."""

    name = "test_no_tidy"
    semantics = Semantics.EXACT

    def run(self, gm, ctx):
        g = gm.graph
        mul = next(n for n in g.nodes if n.target is operator.mul)
        relu = mul.args[0]
        with g.inserting_after(mul):
            new = g.call_function(operator.add, (relu, relu))
            g.call_function(torch.rand, (3,))  # unused draw: must survive dead-code removal
        mul.replace_all_uses_with(new)
        return PassResult(gm, [self.rewritten(mul, "x*2 -> x+x")])


def test_manager_removes_dead_nodes_keeps_draws_and_recompiles():
    x = torch.randn(4, 5)
    opt = recopt.optimize(_M(), (x,), target="cpu", passes=[_NoTidy()])
    assert opt.report.pass_run("test_no_tidy").status == "applied"
    gm = opt.graph_module
    targets = [n.target for n in gm.graph.nodes]
    assert operator.mul not in targets           # dead: removed
    assert torch.rand in targets                 # unused random draw: kept
    assert "torch.rand" in gm.code and "mul" not in gm.code  # the forward was regenerated
    torch.testing.assert_close(opt(x), torch.relu(x) * 2.0 + 1.0)


def _node(fn, *args, **kwargs):
    g = fx.Graph()
    x = g.placeholder("x")
    return g.call_function(fn, (x,) + args, kwargs)


def test_side_effect_rule():
    assert has_side_effects(_node(F.dropout, 0.5))                     # training defaults to True
    assert has_side_effects(_node(F.dropout, 0.5, True))
    assert not has_side_effects(_node(F.dropout, 0.5, False))          # eval dropout draws nothing
    assert not has_side_effects(_node(F.dropout, p=0.0))
    assert has_side_effects(_node(F.dropout, 0.5, False, True))        # in place
    assert has_side_effects(_node(torch.randn_like))
    assert has_side_effects(_node(operator.iadd, 1))
    assert not has_side_effects(_node(torch.relu))
    g = fx.Graph()
    x = g.placeholder("x")
    assert has_side_effects(g.call_method("add_", (x, 1))) and not has_side_effects(g.call_method("add", (x, 1)))


class _Broken(Pass):
    """Leaves a node that uses a value defined after it: the graph does not lint."""

    name = "test_broken_graph"
    semantics = Semantics.EXACT

    def run(self, gm, ctx):
        g = gm.graph
        mul = next(n for n in g.nodes if n.target is operator.mul)
        out = next(n for n in g.nodes if n.op == "output")
        add = out.args[0]
        with g.inserting_before(mul):
            bad = g.call_function(operator.neg, (add,))   # add is defined later
        mul.replace_all_uses_with(bad)
        return PassResult(gm, [self.rewritten(mul, "broken")])


def test_a_pass_whose_graph_does_not_lint_fails_and_is_skipped():
    import pytest

    x = torch.randn(4, 5)
    opt = recopt.optimize(_M(), (x,), target="cpu", passes=[_Broken()])
    run = opt.report.pass_run("test_broken_graph")
    assert run.status == "failed" and "does not lint" in run.message
    assert run.n_rewritten == 0
    assert all(s.status == "rejected" and s.reason_code == "rolled_back"
               for s in opt.report.sites if s.pass_name == "test_broken_graph")
    torch.testing.assert_close(opt(x), torch.relu(x) * 2.0 + 1.0)
    with pytest.raises(recopt.PassError, match="does not lint"):
        recopt.PassManager([_Broken()], strict=True).run(fx.symbolic_trace(_M()), (x,))


class _AttnWithDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, q, k, v, x):
        p = F.dropout(torch.softmax(q @ k.transpose(-1, -2), -1), 0.2, self.training)
        unused = self.drop(x)   # an unused draw outside the region: kept
        x.mul_(2.0)             # an in-place op: kept
        return p @ v


def test_erase_absorbed_removes_the_replaced_region_and_its_draws_but_nothing_else():
    from recopt.graph.nodes import erase_absorbed

    gm = fx.symbolic_trace(_AttnWithDropout().train())
    g = gm.graph
    out_mm = next(n for n in g.nodes if n.target is operator.matmul and n.args[1].op == "placeholder")
    q, k, v = (n for n in g.nodes if n.op == "placeholder" and n.name in ("q", "k", "v"))
    with g.inserting_before(out_mm):
        fused = g.call_function(torch.mul, (v, 1.0))   # stands in for the fused call
    out_mm.replace_all_uses_with(fused)
    erase_absorbed(g, out_mm)
    targets = [n.target for n in g.nodes]
    assert F.dropout not in targets and torch.softmax not in targets, "the region's draw is absorbed"
    assert "drop" in targets, "a draw outside the region stays (it advances the generator)"
    assert "mul_" in targets, "in-place ops stay"
    assert has_side_effects(next(n for n in g.nodes if n.target == "drop"))


def test_eval_graph_dropout_module_with_p0_is_not_a_draw():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.d0, self.d1 = nn.Dropout(0.0), nn.Dropout(0.1)

        def forward(self, x):
            return self.d0(x) + self.d1(x)

    gm = fx.symbolic_trace(M())
    by_target = {n.target: n for n in gm.graph.nodes}
    assert not has_side_effects(by_target["d0"]) and has_side_effects(by_target["d1"])
