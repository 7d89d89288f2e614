"""Lowering options (CUDA graphs for the eval graph) and the torch.compile backend (issue #15 item 4).

Inductor's own compile is replaced by the identity in most tests here: they
check what recopt hands to torch.compile / Inductor and what it reports, not
Inductor (test_optimize.py runs the real backend end to end once).
"""
import math
import warnings

import pytest
import torch
import torch.nn as nn

import recopt
from recopt import lower as L
from recopt.errors import InputError


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.nn.functional.gelu(q @ k.transpose(-2, -1) / math.sqrt(16)) @ v


class WithDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.lin(x))


# -- the lowering plan ---------------------------------------------------------

def test_plan_without_cuda_graphs_is_the_same_for_both_modes():
    p = L.lowering_plan("inductor", {"fullgraph": True})
    assert (p.eval, p.train, p.cuda_graphs, p.note) == ({"fullgraph": True}, {"fullgraph": True}, False, "")
    assert p.same_for_both and p.describe() == "inductor"
    e = L.lowering_plan("eager")
    assert (e.eval, e.train, e.describe()) == (None, None, "eager")


@pytest.mark.parametrize("kwargs,eval_opts,train_opts", [
    (dict(cuda_graphs=True), {"mode": "reduce-overhead", "dynamic": False}, {}),
    (dict(compile_options={"mode": "reduce-overhead"}), {"mode": "reduce-overhead", "dynamic": False}, {}),
    (dict(compile_options={"mode": "max-autotune", "dynamic": True}, cuda_graphs=True),
     {"mode": "max-autotune", "dynamic": True}, {"mode": "max-autotune-no-cudagraphs", "dynamic": True}),
    (dict(compile_options={"options": {"triton.cudagraphs": True, "max_autotune": True}}),
     {"options": {"max_autotune": True, "triton.cudagraphs": True}, "dynamic": False},
     {"options": {"max_autotune": True}}),
], ids=["cuda_graphs", "reduce_overhead_mode", "max_autotune", "inductor_option"])
def test_cuda_graphs_go_to_the_eval_graph_only(kwargs, eval_opts, train_opts):
    p = L.lowering_plan("inductor", **kwargs)
    assert p.cuda_graphs and p.eval == eval_opts and p.train == train_opts and not p.same_for_both
    assert p.describe() == "inductor + CUDA graphs (eval graph)"
    assert "static shapes" in p.note and "Train mode runs the Inductor lowering without CUDA graphs" in p.train_note
    assert p.report_note(True) == f"{p.note} {p.train_note}" and p.report_note(False) == p.note


