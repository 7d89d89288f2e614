"""The one copy of each graph-module edit helper (recopt.graph.nodes): get_attr_value,
set_submodule, fresh_attr_name, and the passes that use them."""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from recopt.graph.nodes import fresh_attr_name, get_attr_value, set_submodule


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])
        self.seq = nn.Sequential(nn.ReLU(), nn.Tanh())
        self.register_buffer("scale", torch.tensor(2.5))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.seq(x) * self.scale + self.blocks[0].bias


def test_get_attr_value_by_node_and_by_target():
    gm = fx.symbolic_trace(_Net())
    attrs = [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert {str(n.target) for n in attrs} == {"scale", "blocks.0.bias"}
    for n in attrs:
        assert get_attr_value(gm, n) is get_attr_value(gm, str(n.target))
    assert get_attr_value(gm, "blocks.0.bias") is gm.get_submodule("blocks.0").bias
    with pytest.raises(AttributeError, match="no 'nope'"):
        get_attr_value(gm, "blocks.0.nope")


def test_set_submodule_replaces_list_and_sequential_children_and_runs():
    net = _Net()
    x = torch.randn(2, 3)
    set_submodule(net, "blocks.1", nn.Identity())
    set_submodule(net, "seq.0", nn.Identity())
    assert isinstance(net.blocks[1], nn.Identity) and isinstance(net.seq[0], nn.Identity)
    assert len(net.blocks) == 2 and len(net.seq) == 2
    expected = torch.tanh(net.blocks[0](x)) * 2.5 + net.blocks[0].bias
    torch.testing.assert_close(net(x), expected)
    with pytest.raises(AttributeError, match="parent 'missing'"):
        set_submodule(net, "missing.x", nn.ReLU())
    with pytest.raises(ValueError, match="non-empty path"):
        set_submodule(net, "", nn.ReLU())


def test_fresh_attr_name_never_shadows_modules_parameters_buffers_or_methods():
    net = _Net()
    assert fresh_attr_name(net, "new") == "new"
    assert fresh_attr_name(net, "blocks") == "blocks_1"
    assert fresh_attr_name(net, "scale") == "scale_1"
    assert fresh_attr_name(net, "forward") == "forward_1"
    assert fresh_attr_name(net, "blocks.0_hswish") == "blocks_0_hswish"
    assert fresh_attr_name(net, "0x") == "_0x"
    net.add_module("blocks_1", nn.ReLU())
    assert fresh_attr_name(net, "blocks") == "blocks_2"


def test_no_private_copies_of_the_helpers_in_recopt():
    """The passes use these helpers; no module keeps a private copy under the old names."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "recopt"
    pat = re.compile(r"^def (_get_attr|_set_submodule|_new_name|_free_attr)\(", re.M)
    copies = [f"{p.relative_to(root)}: {m.group(1)}" for p in root.rglob("*.py") for m in pat.finditer(p.read_text())]
    assert not copies, copies
