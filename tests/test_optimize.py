import json
import os
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import recopt
from recopt.errors import CaptureError, InputError, PassError, VerificationError
from recopt.passes.registry import unregister_pass

from core_models import EmbeddingMLP, MHAModel, SeqTransformer, ShapeBranchModel, ValueBranchModel

MODELS = [EmbeddingMLP, SeqTransformer, MHAModel]


def _check_same(model, opt, inputs):
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_optimize_eager_keeps_outputs(cls):
    model = cls().eval()
    inputs = cls.example_inputs()
    opt = recopt.optimize(model, inputs, target="cpu", backend="eager")
    assert isinstance(opt.graph_module, fx.GraphModule)
    # SeqTransformer unpacks `B, T, D = x.shape`, which symbolic tracing
    # cannot do: it must come through the Dynamo fallback.
    expected = "dynamo" if cls is SeqTransformer else "symbolic_trace"
    assert opt.report.capture_method == expected
    assert [p.name for p in opt.report.passes] == recopt.default_pipeline("cpu")
    assert all(p.status in ("applied", "no_change") for p in opt.report.passes)
    _check_same(model, opt, inputs)
    # And on another batch size (the graph is shape-generic).
    other = cls.example_inputs(batch=2)
    _check_same(model, opt, other)


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_optimize_inductor_keeps_outputs(cls):
    model = cls().eval()
    inputs = cls.example_inputs()
    opt = recopt.optimize(model, inputs, target="cpu", backend="inductor")
    assert opt.report.backend == "inductor"
    _check_same(model, opt, inputs)


def test_shape_branch_model_optimizes_via_dynamo_and_respecialises():
    model = ShapeBranchModel().eval()
    x = torch.randn(6, 3, 8)
    opt = recopt.optimize(model, (x,), target="cpu", backend="eager")
    assert opt.report.capture_method == "dynamo"
    assert opt.report.guards
    assert "symbolic_trace failed" in str(opt.report)
    _check_same(model, opt, (x,))
    small = torch.randn(2, 3, 8)  # takes the other branch: must be re-specialised
    _check_same(model, opt, (small,))
    _check_same(model, opt, (torch.randn(3, 8),))


def test_on_untraceable_eager_returns_model_unchanged_with_reason():
    model = ValueBranchModel()
    x = torch.randn(2, 4)
    opt = recopt.optimize(model, (x,), target="cpu", on_untraceable="eager")
    assert opt.report.capture_method == "none"
    assert "ValueBranchModel" in opt.report.capture_diagnostics[0]
    torch.testing.assert_close(opt(x), model(x))
    with pytest.raises(CaptureError):
        recopt.optimize(model, (x,), target="cpu")


def test_unknown_target_pass_backend_and_config_are_clear_errors():
    m, x = nn.Linear(4, 4), (torch.randn(2, 4),)
    with pytest.raises(ValueError, match="valid targets"):
        recopt.optimize(m, x, target="tpu")
    with pytest.raises(ValueError, match="registered passes: .*dead_code"):
        recopt.optimize(m, x, target="cpu", passes=["no_such_pass"])
    with pytest.raises(InputError, match="valid backends"):
        recopt.optimize(m, x, target="cpu", backend="tvm")
    with pytest.raises(ValueError, match="unknown option"):
        recopt.optimize(m, x, target="cpu", passes=["dead_code"], configs={"dead_code": {"bogus": 1}})
    with pytest.raises(InputError, match="not in the pipeline"):
        recopt.optimize(m, x, target="cpu", passes=["dead_code"], configs={"remove_identity": {}})
    with pytest.raises(InputError, match="list of pass names"):
        recopt.optimize(m, x, target="cpu", passes="dead_code")