@pytest.mark.parametrize("kwargs,match", [
    (dict(backend="eager", cuda_graphs=True), "backend='inductor'"),
    (dict(backend="eager", compile_options={"mode": "reduce-overhead"}), "backend='inductor'"),
    (dict(backend="eager", compile_options={"fullgraph": True}), "apply to backend='inductor' only"),
    (dict(backend="inductor", cuda_graphs=True, compile_options={"mode": "max-autotune-no-cudagraphs"}),
     "contradicts"),
    (dict(backend="inductor", compile_options={"mode": "fast"}), "not a torch.compile mode"),
])
def test_plans_that_cannot_be_honoured_are_errors(kwargs, match):
    with pytest.raises(InputError, match=match):
        L.lowering_plan(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_graphs_without_cuda_is_a_clear_error_not_a_silent_change():
    with pytest.raises(InputError, match="needs a CUDA device and this machine has none"):
        recopt.optimize(Attn().eval(), (torch.randn(2, 5, 16),), target="cpu", backend="inductor", cuda_graphs=True)
    with pytest.raises(InputError, match="needs a CUDA device"):
        recopt.optimize(Attn().eval(), (torch.randn(2, 5, 16),), target="cpu", backend="inductor",
                        compile_options={"mode": "reduce-overhead"})


def test_cuda_graphs_need_the_model_and_inputs_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(InputError, match="on CUDA, found tensors on cpu"):
        L.check_cuda_graph_device((torch.randn(2),), nn.Linear(2, 2))


class _Recorder:
    """Stands in for torch.compile: records the options and tags each runner with them."""

    def __init__(self):
        self.calls, self.ran = [], []

    def __call__(self, gm, backend=None, **opts):
        assert backend == "inductor"
        self.calls.append(dict(opts))

        def run(*args, _opts=dict(opts)):
            self.ran.append(_opts)
            return gm(*args)

        return run


@pytest.mark.parametrize("model_cls", [Attn, WithDropout], ids=["one_graph_for_both_modes", "mode_dependent"])
def test_optimize_lowers_eval_with_cuda_graphs_and_train_without(monkeypatch, model_cls):
    rec = _Recorder()
    monkeypatch.setattr(L.torch, "compile", rec)
    monkeypatch.setattr(recopt.api, "check_cuda_graph_device", lambda args, model=None: None)  # a CPU stand-in
    model = model_cls().eval()
    x = torch.randn(2, 5, 16) if model_cls is Attn else torch.randn(3, 8)
    opt = recopt.optimize(model, (x,), target="cpu", backend="inductor", cuda_graphs=True)
    # A train graph with dropout draws with torch's generator under Inductor too (same seed, same masks).
    train_opts = {} if model_cls is Attn else {"options": {"fallback_random": True}}
    assert rec.calls == [{"mode": "reduce-overhead", "dynamic": False}, train_opts]
    assert opt.report.backend == "inductor + CUDA graphs (eval graph)"
    assert any(n.startswith("CUDA graphs: the eval graph is compiled with torch.compile(mode='reduce-overhead', "
                            "dynamic=False)") and "Train mode runs the Inductor lowering without CUDA graphs" in n
               for n in opt.report.notes)
    assert "CUDA graphs" in opt.report.to_text()
    assert {"mode": "reduce-overhead", "dynamic": False} in rec.ran   # the lowering check ran both runners
    rec.ran.clear()
    opt.eval()(x)
    opt.train()(x)
    assert rec.ran == [{"mode": "reduce-overhead", "dynamic": False}, train_opts]
    if opt.train_report is not None:
        assert opt.train_report.backend == "inductor"


def test_optimize_without_cuda_graphs_compiles_one_runner_for_a_shared_graph(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(L.torch, "compile", rec)
    opt = recopt.optimize(Attn().eval(), (torch.randn(2, 5, 16),), target="cpu", backend="inductor",
                          compile_options={"fullgraph": True})
    assert rec.calls == [{"fullgraph": True}] and opt.report.backend == "inductor"


# -- the torch.compile backend -------------------------------------------------

@pytest.fixture
def no_inductor(monkeypatch):
    """Inductor's compile replaced by running the graph handed to it (recorded)."""
    import torch._inductor.compile_fx as cfx

    handed = []

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kw):
        handed.append((gm, config_patches))
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", fake_compile_fx)
    torch._dynamo.reset()
    yield handed
    torch._dynamo.reset()


class DetachWeights(recopt.Pass):
    """Wrong for training only: outputs unchanged, parameter gradients lost."""

    name = "test_detach_weights"

    def __init__(self, first_only=True, config=None):
        super().__init__(config)
        self.first_only = first_only

    def run(self, gm, ctx):
        sites = []
        for n in list(gm.graph.nodes):
            if self.first_only and sites:
                break
            if n.op == "get_attr" and isinstance(getattr(gm, n.target, None), nn.Parameter) and n.users:
                with gm.graph.inserting_after(n):
                    d = gm.graph.call_method("detach", (n,))
                n.replace_all_uses_with(d, delete_user_cb=lambda u: u is not d)
                sites.append(self.rewritten(d, "detached a parameter"))
        gm.recompile()
        return recopt.PassResult(gm, sites)


def test_backend_takes_a_pass_list_and_target(no_inductor):
    be = recopt.compile_backend(passes=["gdpa"], target="h100")
    m, x = Attn(), torch.randn(2, 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, backend=be)(x), m(x), rtol=1e-4, atol=1e-5)
    (rep,) = be.reports
    assert [p.name for p in rep.passes] == ["gdpa"] and rep.pass_run("gdpa").status == "applied"
    assert rep.target["name"] == "h100" and rep.modes == ["eval"]


