"""The ExFM aux_head pass, gradient scaling, serving-graph stripping, and Algorithm 1."""
import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import recopt
from recopt.data import FeatureSpec, example_batch
from recopt.distill.adapter import StudentAdapter, algorithm1_step
from recopt.ops.grad_scale import GRAD_SCALE_OP, grad_scale, is_grad_scale_node
from recopt.distill.losses import ExFMLossConfig, aux_head_loss, label_scale
from recopt.models import build_model
from recopt.passes.base import PassContext
from recopt.passes.exfm import AuxHeadConfig, AuxHeadPass, apply_aux_head, strip_distill_heads

SPEC = FeatureSpec(n_dense=5, sparse_cardinalities=(20, 30, 7), seq_feature_tables=(1,), max_seq_len=6,
                   event_names=("a", "b"))


def batch(seed=0, n=8):
    return example_batch(SPEC, n, seed=seed)


def small_dlrm():
    return build_model("dlrm", SPEC, embedding_dim=4, bottom_hidden=(8,), top_hidden=(8, 4))


class FunctionalHead(nn.Module):
    """A user-style model whose head is F.linear with raw parameters and a relu."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 6)
        self.w1 = nn.Parameter(torch.randn(4, 6))
        self.b1 = nn.Parameter(torch.randn(4))
        self.w2 = nn.Parameter(torch.randn(1, 4))

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return F.linear(F.relu(F.linear(h, self.w1, self.b1)), self.w2).squeeze(-1)


# ----------------------------------------------------------------------------- gradient scaling

@pytest.mark.parametrize("beta", [0.0, 0.5, 3.0, -2.0, 20.0])
def test_grad_scale_is_identity_forward_and_scales_gradients_exactly(beta):
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 7, dtype=torch.float64)
    y = grad_scale(x, beta)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, g * beta)


def test_grad_scale_is_one_fx_node_and_rejects_bad_beta():
    class M(nn.Module):
        def forward(self, x):
            return grad_scale(x, 2.0) * 3

    gm = fx.symbolic_trace(M())
    gs = [n for n in gm.graph.nodes if is_grad_scale_node(n)]
    assert len(gs) == 1
    x = torch.randn(3, requires_grad=True)
    gm(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 6.0))
    with pytest.raises(ValueError, match="finite"):
        grad_scale(x, float("nan"))


# ----------------------------------------------------------------------------- the pass

def test_aux_head_is_a_registered_architecture_pass():
    cls = recopt.available_passes()["aux_head"]
    assert cls is AuxHeadPass and cls.semantics is recopt.Semantics.ARCHITECTURE
    assert "aux_head" not in recopt.default_pipeline("cpu")
    assert AuxHeadConfig.from_json(AuxHeadConfig(beta=3.0).to_json()).beta == 3.0


@pytest.mark.parametrize("name", ["dlrm", "kunlun", "interformer"])
def test_serving_path_is_identical_to_the_original_at_initialisation(name):
    model = build_model(name, SPEC)
    model.eval()
    b = batch()
    gm, site = apply_aux_head(model, b.inputs(), {"beta": 5.0, "n_distill_heads": 2})
    assert site.status == "rewritten" and site.details["n_distill_heads"] == 2
    gm.eval()
    for seed in (1, 2):  # inputs other than the capture's
        inputs = batch(seed, 16).inputs()
        with torch.no_grad():
            ref = model(*inputs)
            serving, d1, d2 = gm(*inputs)
        assert torch.equal(serving, ref)
        assert torch.equal(d1, ref) and torch.equal(d2, ref)  # heads start as copies
    assert sum(is_grad_scale_node(n) for n in gm.graph.nodes) == 1


def test_distill_head_has_its_own_weights_and_gradients_flow_as_specified():
    model = small_dlrm()
    b = batch(n=16)
    beta = 4.0
    gm, _ = apply_aux_head(model, b.inputs(), {"beta": beta})
    serving_head = gm.get_submodule("dense_arch.top.net.4")
    distill_head = gm.get_submodule("exfm_distill1_l0")
    assert distill_head is not serving_head
    assert torch.equal(distill_head.weight, serving_head.weight)

    # The distillation loss alone: no gradient on the serving head; the backbone's gradient is
    # beta times what it would get without gradient scaling.
    serving, distill = gm(*b.inputs())
    distill.sum().backward()
    assert serving_head.weight.grad is None
    backbone_param = gm.get_submodule("dense_arch.top.net.0").weight
    scaled = backbone_param.grad.clone()
    head_grad = distill_head.weight.grad.clone()
    gm.zero_grad()
    gm_beta1, _ = apply_aux_head(copy.deepcopy(model), b.inputs(), {"beta": 1.0})
    gm_beta1(*b.inputs())[1].sum().backward()
    unscaled = gm_beta1.get_submodule("dense_arch.top.net.0").weight.grad
    torch.testing.assert_close(scaled, beta * unscaled, rtol=1e-5, atol=1e-7)
    assert torch.equal(head_grad, gm_beta1.get_submodule("exfm_distill1_l0").weight.grad)  # head: unscaled

    # The label loss alone never reaches the distillation head.
    gm.zero_grad()
    serving, distill = gm(*b.inputs())
    F.binary_cross_entropy_with_logits(serving, b.labels).backward()
    assert distill_head.weight.grad is None


def test_functional_linear_head_and_multi_layer_heads():
    model = FunctionalHead()
    x = torch.randn(6, 5)
    gm, site = apply_aux_head(model, (x,), {"head_layers": 2, "beta": 2.0})
    assert site.details["head_nodes"][0].startswith("linear")
    serving, distill = gm(x)
    assert torch.equal(serving, model(x)) and torch.equal(distill, model(x))
    new_params = [n for n, _ in gm.named_parameters() if n.startswith("exfm_distill")]
    assert len(new_params) == 3  # w1, b1, w2 copied
    with pytest.raises(recopt.PassError, match="head_too_shallow"):
        apply_aux_head(model, (x,), {"head_layers": 4})


def test_rejections_have_reason_codes():
    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 1), nn.Linear(3, 1)

        def forward(self, x):
            return self.a(x), self.b(x)

    class NoLinear(nn.Module):
        def forward(self, x):
            return x.sum(-1)

    class FanOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h).squeeze(-1) + h.sum(-1) * 0

    ctx = PassContext(target=recopt.get_target("cpu"))
    for model, code, cfg in [(TwoOutputs(), "multi_output", {}), (NoLinear(), "no_linear_head", {}),
                             (FanOut(), "no_linear_head", {})]:
        res = AuxHeadPass(cfg).run(fx.symbolic_trace(model), ctx)
        assert [s.reason_code for s in res.sites] == [code] and not res.modified
    gm, _ = apply_aux_head(small_dlrm(), batch().inputs())
    res = AuxHeadPass().run(gm, ctx)
    assert res.sites[0].reason_code == "already_applied"


def test_head_fanout_is_rejected():
    class FanOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 1)

        def forward(self, x):
            h = self.a(x)
            return (self.b(torch.relu(h)).squeeze(-1), h)[0] + 0 * h.sum()

    res = AuxHeadPass({"head_layers": 2}).run(fx.symbolic_trace(FanOut()), PassContext(target=None))
    assert res.sites[0].status == "rejected"


def test_pass_manager_runs_it_without_value_verification():
    model = small_dlrm()
    b = batch()
    cap = recopt.capture(model, b.inputs())
    gm, report = recopt.PassManager(["aux_head"], "cpu", verify=False, configs={"aux_head": {"beta": 2.0}}) \
        .run(cap.graph_module, cap.example_inputs)
    assert report.passes[0].status == "applied"
    assert len(gm(*b.inputs())) == 2


# ----------------------------------------------------------------------------- serving / export

def test_served_graph_has_no_distillation_head():
    model = small_dlrm()
    b = batch(n=16)
    gm, _ = apply_aux_head(model, b.inputs(), {"n_distill_heads": 2, "beta": 3.0})
    # train a little so the heads differ from the serving head
    opt = torch.optim.Adam(gm.parameters(), lr=1e-2)
    for _ in range(3):
        s, d1, d2 = gm(*b.inputs())
        loss = aux_head_loss(s, d1, b.labels, torch.randn(16), ExFMLossConfig(w=1.0), d2, torch.rand(16))
        opt.zero_grad()
        loss.backward()
        opt.step()
    served = strip_distill_heads(gm)
    assert not any(is_grad_scale_node(n) for n in served.graph.nodes)
    assert not any("exfm_distill" in n.name or "exfm_distill" in str(n.target) for n in served.graph.nodes)
    assert not any(name.startswith("exfm_distill") for name, _ in served.named_parameters())
    assert not any(name.startswith("exfm_distill") for name, _ in served.named_modules())
    assert sum(p.numel() for p in served.parameters()) == sum(p.numel() for p in model.parameters())
    gm.eval()
    served.eval()
    with torch.no_grad():
        out = served(*b.inputs())
        assert isinstance(out, torch.Tensor) and torch.equal(out, gm(*b.inputs())[0])
    # the training graph is left intact, and the served graph traces for export
    assert any(is_grad_scale_node(n) for n in gm.graph.nodes)
    exported = torch.export.export(served, b.inputs())
    assert not any(n.target == GRAD_SCALE_OP for n in exported.graph.nodes)
    with pytest.raises(ValueError, match="no distillation head"):
        strip_distill_heads(served)


# ----------------------------------------------------------------------------- losses and Algorithm 1

def test_label_scaling_and_loss_composition():
    t = torch.tensor([-3.0, 0.0, 3.0])
    torch.testing.assert_close(label_scale(t, 5.0), torch.clamp(5 * torch.sigmoid(t), max=1.0))
    s, d, y = torch.randn(3), torch.randn(3), torch.tensor([0.0, 1.0, 1.0])
    cfg = ExFMLossConfig(alpha=2.0, w=10.0)
    expected = F.binary_cross_entropy_with_logits(s, y) + 10.0 * F.binary_cross_entropy_with_logits(
        d, torch.clamp(2 * torch.sigmoid(t), max=1.0))
    torch.testing.assert_close(aux_head_loss(s, d, y, t, cfg), expected)
    with pytest.raises(ValueError):
        ExFMLossConfig(alpha=0.0)


def test_algorithm1_updates_adapter_then_student():
    model = small_dlrm()
    b = batch(n=32)
    gm, _ = apply_aux_head(model, b.inputs(), {"n_distill_heads": 2})
    adapter = StudentAdapter(hidden=4)
    teacher_logits = torch.randn(32)
    with torch.no_grad():  # an untrained adapter passes the teacher through
        torch.testing.assert_close(adapter(teacher_logits), teacher_logits)
    params = list(gm.parameters())
    s_opt = torch.optim.Adam(params, lr=1e-2)
    a_opt = torch.optim.Adam(adapter.parameters(), lr=1e-1)
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    losses = [algorithm1_step(gm, params, s_opt, adapter, a_opt, b.inputs(), b.labels, teacher_logits,
                              ExFMLossConfig(), grad_clip=1.0) for _ in range(20)]
    assert losses[-1]["adapter"] < losses[0]["adapter"]  # the adapter fits the fresh labels
    changed = {n for n, p in gm.named_parameters() if not torch.equal(p, before[n])}
    assert {"exfm_distill1_l0.weight", "exfm_distill2_l0.weight", "dense_arch.top.net.4.weight"} <= changed
    with pytest.raises(ValueError, match="n_distill_heads=2"):
        gm1, _ = apply_aux_head(small_dlrm(), b.inputs())
        algorithm1_step(gm1, list(gm1.parameters()), s_opt, adapter, a_opt, b.inputs(), b.labels,
                        teacher_logits, ExFMLossConfig())


def test_dynamo_captured_graph_functional_linear_spelling():
    model = small_dlrm()
    b = batch()
    cap = recopt.capture(model, b.inputs(), method="dynamo")
    res = AuxHeadPass({"beta": 2.0}).run(cap.graph_module, PassContext(target=None))
    assert res.modified
    serving, distill = res.graph_module(*b.inputs())
    with torch.no_grad():
        ref = model(*b.inputs())
    assert torch.equal(serving, ref) and torch.equal(distill, ref)
    served = strip_distill_heads(res.graph_module)
    out = served(*b.inputs())
    assert isinstance(out, torch.Tensor) and torch.equal(out, ref)
    assert not any(n.startswith("exfm_distill") for n, _ in served.named_parameters())


def test_aux_head_runs_through_the_pass_manager_with_the_prefix_contract():
    import torch.nn as nn

    import recopt

    class Student(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
            self.head = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))

        def forward(self, x):
            return self.head(self.body(x)).squeeze(-1)

    model = Student().eval()
    x = torch.randn(7, 6)
    opt = recopt.optimize(model, (x,), target="cpu", passes=["aux_head"])
    run = opt.report.pass_run("aux_head")
    assert run.status == "applied", (run.status, run.message)
    outs = opt(x)
    torch.testing.assert_close(outs[0], model(x))
