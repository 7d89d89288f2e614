"""The lowering check: optimize runs what it hands over (lean eager forward or Inductor) beside
the verified graph, per mode, and runs the graph where they differ (recopt/lowering_check.py).

Most tests stand a deliberately wrong "Inductor" in for torch.compile (it is monkeypatched in
recopt.lower), so they are fast; one runs the real Inductor end to end on a dropout + BatchNorm
model in both modes.
"""
import warnings

import pytest
import torch
import torch.nn as nn

import recopt
from recopt import lower as L
from recopt.errors import VerificationError
from recopt.lowering_check import check_lowering, differently_shaped_sets


class DropBN(nn.Module):
    """Mode-dependent (dropout, BatchNorm running statistics): separate eval and train graphs."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.3)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.drop(self.lin(x)).relu()).sum(-1)


class Plain(nn.Module):
    """No mode-dependent part: one graph serves both modes."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def fake_compile(make):
    """A torch.compile stand-in: ``make(gm)`` is the 'compiled' callable; records the options."""
    calls = []

    def compile_(gm, backend=None, **opts):
        calls.append(opts)
        return make(gm)

    compile_.calls = calls
    return compile_


def perturbed(gm):
    return lambda *a: gm(*a) * 1.001 + 1e-3


def wrong_gradient(gm):
    def run(*a):
        out = gm(*a)
        return out + 0.5 * (out - out.detach())   # same values, gradients x1.5
    return run


def double_update(gm):
    def run(*a):
        gm(*a)            # updates the running statistics twice per call
        return gm(*a)
    return run


def first_call_raises(gm):
    def run(*a):
        raise RuntimeError("inductor: C++ compile failed\nmore lines")
    return run


def _optimize(model, x, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = recopt.optimize(model, (x,), target="cpu", backend="inductor", **kw)
    return opt, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("model_cls", [Plain, DropBN], ids=["shared_graph", "graph_per_mode"])
def test_a_wrong_inductor_output_is_caught_and_the_graph_runs(monkeypatch, model_cls):
    monkeypatch.setattr(L.torch, "compile", fake_compile(perturbed))
    torch.manual_seed(0)
    model, x = model_cls().eval(), torch.randn(6, 8)
    opt, warned = _optimize(model, x)
    notes = opt.report.notes + (opt.train_report.notes if opt.train_report else [])
    for mode in ("eval", "train"):
        assert any(n.startswith(f"{mode} graph: the Inductor-compiled graph differed from the verified graph "
                                "on the example inputs: outputs differ") for n in notes), notes
    assert any("the Inductor-compiled graph differed" in w for w in warned)
    for mode in (False, True):
        model.train(mode), opt.train(mode)
        torch.manual_seed(3)
        got = opt(x)
        torch.manual_seed(3)
        torch.testing.assert_close(got, model(x), rtol=0, atol=0)


def test_a_lowering_that_only_breaks_train_gradients_is_caught_in_train_mode(monkeypatch):
    monkeypatch.setattr(L.torch, "compile", fake_compile(wrong_gradient))
    torch.manual_seed(0)
    model, x = Plain().train(), torch.randn(6, 8)
    opt, warned = _optimize(model, x)
    (note,) = [n for n in opt.report.notes if "differed" in n]
    assert note.startswith("train graph:") and "gradients differ" in note, note
    assert opt._runners["eval"] is not opt.graph_for(False)      # the eval lowering passed: it runs
    assert opt._runners["train"] is opt.graph_for(True)          # the train call runs the graph
    w = torch.autograd.grad(opt(x).sum(), model.a.weight)[0]
    torch.testing.assert_close(w, torch.autograd.grad(model(x).sum(), model.a.weight)[0])


def test_a_lowering_that_updates_buffers_twice_is_caught(monkeypatch):
    monkeypatch.setattr(L.torch, "compile", fake_compile(double_update))
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).train(), torch.randn(6, 8)
    opt, _ = _optimize(model, x)
    (note,) = [n for n in opt.train_report.notes if "differed" in n]
    assert "buffers after the call differ" in note and "running_mean" in note, note
    assert not any("differed" in n for n in opt.report.notes)   # eval: no update, nothing to see


def test_a_lowering_that_raises_is_a_failed_check_not_a_crash_on_the_first_call(monkeypatch):
    monkeypatch.setattr(L.torch, "compile", fake_compile(first_call_raises))
    model, x = Plain().eval(), torch.randn(6, 8)
    opt, _ = _optimize(model, x)
    assert any("the lowered model raised RuntimeError: inductor: C++ compile failed" in n for n in opt.report.notes)
    torch.testing.assert_close(opt(x), model(x))


def test_strict_raises_and_the_switch_skips_the_check(monkeypatch):
    monkeypatch.setattr(L.torch, "compile", fake_compile(perturbed))
    model, x = Plain().eval(), torch.randn(6, 8)
    with pytest.raises(VerificationError, match=r"eval graph: the Inductor-compiled graph differed.*"
                                                r"VerifyConfig\(lowering=False\) skips this check"):
        recopt.optimize(model, (x,), target="cpu", backend="inductor", strict=True)
    opt, warned = _optimize(model, x, verify=recopt.VerifyConfig(lowering=False))
    assert "the lowering was not checked against the verified graph (VerifyConfig(lowering=False))" in opt.report.notes
    assert not warned
    assert not torch.equal(opt(x), model(x))    # unchecked, as asked: the (wrong) lowering runs


