"""VerifyConfig, the Verifier, the one pipeline resolver, and the small
correctness items of issue #13 (NaN gradients, -0.0, a pass returning None,
wrapped report reasons)."""
import dataclasses

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import recopt
from recopt.errors import InputError, PassError
from recopt.passes.base import Pass, PassConfig, PassResult, Semantics
from recopt.passes.registry import register_pass, resolve_pipeline, unregister_pass
from recopt.verify import Verifier, VerifyConfig, compare_gradients


def test_nan_gradients_in_the_same_places_are_equal_elsewhere_a_mismatch():
    g = torch.randn(4, 3)
    g[1, 2] = float("nan")
    names = {0: "w"}
    assert compare_gradients({0: g}, {0: g.clone()}, names) is None
    other = g.clone()
    other[1, 2] = 0.0
    m = compare_gradients({0: g}, {0: other}, names)
    assert m is not None and "non-finite" in m.message and m.output == "grad[w]"
    moved = g.clone()
    moved[0, 0] += 1.0
    assert compare_gradients({0: g}, {0: moved}, names) is not None


def test_removing_x_plus_0_keeps_negative_zero():
    class M(nn.Module):
        def forward(self, x):
            return 1.0 / (x + 0), (x - 0) * 1

    x = torch.tensor([-0.0, 2.0, -3.0])
    m = M().eval()
    opt = recopt.optimize(m, (x,), target="cpu", passes=["remove_identity"])
    got, want = opt(x), m(x)
    assert torch.equal(got[0], want[0]) and got[0][0] == float("inf")
    assert torch.equal(torch.signbit(got[1]), torch.signbit(want[1]))
    codes = {s.reason_code for s in opt.report.sites_for("remove_identity")}
    assert "signed_zero" in codes


class _ReturnsNone(Pass):
    name = "test_returns_none"
    semantics = Semantics.EXACT

    def run(self, gm, ctx):
        return None


def test_a_pass_returning_none_is_a_pass_error_naming_it():
    model = nn.Linear(3, 2).eval()
    opt = recopt.optimize(model, (torch.randn(2, 3),), target="cpu", passes=[_ReturnsNone()])
    run = opt.report.pass_run("test_returns_none")
    assert run.status == "failed" and "test_returns_none" in run.message and "PassResult" in run.message
    with pytest.raises(PassError, match="test_returns_none.*returned NoneType"):
        recopt.optimize(model, (torch.randn(2, 3),), target="cpu", passes=[_ReturnsNone()], strict=True)


def test_report_reasons_are_wrapped_never_cut_mid_word():
    from recopt.report import OptimizationReport, PassRun

    words = [f"word{i:02d}" for i in range(60)]
    rep = OptimizationReport(target={"name": "cpu"})
    rep.passes.append(PassRun("p", "exact", "rolled_back", 0.0, message=" ".join(words)))
    rep.notes.append("a note " + " ".join(words))
    text = rep.to_text()
    tokens = text.split()
    for w in words:
        assert tokens.count(w) == 2, w  # every word whole, once in the table and once in the note
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 140


def test_verify_config_is_one_knob_and_legacy_keywords_still_work():
    model = nn.Sequential(nn.Linear(4, 4), nn.Identity()).eval()
    x = (torch.randn(3, 4),)
    off = recopt.optimize(model, x, target="cpu", verify=recopt.VerifyConfig(edge_inputs=False))
    assert off.report.verify_sets == ["the example inputs"]
    legacy = recopt.optimize(model, x, target="cpu", n_random_inputs=2, verify_inputs=[torch.randn(5, 4)],
                             verify_gradients=False)
    assert "random input set 2" in legacy.report.verify_sets and "verify input 1" in legacy.report.verify_sets
    assert recopt.optimize(model, x, target="cpu", verify=False).report.verify_sets == []
    with pytest.raises(InputError, match="modes"):
        VerifyConfig(modes=("train",))
    with pytest.raises(InputError, match="VerifyConfig"):
        recopt.optimize(model, x, target="cpu", verify="yes")
    with pytest.raises(InputError, match="unknown keyword"):
        recopt.PassManager(["dead_code"], "cpu", n_random=1)


