"""recopt.graph: canonical views across spellings."""
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from recopt.graph import as_activation, as_linear, as_matmul, as_permute, const_value, op_kind, strip_permutes


def _trace(fn, *inputs):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.gelu = nn.GELU(approximate="tanh")

        def forward(self, a, b):
            return fn(self, a, b)

    inputs = inputs + (torch.zeros(1),) * (2 - len(inputs))
    gm = fx.symbolic_trace(M())
    ShapeProp(gm).propagate(*inputs)
    return gm


def _find(gm, pred):
    return [n for n in gm.graph.nodes if pred(n)]


def test_matmul_spellings_are_one_view():
    a, b = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 6, 4)
    spellings = [
        lambda m, a, b: a @ b.transpose(-2, -1),
        lambda m, a, b: torch.matmul(a, b.mT),
        lambda m, a, b: a.matmul(b.permute(0, 1, 3, 2)),
        lambda m, a, b: torch.einsum("bhqd,bhkd->bhqk", a, b),
    ]
    for fn in spellings:
        gm = _trace(fn, a, b)
        (mm,) = _find(gm, lambda n: op_kind(n, gm) in ("matmul", "einsum"))
        view = as_matmul(mm, gm)
        base, perm, _ = strip_permutes(view.rhs, gm)
        if view.rhs_perm is not None:
            from recopt.graph import compose
            perm = compose(perm, view.rhs_perm)
        assert base.op == "placeholder" and base.target == "b"
        assert perm == (0, 1, 3, 2)


def test_einsum_with_broadcast_and_head_dims():
    from recopt.graph.canon import _einsum_view
    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    for eq, lp, rp, op in [("bkd,ke->bde", (0, 2, 1), None, None),
                           ("bthd,bfhd->bthf", (0, 2, 1, 3), (0, 2, 3, 1), (0, 2, 1, 3)),
                           ("btd,bfd->btf", None, (0, 2, 1), None)]:
        n = g.call_function(torch.einsum, (eq, x, w))
        v = _einsum_view(n)
        assert (v.lhs_perm, v.rhs_perm, v.out_perm) == (lp, rp, op), eq
    n = g.call_function(torch.einsum, ("bij,bjk,bkl->bil", x, w, w))
    assert _einsum_view(n) is None
    n = g.call_function(torch.einsum, ("bij,bj->b", x, w))
    assert _einsum_view(n) is None


def test_permute_spellings():
    x = torch.randn(2, 3, 4)
    gm = _trace(lambda m, x, _: (x.transpose(1, 2), x.mT, x.permute(2, 0, 1), torch.transpose(x, 0, -1)), x)
    perms = [as_permute(n, gm)[1] for n in gm.graph.nodes if as_permute(n, gm) is not None]
    assert sorted(perms) == sorted([(0, 2, 1), (0, 2, 1), (2, 0, 1), (2, 1, 0)])


def test_activation_module_vs_functional():
    x = torch.randn(2, 4)
    gm = _trace(lambda m, x, _: (m.gelu(x), F.gelu(x, approximate="tanh"), F.gelu(x), F.silu(x),
                              torch.relu(x), F.leaky_relu(x, 0.2), x.softmax(-1)), x)
    names = [(a.name, a.unsupported) for a in (as_activation(n, gm) for n in gm.graph.nodes) if a]
    assert [n for n, _ in names] == ["gelu_tanh", "gelu_tanh", "gelu", "silu", "relu", None, "softmax"]
    assert "slope 0.2" in names[5][1]


def test_linear_spellings():
    x = torch.randn(2, 4)
    w = torch.randn(3, 4)
    gm = _trace(lambda m, x, w: (m.lin(x), F.linear(x, w), torch.addmm(m.lin.bias, x, w.t())), x, w)
    views = [as_linear(n, gm) for n in gm.graph.nodes]
    assert [v.spelling for v in views if v] == ["nn.Linear", "linear", "addmm"]


def test_const_value_reads_shapes_not_data():
    x = torch.randn(2, 6)
    gm = _trace(lambda m, x, _: (torch.arange(x.shape[1])[:, None] - torch.arange(x.size(1))[None, :]).abs() <= 1, x)
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    val = const_value(gm, out)
    assert val.shape == (6, 6) and bool(val[0, 1]) and not bool(val[0, 2])
    gm = _trace(lambda m, x, _: x * 2, x)
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    assert const_value(gm, out) is None