class _ScaleOutput(recopt.Pass):
    """A planted bad pass: multiplies the graph's output by 1.01 and claims to be exact."""

    name = "test_bad_scale"

    def run(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        src = out.args[0]
        with gm.graph.inserting_before(out):
            scaled = gm.graph.call_function(torch.mul, (src, 1.01))
        out.args = (scaled,)
        gm.recompile()
        return recopt.PassResult(gm, [self.rewritten(scaled, "scaled the output")])


class _Raises(recopt.Pass):
    name = "test_raises"

    def run(self, gm, ctx):
        raise RuntimeError("boom")


def test_bad_pass_is_rolled_back_and_named():
    model = EmbeddingMLP().eval()
    inputs = EmbeddingMLP.example_inputs()
    opt = recopt.optimize(model, inputs, target="cpu", passes=[_ScaleOutput(), "dead_code"])
    run = opt.report.pass_run("test_bad_scale")
    assert run.status == "rolled_back"
    assert "output" in run.message and "max |diff|" in run.message
    site = opt.report.sites_for("test_bad_scale")[0]
    assert site.status == "rejected" and site.reason_code == "rolled_back"
    _check_same(model, opt, inputs)
    assert "rolled_back" in str(opt.report)
    with pytest.raises(VerificationError, match="test_bad_scale"):
        recopt.optimize(model, inputs, target="cpu", passes=[_ScaleOutput()], strict=True)


def test_pass_that_raises_is_reported_and_skipped_unless_strict():
    model = EmbeddingMLP().eval()
    inputs = EmbeddingMLP.example_inputs()
    opt = recopt.optimize(model, inputs, target="cpu", passes=[_Raises(), "dead_code"])
    run = opt.report.pass_run("test_raises")
    assert run.status == "failed" and "boom" in run.message
    assert opt.report.pass_run("dead_code").status in ("applied", "no_change")
    _check_same(model, opt, inputs)
    with pytest.raises(PassError, match="boom"):
        recopt.optimize(model, inputs, target="cpu", passes=[_Raises()], strict=True)


def test_user_pass_registered_by_name_runs_with_config_and_ordering():
    @dataclass
    class FoldConfig(recopt.PassConfig):
        min_uses: int = 1

    @recopt.register_pass
    class CountLinears(recopt.Pass):
        name = "test_count_linears"
        config_cls = FoldConfig
        after = ("remove_identity",)

        def run(self, gm, ctx):
            mods = dict(gm.named_modules())
            sites = []
            for n in gm.graph.nodes:
                if n.op == "call_module" and isinstance(mods[n.target], nn.Linear):
                    sites.append(self.rejected(n, "demo", f"min_uses={self.config.min_uses}"))
            return recopt.PassResult(gm, sites)

    try:
        model = EmbeddingMLP().eval()
        opt = recopt.optimize(model, EmbeddingMLP.example_inputs(), target="cpu",
                              passes=["test_count_linears", "remove_identity"],
                              configs={"test_count_linears": {"min_uses": 3}})
        assert [p.name for p in opt.report.passes] == ["remove_identity", "test_count_linears"]
        sites = opt.report.sites_for("test_count_linears")
        assert len(sites) == 3 and all("min_uses=3" in s.reason for s in sites)
        assert opt.report.pass_run("test_count_linears").config == {"min_uses": 3}
        with pytest.raises(ValueError, match="already registered"):
            recopt.register_pass(type("Other", (recopt.Pass,), {"name": "test_count_linears"}))
    finally:
        unregister_pass("test_count_linears")


def test_default_token_and_architecture_passes_are_opt_in():
    @recopt.register_pass
    class Arch(recopt.Pass):
        name = "test_arch"
        semantics = recopt.Semantics.ARCHITECTURE
        default_targets = ("*",)

        def run(self, gm, ctx):
            out = next(n for n in gm.graph.nodes if n.op == "output")
            with gm.graph.inserting_before(out):
                new = gm.graph.call_function(torch.mul, (out.args[0], 2.0))
            out.args = (new,)
            gm.recompile()
            return recopt.PassResult(gm, [self.rewritten(new, "doubled")])

    try:
        assert "test_arch" not in recopt.default_pipeline("cpu")
        model = nn.Sequential(nn.Linear(4, 4), nn.Identity()).eval()
        x = torch.randn(3, 4)
        opt = recopt.optimize(model, (x,), target="cpu", passes=["default", "test_arch"])
        names = [p.name for p in opt.report.passes]
        assert names[-1] == "test_arch" and "dead_code" in names
        run = opt.report.pass_run("test_arch")
        assert run.status == "applied" and "retrain" in run.message
        torch.testing.assert_close(opt(x), 2 * model(x))
    finally:
        unregister_pass("test_arch")


def test_report_text_and_json_round_trip(tmp_path):
    model = EmbeddingMLP().eval()
    opt = recopt.optimize(model, EmbeddingMLP.example_inputs(), target="h100", backend="eager")
    text = str(opt.report)
    assert "target h100" in text and "remove_identity" in text
    path = tmp_path / "r.json"
    opt.report.to_json(str(path))
    d = json.loads(path.read_text())
    assert d["target"]["name"] == "h100"
    assert d["flops_before"] > 0
    assert {"pass_name", "node", "module_path", "status", "reason"} <= set(d["sites"][0]) if d["sites"] else True
    back = recopt.OptimizationReport.from_dict(d)
    assert back.to_dict() == opt.report.to_dict()


def test_identity_sites_are_reported_with_module_paths():
    model = nn.Sequential(nn.Linear(4, 4), nn.Identity(), nn.Linear(4, 2)).eval()
    opt = recopt.optimize(model, (torch.randn(3, 4),), target="cpu")
    rewritten = opt.report.sites_for("remove_identity", "rewritten")
    assert [s.module_path for s in rewritten] == ["1"]
    assert not any(n.op == "call_module" and n.target == "1" for n in opt.graph_module.graph.nodes)


def test_recopt_dump_writes_graph_before_and_after(tmp_path, monkeypatch):
    monkeypatch.setenv("RECOPT_DUMP", str(tmp_path))
    model = nn.Sequential(nn.Linear(4, 4), nn.Identity()).eval()
    recopt.optimize(model, (torch.randn(3, 4),), target="cpu")
    files = sorted(os.listdir(tmp_path))
    assert any(f.endswith("remove_identity_before.py") for f in files)
    assert any(f.endswith("remove_identity_after.py") for f in files)


def test_torch_compile_backend_recopt():
    from recopt import lower

    lower.register_dynamo_backend()
    model = SeqTransformer().eval()
    inputs = SeqTransformer.example_inputs()
    compiled = torch.compile(model, backend="recopt")
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
    assert lower.last_reports, "the backend must have run the pass pipeline"


def test_pass_that_appends_outputs_is_checked_on_the_original_prefix():
    class AddAux(recopt.Pass):
        name = "test_add_aux"
        semantics = recopt.Semantics.ARCHITECTURE
        output_contract = "prefix"

        def __init__(self, scale=1.0, config=None):
            super().__init__(config)
            self.scale = scale

        def run(self, gm, ctx):
            out = next(n for n in gm.graph.nodes if n.op == "output")
            src = out.args[0]
            with gm.graph.inserting_before(out):
                served = gm.graph.call_function(torch.mul, (src, self.scale))
                aux = gm.graph.call_function(torch.tanh, (src,))
            out.args = ((served, aux),)
            gm.recompile()
            return recopt.PassResult(gm, [self.rewritten(aux, "added an aux output")])

    model = nn.Sequential(nn.Linear(4, 3)).eval()
    x = torch.randn(5, 4)
    opt = recopt.optimize(model, (x,), target="cpu", passes=[AddAux()])
    assert opt.report.pass_run("test_add_aux").status == "applied"
    served, aux = opt(x)
    torch.testing.assert_close(served, model(x))
    bad = recopt.optimize(model, (x,), target="cpu", passes=[AddAux(scale=1.5)])
    assert bad.report.pass_run("test_add_aux").status == "rolled_back"


def test_optimized_model_shares_and_trains_the_users_parameters():
    model = EmbeddingMLP()
    opt = recopt.optimize(model, EmbeddingMLP.example_inputs(), target="cpu")
    original = {id(p) for p in model.parameters()}
    assert {id(p) for p in opt.graph_module.parameters()} <= original
    before = model.head.weight.detach().clone()
    opt.graph_module.train()
    loss = opt(*EmbeddingMLP.example_inputs()).sum()
    loss.backward()
    torch.optim.SGD(opt.parameters(), lr=0.1).step()
    assert not torch.equal(model.head.weight, before), "training the optimized model must train the user's weights"


def test_respecialisation_after_training_uses_the_trained_weights():
    model = ShapeBranchModel()
    opt = recopt.optimize(model, (torch.randn(6, 8),), target="cpu")
    assert opt.report.capture_method == "dynamo"
    big = torch.randn(6, 8)
    before = opt(big).detach()
    opt(big).sum().backward()
    torch.optim.SGD(opt.parameters(), lr=0.5).step()
    with torch.no_grad():
        # Trained in place: the user's model moved with the optimized one.
        torch.testing.assert_close(opt(big), model(big))
        assert not torch.allclose(opt(big), before)
    small = torch.randn(2, 8)  # breaks the size guard: a new specialisation is built
    with torch.no_grad():
        torch.testing.assert_close(opt(small), model(small))


class _WrongBackward(torch.autograd.Function):
    """Identity forward, doubled gradient: exact forward, wrong training."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def _wrong_backward(x):
    return _WrongBackward.apply(x)


torch.fx.wrap("_wrong_backward")


class _BreaksBackward(recopt.Pass):
    """A planted pass whose rewrite keeps the forward but doubles gradients."""

    name = "test_breaks_backward"

    def run(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        src = out.args[0]
        with gm.graph.inserting_before(out):
            new = gm.graph.call_function(_wrong_backward, (src,))
        out.args = (new,)
        gm.recompile()
        return recopt.PassResult(gm, [self.rewritten(new, "identity with a wrong backward")])


def test_exact_pass_that_changes_gradients_is_rolled_back():
    model = EmbeddingMLP().eval()
    inputs = EmbeddingMLP.example_inputs()
    opt = recopt.optimize(model, inputs, target="cpu", passes=[_BreaksBackward()])
    run = opt.report.pass_run("test_breaks_backward")
    assert run.status == "rolled_back", run
    assert "gradients differ" in run.message
    ok = recopt.optimize(model, inputs, target="cpu", passes=[_BreaksBackward()], verify_gradients=False)
    assert ok.report.pass_run("test_breaks_backward").status == "applied"


def test_inference_only_rewrite_skips_the_gradient_check_and_says_so():
    class InferenceOnly(_BreaksBackward):
        name = "test_inference_only"

        def run(self, gm, ctx):
            res = super().run(gm, ctx)
            res.inference_only = True
            return res

    opt = recopt.optimize(EmbeddingMLP().eval(), EmbeddingMLP.example_inputs(), target="cpu",
                          passes=[InferenceOnly()])
    run = opt.report.pass_run("test_inference_only")
    assert run.status == "applied" and "gradients not" in run.message