def test_the_lowering_is_checked_in_the_verified_modes_only(monkeypatch):
    monkeypatch.setattr(L.torch, "compile", fake_compile(wrong_gradient))
    opt, _ = _optimize(Plain().train(), torch.randn(6, 8), verify=recopt.VerifyConfig(modes=("eval",)))
    assert "train graph: the lowering was not checked in train mode (VerifyConfig.modes=('eval',))" in opt.report.notes
    assert not any("differed" in n for n in opt.report.notes)


def test_the_lowering_is_checked_on_differently_shaped_sets(monkeypatch):
    """A lowering right on the example's shape only (a stale static kernel) is caught on a new batch size."""
    def shape_bug(gm):
        return lambda x: gm(x) if x.shape[0] == 6 else gm(x) + 1.0

    monkeypatch.setattr(L.torch, "compile", fake_compile(shape_bug))
    model, x = Plain().eval(), torch.randn(6, 8)
    opt, _ = _optimize(model, x)
    assert any("differed from the verified graph on batch" in n for n in opt.report.notes), opt.report.notes
    opt, _ = _optimize(model, x, verify=recopt.VerifyConfig(lowering_inputs=0))
    assert not any("differed" in n for n in opt.report.notes)


def test_differently_shaped_sets_prefer_a_new_size_then_size_one():
    ex = (torch.zeros(6, 5),)
    names = ["ex", "batch 1", "batch 3", "same shape", "seq 1", "batch 3 again"]
    sets = [ex, (torch.zeros(1, 5),), (torch.zeros(3, 5),), (torch.ones(6, 5),), (torch.zeros(6, 1),),
            (torch.zeros(3, 5),)]
    assert [n for n, _ in differently_shaped_sets(names, sets, 2)] == ["batch 3", "batch 1"]
    assert [n for n, _ in differently_shaped_sets(names, sets, 5)] == ["batch 3", "batch 1", "seq 1"]
    assert differently_shaped_sets(names, sets, 0) == []


def test_check_lowering_compares_input_gradients_too():
    class Scale(nn.Module):
        def forward(self, x):
            return x * 2.0

    gm = torch.fx.symbolic_trace(Scale())
    x = torch.randn(3, 4, requires_grad=True)
    ok = check_lowering(gm, gm, [("ex", (x,))], training=True)
    assert ok is None
    bad = check_lowering(gm, wrong_gradient(gm), [("ex", (x,))], training=True)
    assert bad is not None and "input tensor 0" in bad.message
    assert check_lowering(gm, wrong_gradient(gm), [("ex", (x,))], training=False) is None  # eval: no grads


def test_inductor_draws_with_torchs_generator_where_the_graph_draws():
    gm = torch.fx.symbolic_trace(DropBN())
    assert L.draws_random_numbers(gm) and not L.draws_random_numbers(gm.eval())
    gm.train()
    assert L.same_random_stream(gm, None) == {"options": {"fallback_random": True}}
    assert L.same_random_stream(gm, {"mode": "max-autotune-no-cudagraphs", "dynamic": False}) == {
        "dynamic": False, "options": {"max_autotune": True, "coordinate_descent_tuning": True,
                                      "fallback_random": True}}
    mine = {"options": {"fallback_random": False}}
    assert L.same_random_stream(gm, mine) == mine and L.keeps_inductor_random(mine)
    plain = torch.fx.symbolic_trace(Plain())
    assert not L.draws_random_numbers(plain) and L.same_random_stream(plain, {"fullgraph": True}) == {"fullgraph": True}

    class Off(nn.Module):
        def forward(self, x):
            return torch.nn.functional.dropout(x, 0.5, training=False) + torch.rand_like(x) * 0

    assert L.draws_random_numbers(torch.fx.symbolic_trace(Off()))   # rand_like draws in every mode


def test_user_choice_of_inductors_own_generator_is_reported_not_checked(monkeypatch):
    monkeypatch.setattr(L.torch, "compile", fake_compile(perturbed))
    opt, _ = _optimize(DropBN().eval(), torch.randn(6, 8), compile_options={"options": {"fallback_random": False}})
    assert any("was not checked against the verified graph: it draws random numbers and compile_options set "
               "fallback_random=False" in n for n in opt.report.notes + opt.train_report.notes)


def test_real_inductor_matches_the_model_in_both_modes_with_the_same_seed():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = DropBN().train(), torch.randn(6, 8)
    opt, warned = _optimize(model, x, verify=recopt.VerifyConfig(lowering_inputs=1))
    assert not warned and not any("differed" in n for n in opt.report.notes + opt.train_report.notes)
    assert opt._runners["train"] is not opt.graph_for(True)     # Inductor's lowering runs
    ref = DropBN()
    ref.load_state_dict(model.state_dict())
    for mode in (True, False, True):
        ref.train(mode), opt.train(mode)
        torch.manual_seed(7)
        got = opt(x)
        torch.manual_seed(7)
        torch.testing.assert_close(got, ref(x))
        torch.testing.assert_close(model.bn.running_mean, ref.bn.running_mean)
    torch._dynamo.reset()
