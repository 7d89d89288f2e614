"""The lean generated forward (recopt.lean): same outputs as the GraphModule, fewer
Module.__getattr__ calls, and parameters/buffers/modes still live (optimizer steps,
.to(), load_state_dict, train/eval, graph edits)."""
import copy
import pickle

import torch
import torch.fx as fx
import torch.nn as nn

import recopt
from recopt.lean import LeanForward, count_module_getattr, lean_forward


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.norm = nn.BatchNorm1d(d)
        self.drop = nn.Dropout(0.5)
        self.register_buffer("shift", torch.full((d,), 0.25))

    def forward(self, x):
        return self.drop(self.norm(torch.relu(self.lin(x)))) + self.shift


class Net(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(3))
        self.head = nn.Linear(d, 2)
        self.tied = self.head  # the same module under two names
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.tied(x * self.scale) + self.head.bias


def _pair(seed=0):
    torch.manual_seed(seed)
    gm = fx.symbolic_trace(Net())
    return gm, lean_forward(gm)


def test_same_outputs_and_fewer_module_lookups():
    gm, lean = _pair()
    gm.eval()
    x = torch.randn(5, 6)
    torch.testing.assert_close(lean(x), gm(x), rtol=0, atol=0)
    assert count_module_getattr(lean, x) < count_module_getattr(gm, x) / 2


def test_sees_optimizer_steps_and_shares_parameters():
    gm, lean = _pair()
    gm.eval()
    x = torch.randn(4, 6)
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    lean(x).square().sum().backward()
    assert gm.scale.grad is not None  # gradients reach the module's own parameters
    opt.step()
    torch.testing.assert_close(lean(x), gm(x), rtol=0, atol=0)


def test_train_eval_modes_and_buffer_updates():
    gm, lean = _pair()
    x = torch.randn(8, 6)
    gm.train()
    torch.manual_seed(1)
    a = lean(x)
    torch.manual_seed(1)
    b = gm(x)
    torch.testing.assert_close(a, b)  # dropout active in both, same draws
    before = gm.get_submodule("blocks.0.norm").running_mean.clone()
    lean(x)
    assert not torch.equal(before, gm.get_submodule("blocks.0.norm").running_mean)  # BatchNorm statistics updated
    gm.eval()
    torch.testing.assert_close(lean(x), gm(x), rtol=0, atol=0)


def test_to_dtype_and_load_state_dict_assign():
    gm, lean = _pair()
    gm.eval()
    gm.to(torch.float64)  # buffers become new tensors in their modules' dicts
    x = torch.randn(3, 6, dtype=torch.float64)
    out = lean(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, gm(x), rtol=0, atol=0)
    sd = {k: torch.rand_like(v) + 0.5 if v.is_floating_point() else v for k, v in gm.state_dict().items()}
    gm.load_state_dict(sd, assign=True)
    torch.testing.assert_close(lean(x), gm(x), rtol=0, atol=0)


def test_graph_edit_is_picked_up_after_recompile():
    gm, lean = _pair()
    gm.eval()
    x = torch.randn(2, 6)
    for n in gm.graph.nodes:
        if n.op == "output":
            with gm.graph.inserting_before(n):
                neg = gm.graph.call_function(torch.neg, (n.args[0],))
            n.args = (neg,)
    gm.recompile()
    torch.testing.assert_close(lean(x), gm(x), rtol=0, atol=0)


def test_deepcopy_and_pickle_rebuild_on_the_copy():
    gm, lean = _pair()
    gm.eval()
    holder = {"gm": gm, "lean": lean}
    c = copy.deepcopy(holder)
    assert isinstance(c["lean"], LeanForward) and c["lean"].graph_module is c["gm"]
    with torch.no_grad():
        c["gm"].scale.fill_(-3.0)
    x = torch.randn(2, 6)
    torch.testing.assert_close(c["lean"](x), c["gm"](x), rtol=0, atol=0)
    assert not torch.equal(lean(x), c["lean"](x))
    p = pickle.loads(pickle.dumps(lean))
    torch.testing.assert_close(p(x), gm(x), rtol=0, atol=0)


