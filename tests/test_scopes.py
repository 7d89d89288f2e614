"""Module paths read from Dynamo's nn_module_stack, whatever forward's first parameter is called."""
import torch
import torch.nn as nn

from recopt.graph.scopes import module_path_of, normalize_path


class _Block(nn.Module):
    def __init__(s):
        super().__init__()
        s.a = nn.Linear(4, 4)

    def forward(s, x):                       # not "self": Dynamo names the root L['s']
        return torch.relu(s.a(x))


class _Model(nn.Module):
    def __init__(s):
        super().__init__()
        s.blocks = nn.Sequential(_Block(), _Block())

    def forward(s, x):
        return s.blocks(x)


def test_module_paths_do_not_carry_dynamos_root_name():
    gm, _ = torch._dynamo.export(_Model())(torch.randn(2, 4))
    paths = {module_path_of(n) for n in gm.graph.nodes if n.meta.get("nn_module_stack")}
    assert {"blocks.0.a", "blocks.1.a"} <= paths, paths
    assert not any("L[" in p or p.startswith("L__") for p in paths), paths


def test_normalize_path_spellings():
    assert normalize_path("L['self'].towers[0].blocks[1]") == "towers.0.blocks.1"
    assert normalize_path("L['s'].blocks.0.a") == "blocks.0.a"
    assert normalize_path("towers.0.blocks.1@2") == "towers.0.blocks.1"
    assert normalize_path("L__self___a") == "a"
    assert normalize_path("L['self']") == ""