def test_backend_rejects_unknown_passes_when_made():
    with pytest.raises(Exception, match="no_such_pass"):
        recopt.compile_backend(passes=["no_such_pass"])


@pytest.mark.parametrize("first_only,why", [(True, "gradients differ"),
                                             (False, "no longer depend on any trainable parameter")])
def test_backend_decides_training_from_grad_mode_and_verifies_gradients(no_inductor, first_only, why):
    m, x = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(4, 8)
    be = recopt.compile_backend(passes=[DetachWeights(first_only)], target="cpu")
    f = torch.compile(m, backend=be)
    f(x).sum().backward()                          # grad on, parameters require grad: a training graph
    train = be.reports[-1]
    assert train.modes == ["train"] and "gradients" in train.modes_note
    assert train.pass_run("test_detach_weights").status == "rolled_back"
    assert why in train.pass_run("test_detach_weights").message
    assert m[0].weight.grad is not None and m[0].weight.grad.abs().sum() > 0   # the graph run is the original
    with torch.no_grad():                          # Dynamo guards on grad mode: a new, inference graph
        torch.testing.assert_close(f(x), m(x))
    infer = be.reports[-1]
    assert infer.modes == ["eval"] and infer.pass_run("test_detach_weights").status == "applied"
    assert "outputs verified, not gradients" in infer.modes_note and not infer.notes


def test_backend_graph_reads_the_parameters_dynamo_passes_at_each_call(no_inductor):
    be = recopt.compile_backend(passes=["gdpa"], target="cpu")
    a, b, x = Attn(), Attn(), torch.randn(2, 6, 16)
    with torch.no_grad():
        fa, fb = torch.compile(a, backend=be), torch.compile(b, backend=be)
        torch.testing.assert_close(fa(x), a(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fb(x), b(x), rtol=1e-4, atol=1e-5)   # another instance, its own weights
        a.qkv.weight.mul_(-0.5)                                          # an optimizer step, in place
        torch.testing.assert_close(fa(x), a(x), rtol=1e-4, atol=1e-5)
    gm, _ = no_inductor[0]
    assert not [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("_recopt_lifted_")]
    assert not any(name.startswith("_recopt_lifted_") for name, _ in gm.named_parameters())


def test_backend_failure_is_recorded_and_warned_and_strict_raises(no_inductor, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("shape propagation exploded")

    monkeypatch.setattr(L, "_unlift_parameters", broken)   # recopt failing on a graph, outside a pass
    m, x = Attn(), torch.randn(2, 6, 16)
    be = recopt.compile_backend(passes=["gdpa"], target="cpu")
    with torch.no_grad(), pytest.warns(UserWarning, match=r"RuntimeError: shape propagation exploded; this graph "
                                                          r"is compiled unchanged.*strict=True"):
        torch.testing.assert_close(torch.compile(m, backend=be)(x), m(x))
    (rep,) = be.reports
    assert rep.backend == "inductor (graph unchanged: recopt failed)" and rep.passes == []
    assert "shape propagation exploded" in rep.notes[0] and isinstance(be.errors[0], RuntimeError)
    torch._dynamo.reset()
    strict = recopt.compile_backend(passes=["gdpa"], target="cpu", strict=True)
    with torch.no_grad(), pytest.raises(Exception, match="shape propagation exploded"), warnings.catch_warnings():
        warnings.simplefilter("error")             # no warning on the strict path: it raises
        torch.compile(m, backend=strict)(x)


def test_registered_backend_takes_options_and_mode(no_inductor):
    L.register_dynamo_backend()
    L.register_dynamo_backend()                    # idempotent (other tests register it too)
    m, x = Attn(), torch.randn(2, 6, 16)
    with torch.no_grad():
        torch.compile(m, backend="recopt", options={"passes": ["gdpa"], "target": "h200"})(x)
    rep = L.last_reports[-1]
    assert [p.name for p in rep.passes] == ["gdpa"] and rep.target["name"] == "h200"
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(m, backend="recopt", mode="reduce-overhead")(x)
    assert no_inductor[-1][1]["triton.cudagraphs"] is True
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match="unknown key.*'passs'"):
        torch.compile(m, backend="recopt", options={"passs": ["gdpa"]})(x)
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match="no_such_pass"):   # an error, not a warning
        torch.compile(m, backend="recopt", options={"passes": ["no_such_pass"]})(x)