def test_optimize_eager_runs_the_lean_forward_and_follows_to():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(4, 6)
    opt = recopt.optimize(model, (x,), target="cpu", backend="eager")
    assert isinstance(opt._runners["eval"], LeanForward)
    torch.testing.assert_close(opt(x), model(x))
    opt.to(torch.float64)
    assert opt(x.double()).dtype == torch.float64


def test_gdpa_sites_with_graph_value_scales_keep_the_generic_call():
    """A scale computed from a shape is a graph value, not a constant: the site keeps gdpa()."""
    import math

    import torch.nn.functional as F

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            q, k, v = self.q(x), self.k(x), self.v(x)
            a = F.silu(q @ k.transpose(-2, -1) / math.sqrt(x.shape[-1])) @ v
            return a + torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(x.shape[-1]), -1) @ v

    torch.manual_seed(0)
    model = Attn().eval()
    x = torch.randn(3, 5, 8)
    opt = recopt.optimize(model, (x,), target="cpu", configs={"gdpa": {"cpu_sites": "all"}})
    assert opt.report.sites_for("gdpa", "rewritten")
    for b in (1, 4):
        xb = torch.randn(b, 7, 8)
        torch.testing.assert_close(opt(xb), model(xb))


def test_lean_softmax_site_matches_the_op_on_rows_whose_mask_is_all_minus_inf():
    """The lean per-site function and the generic op agree where a float mask blocks a
    whole row (0 and no gradient, as the reference and SDPA), and the optimized model
    returns what the model returns (it returned NaN while the verified graph gave 0)."""
    import torch.nn.functional as F

    from recopt.ops.gdpa import gdpa
    from recopt.ops.gdpa_site import specialize

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 3, 5, requires_grad=True) for _ in range(3))
    mask = torch.randn(2, 1, 3, 4)[..., :3].clone()
    mask[1, :, 0] = float("-inf")          # batch 1, query 0: every key blocked
    site = specialize({"activation": "softmax", "qk_scale": 1.0, "pre_scale": 0.5}, ("attn_mask",))
    got = site(q, k, v, attn_mask=mask)
    want = gdpa(q, k, v, attn_mask=mask, activation="softmax", pre_scale=0.5)
    torch.testing.assert_close(got, want)
    assert torch.isfinite(got).all() and (got[1, :, 0] == 0).all()
    gq = torch.autograd.grad(got.sum(), q)[0]
    wq = torch.autograd.grad(want.sum(), q)[0]
    torch.testing.assert_close(gq, wq)

    class M(nn.Module):
        def forward(self, q, k, v, m):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    args = tuple(t.detach() for t in (q, k, v)) + (mask,)
    opt = recopt.optimize(M(), args, target="cpu", backend="eager", configs={"gdpa": {"cpu_sites": "all"}})
    assert opt.report.sites_for("gdpa", "rewritten")
    torch.testing.assert_close(opt(*args), M()(*args))


def test_optimize_checks_the_lean_forward_against_the_verified_graph(monkeypatch):
    """A lean per-site function that departs from the op is caught at optimize time: the
    graph's own forward runs, the report says why, and a warning is raised."""
    import warnings

    import torch.nn.functional as F

    import recopt.ops.gdpa_site as site_mod

    real = site_mod.specialize

    def wrong(kwargs, dynamic=()):
        fn = real(kwargs, dynamic)
        return None if fn is None else (lambda *a, **k: fn(*a, **k) * 1.5)

    monkeypatch.setattr(site_mod, "specialize", wrong)

    class M(nn.Module):
        def forward(self, q, k, v, m):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    torch.manual_seed(0)
    args = tuple(torch.randn(2, 2, 3, 5) for _ in range(3)) + (torch.randn(2, 1, 3, 3),)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = recopt.optimize(M(), args, target="cpu", backend="eager",
                              configs={"gdpa": {"cpu_sites": "all"}})
    assert opt.report.sites_for("gdpa", "rewritten")
    assert any("lean eager forward differed" in n for n in opt.report.notes)
    assert any("lean eager forward differed" in str(w.message) for w in caught)
    torch.testing.assert_close(opt(*args), M()(*args))
