"""Shape guards for decisions read from the example (issue 13, item 5)."""
import operator

import pytest
import torch
import torch.nn as nn

import recopt
from recopt.guards import Guard, compile_guards

from core_models import EmbeddingMLP, ShapeBranchModel


class SumOverFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):  # x: [B, F, 4]
        return self.lin(x.sum(1))


class UnrollSum(recopt.Pass):
    """Unrolls ``x.sum(1)`` into additions of the example's F slices: valid only at that F."""

    name = "test_unroll_sum"

    def __init__(self, config=None, guard=True, break_it=False):
        super().__init__(config)
        self.guard, self.break_it = guard, break_it

    def run(self, gm, ctx):
        sites = []
        for node in list(gm.graph.nodes):
            if node.op == "call_method" and node.target == "sum" and node.args[1:] == (1,):
                src = node.args[0]
                n = ctx.example_inputs[ctx.input_index(src)].shape[1]
                with gm.graph.inserting_before(node):
                    acc = gm.graph.call_function(operator.getitem, (src, (slice(None), 0)))
                    for i in range(1, n - int(self.break_it)):
                        part = gm.graph.call_function(operator.getitem, (src, (slice(None), i)))
                        acc = gm.graph.call_function(operator.add, (acc, part))
                node.replace_all_uses_with(acc)
                gm.graph.erase_node(node)
                if self.guard:
                    ctx.add_guard(ctx.input_index(src), 1, n, f"unrolled over the example's {n} features")
                sites.append(self.rewritten(acc, f"unrolled over {n} slices"))
        gm.recompile()
        return recopt.PassResult(gm, sites)


def test_a_decision_read_from_a_size_records_a_guard_and_a_new_size_respecialises():
    model = SumOverFeatures().eval()
    opt = recopt.optimize(model, (torch.randn(2, 3, 4),), target="cpu", passes=[UnrollSum()])
    assert opt.report.pass_run("test_unroll_sum").status == "applied"
    assert any("size()[1] == 3" in g and "test_unroll_sum" in g for g in opt.report.guards)
    other = torch.randn(2, 5, 4)
    torch.testing.assert_close(opt(other), model(other))
    assert len(opt._specialisations) == 1
    # The example's size still takes the first graph.
    x = torch.randn(7, 3, 4)
    torch.testing.assert_close(opt(x), model(x))
    assert len(opt._specialisations) == 1


def test_without_the_guard_the_decision_is_caught_on_an_edge_set():
    """The reason guards exist: the same rewrite without one is wrong at another F, and
    verification's edge sets (a new length) roll it back; with the guard those sets are skipped."""
    model = SumOverFeatures().eval()
    opt = recopt.optimize(model, (torch.randn(2, 3, 4),), target="cpu", passes=[UnrollSum(guard=False)])
    run = opt.report.pass_run("test_unroll_sum")
    assert run.status == "rolled_back"
    other = torch.randn(2, 5, 4)
    torch.testing.assert_close(opt(other), model(other))


def test_a_rolled_back_pass_leaves_no_guard():
    model = SumOverFeatures().eval()
    opt = recopt.optimize(model, (torch.randn(2, 3, 4),), target="cpu", passes=[UnrollSum(break_it=True)])
    assert opt.report.pass_run("test_unroll_sum").status == "rolled_back"
    assert opt.report.guards == []
    assert not opt.captured.guards


def test_shape_generic_decisions_record_nothing():
    model = EmbeddingMLP().eval()
    opt = recopt.optimize(model, EmbeddingMLP.example_inputs(), target="cpu")
    assert opt.report.capture_method == "symbolic_trace"
    assert opt.report.guards == [] and opt.captured.guards == []


def test_compiled_guards_agree_with_each_guard_evaluated_alone():
    model = ShapeBranchModel()
    cap = recopt.capture(model, (torch.randn(6, 8),), method="dynamo")
    assert cap.guards
    check = compile_guards(cap.guards, cap.input_names)
    for shape in [(6, 8), (2, 8), (6, 8, 3), (9, 8), (1, 8)]:
        args = (torch.randn(*shape),)
        alone = []
        for g in cap.guards:
            try:
                alone.append(bool(eval(g, {"__builtins__": {"len": len, "str": str}}, {"L": {"x": args[0]}})))
            except Exception:
                alone.append(False)
        assert check(args) == all(alone) == cap.guards_hold(args), shape
    assert compile_guards([], ["x"])((1,)) is True
    assert check(("not a tensor",)) is False


def test_guard_validation_names_the_problem():
    with pytest.raises(ValueError, match="op must be one of"):
        Guard("x", 0, 3, op="=>")
    with pytest.raises(ValueError, match="identifier"):
        Guard("x']; import os; L['x", 0, 3)
    ctx = recopt.passes.base.PassContext(target=None, example_inputs=(torch.zeros(2, 3),), input_names=("x",))
    with pytest.raises(IndexError, match="no dimension 2"):
        ctx.add_guard(0, 2, 1, "why")
    with pytest.raises(IndexError, match="out of range"):
        ctx.add_guard(1, 0, 1, "why")
    ctx.add_guard(0, -1, 3, "last dim")
    assert ctx.guards[0].code == "L['x'].size()[1] == 3"