# -- the GPU suite's inference section (runs on a GPU; its CPU-safe plumbing here) --

def test_gpu_suite_inference_section_checks_outputs_and_honours_its_deadline(monkeypatch):
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_suite as G

    assert "inference" in G.SECTIONS and "inference" in G.BUDGET_S
    res = G.inference_section("cpu", deadline=time.time() - 1, batch=2, repeats=2)
    assert res["variants"] == {"recopt inductor": {"skipped": "time budget"},
                               "recopt inductor + CUDA graphs": {"skipped": "time budget"}}
    assert [v["name"] for v in res["timing"]["variants"]] == ["eager"]
    # With the deadline open: the CUDA-graph variant on a CPU is recorded as an error (raised before
    # capture), never a silent lowering without CUDA graphs. The plain variant stands in as the model.
    class Stand:
        report = type("R", (), {"backend": "inductor"})()

        def __call__(self, *a):
            return model_seen[0](*a)

    model_seen, real = [], recopt.optimize

    def fake_optimize(m, a, **kw):
        if kw.get("cuda_graphs"):
            return real(m, a, **kw)
        model_seen.append(m)
        return Stand()

    monkeypatch.setattr(recopt, "optimize", fake_optimize)
    res = G.inference_section("cpu", deadline=time.time() + 600, batch=2, repeats=2)
    assert res["variants"]["recopt inductor"]["rel_err_vs_eager"] == 0.0
    assert "InputError" in res["variants"]["recopt inductor + CUDA graphs"]["error"]
    assert [v["name"] for v in res["timing"]["variants"]] == ["eager", "recopt inductor"]


def test_optimize_rolls_back_a_rewrite_that_loses_every_parameter_gradient():
    # The verifier hole the backend test found, in optimize's own path: a candidate whose outputs no
    # longer reach any parameter used to count as "nothing differentiable" and pass.
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 4))

        def forward(self, x):
            return torch.relu(x @ self.w)

    opt = recopt.optimize(Two().train(), (torch.randn(3, 8),), target="cpu", passes=[DetachWeights(False)])
    run = opt.report.pass_run("test_detach_weights")
    assert run.status == "rolled_back" and "no longer depend on any trainable parameter" in run.message


def test_backend_leaves_buffers_and_rng_as_one_call_of_the_model_would(no_inductor):
    # Dynamo passes BatchNorm's running statistics as graph inputs: recopt's own runs of the graph
    # (shapes, verification, FLOPs) must neither update them nor move the caller's RNG stream.
    import copy

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2))
    ref, x = copy.deepcopy(m), torch.randn(6, 8)
    f = torch.compile(m, backend=recopt.compile_backend(target="cpu"))
    torch.manual_seed(1)
    got, after = f(x), torch.rand(3)
    torch.manual_seed(1)
    want, want_after = ref(x), torch.rand(3)
    torch.testing.assert_close(got, want)                       # same dropout mask: same RNG stream
    torch.testing.assert_close(after, want_after)
    assert m[1].num_batches_tracked.item() == ref[1].num_batches_tracked.item() == 1
    torch.testing.assert_close(m[1].running_mean, ref[1].running_mean)
