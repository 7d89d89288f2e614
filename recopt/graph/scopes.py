"""Module scopes of graph nodes, and forward FLOPs per node and per scope.

A node's scope is the dotted path of the module it was traced in
(``towers.0.blocks.1``), read from ``node.meta["nn_module_stack"]`` (recorded
by both ``symbolic_trace`` and Dynamo) or a ``call_module`` target.
:func:`node_flops` counts each node's FLOPs over one run with
:class:`recopt.costs.FlopCounter`; :func:`flops_by_prefix` sums them by scope.
Used by the Kunlun passes and by :func:`recopt.models.personalize_event_towers`.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
import torch.fx as fx

from recopt.costs import FlopCounter

_INDEX_RE = re.compile(r"\[(?:'([^']*)'|(\d+))\]")
# Dynamo names the root module after forward's first parameter: L['self'], or L['s'] where
# forward is written ``def forward(s, x)``; older names read L__self___.
_ROOT_RE = re.compile(r"^(?:L\['[A-Za-z_][A-Za-z0-9_]*'\]\.?|L__[A-Za-z_][A-Za-z0-9_]*?___)")


def normalize_path(path: str) -> str:
    """``L['self'].towers[0].blocks[1]`` / ``towers.0.blocks.1@2`` -> ``towers.0.blocks.1``."""
    path = _ROOT_RE.sub("", path.split("@")[0])
    path = path.replace("._modules", "")
    path = _INDEX_RE.sub(lambda m: "." + (m.group(1) or m.group(2)), path)
    return path.strip(".")


def scope_of(node: fx.Node) -> str:
    """The dotted module path ``node`` belongs to ("" for the top level)."""
    if node.op == "call_module":
        return normalize_path(str(node.target))
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        path = last[0] if isinstance(last, tuple) else str(last)
        return normalize_path(path)
    if node.op == "get_attr":
        return normalize_path(str(node.target).rpartition(".")[0])
    return ""


def in_scope(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def nodes_in_scope(gm: fx.GraphModule, prefix: str) -> list:
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and in_scope(scope_of(n), prefix)]


class _PerNodeFlops(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.flops: dict = {}
        self.failed: dict = {}   # op name -> "ExcType: message (node name)" of a formula that raised

    def run_node(self, n):
        with FlopCounter() as c:
            out = super().run_node(n)
        if c.total:
            self.flops[n.name] = float(c.total)
        for op, why in c.failed.items():
            self.failed.setdefault(op, f"{why} (node {n.name})")
        return out


def node_flops_and_failures(gm: fx.GraphModule, args: tuple) -> tuple:
    """``(node_flops(gm, args), {op name: why})``: the second names each op whose FLOP formula
    raised (counted as 0, so the per-node figures are too low where it ran)."""
    interp = _PerNodeFlops(gm)
    with torch.no_grad():
        interp.run(*args)
    return interp.flops, interp.failed


def node_flops(gm: fx.GraphModule, args: tuple) -> dict:
    """``{node name: forward FLOPs}`` of one run of ``gm`` on ``args`` (no grad)."""
    interp = _PerNodeFlops(gm)
    with torch.no_grad():
        interp.run(*args)
    return interp.flops


def flops_by_prefix(gm: fx.GraphModule, flops: dict, prefixes: Iterable[str]) -> dict:
    """Sum ``flops`` (from :func:`node_flops`) over the nodes in each module prefix."""
    names = {n.name: scope_of(n) for n in gm.graph.nodes}
    return {p: sum(f for name, f in flops.items() if name in names and in_scope(names[name], p))
            for p in prefixes}


def module_path_of(node: fx.Node) -> str:
    """The dotted path of the module a node came from, or "" if unknown.

    ``call_module`` nodes name their module; for other nodes the last entry
    of ``nn_module_stack`` (kept by Dynamo capture) or the recorded source is
    used.
    """
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        path = last[0] if isinstance(last, tuple) else str(last)
        return _ROOT_RE.sub("", path)
    return node.meta.get("recopt_module_path", "")