def test_verifier_owns_reference_outputs_and_rolls_back_naming_the_set():
    class Scale(nn.Module):
        def forward(self, x, lengths):
            return x * lengths[:, None, None]

    gm = fx.symbolic_trace(Scale())
    x, lengths = torch.randn(4, 6, 3), torch.tensor([6, 2, 3, 1])
    v = Verifier(VerifyConfig())
    v.prepare(gm, (x, lengths))
    assert len(v.sets) == len(v.outputs) == len(v.set_names) > 4
    assert "lengths has a 0 (and a 1 and a full row)" in v.set_names

    # A "rewrite" that is right unless a length is 0.
    bad = fx.symbolic_trace(type("Bad", (nn.Module,), {
        "forward": lambda self, x, lengths: x * lengths.clamp_min(1)[:, None, None]})())
    res = v.check(bad)
    assert res.failure is not None and ("cold start" in res.failure or "has a 0" in res.failure)
    good = v.check(fx.symbolic_trace(Scale()))
    assert good.failure is None and len(good.outputs) == len(v.sets)


def test_train_mode_is_verified_with_the_same_dropout_masks():
    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.drop = nn.Linear(8, 8), nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(self.lin(x))

    gm = fx.symbolic_trace(Drop())
    v = Verifier(VerifyConfig())
    v.prepare(gm, (torch.randn(4, 8),))
    assert v.modes == ("eval", "train")
    assert v.check(gm).failure is None  # the graph against itself, masks drawn alike

    class NoDrop(nn.Module):  # same in eval mode, different in train mode
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x)

    res = v.check(fx.symbolic_trace(NoDrop(gm.lin)))
    assert res.failure is not None and "train mode" in res.failure
    assert Verifier(VerifyConfig(modes=("eval",))).modes == ("eval",)


@dataclasses.dataclass
class _TagConfig(PassConfig):
    factor: float = 1.0


class _TagPass(Pass):
    name = "test_tag_pass"
    semantics = Semantics.EXACT
    config_cls = _TagConfig

    def run(self, gm, ctx):
        return PassResult(gm, [])


def test_one_resolver_takes_names_default_classes_instances_and_configs():
    register_pass(_TagPass)
    try:
        default = recopt.default_pipeline("cpu")
        assert [p.name for p in resolve_pipeline(None, "cpu")] == default
        assert [p.name for p in resolve_pipeline("default", "cpu")] == default
        got = resolve_pipeline(["default", _TagConfig(factor=2.0)], "cpu")
        assert [p.name for p in got] == default + ["test_tag_pass"] and got[-1].config.factor == 2.0
        assert [p.name for p in resolve_pipeline([_TagPass, "dead_code"], "cpu")] == ["test_tag_pass", "dead_code"]
        inst = _TagPass({"factor": 3.0})
        assert resolve_pipeline([inst], "cpu")[0] is inst
        with pytest.raises(InputError, match="twice"):
            resolve_pipeline(["dead_code", "dead_code"], "cpu")
        with pytest.raises(InputError, match="unknown pass"):
            resolve_pipeline(["no_such_pass"], "cpu")
        with pytest.raises(InputError, match="string"):
            resolve_pipeline("dead_code", "cpu")
        opt = recopt.optimize(nn.Linear(2, 2).eval(), (torch.randn(1, 2),), target="cpu",
                              passes=[_TagConfig(factor=5.0)])
        assert [p.name for p in opt.report.passes] == ["test_tag_pass"]
        assert opt.report.passes[0].config == {"factor": 5.0}
    finally:
        unregister_pass("test_tag_pass")


def test_a_graph_for_one_mode_is_verified_in_that_mode_only():
    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.drop = nn.Linear(8, 8), nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(self.lin(x))

    gm = fx.symbolic_trace(Drop())
    no_drop = fx.symbolic_trace(nn.Sequential(gm.lin))
    x = (torch.randn(4, 8),)
    ev = Verifier(VerifyConfig(), training=False)
    ev.prepare(gm, x)
    assert ev.modes == ("eval",) and ev.check(no_drop).failure is None  # dropout is a no-op in eval
    tr = Verifier(VerifyConfig(), training=True)
    tr.prepare(gm, x)
    assert tr.modes == ("train",)
    res = tr.check(no_drop)
    assert res.failure is not None and "(on the example inputs)" in res.failure
