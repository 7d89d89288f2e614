"""Finding GEMM sites in a traced graph: both spellings, the final head, producers and consumers.

A *site* is one linear GEMM with a parameter weight:

- ``call_module`` to an ``nn.Linear`` (symbolic tracing);
- ``call_function`` ``F.linear`` / ``torch._C._nn.linear`` whose weight is a
  ``get_attr`` (Dynamo capture);
- ``call_function`` ``torch.matmul`` / ``@`` whose right operand is a 2-D
  ``get_attr`` parameter (weight stored K×N).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..graph import canon as C
from ..graph.nodes import get_attr_value
from ..graph.scopes import module_path_of
from ..modules.blocknorm import BlockNorm

NORM_MODULES = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
NORM_FUNCS = {F.layer_norm, torch.layer_norm} | ({F.rms_norm} if hasattr(F, "rms_norm") else set())
SIGMOID_FUNCS = {torch.sigmoid, F.sigmoid}
_PASSTHROUGH_METHODS = {"view", "reshape", "contiguous", "flatten", "squeeze", "unsqueeze", "to", "float"}


@dataclass
class GemmSite:
    """One linear site: its node, spelling, FQN, K/N, and the node feeding its input."""

    node: fx.Node
    kind: str  # "module" | "linear_fn" | "matmul"
    fqn: str
    k: int
    n: int
    input: fx.Node
    has_bias: bool
    weight: Optional[torch.Tensor] = None


def find_sites(gm: fx.GraphModule) -> list:
    """Every linear site of ``gm`` in graph order (FP8Linear modules excluded)."""
    from .linear import FP8Linear

    modules = dict(gm.named_modules())
    sites = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = modules.get(node.target)
            if isinstance(mod, nn.Linear) and not isinstance(mod, FP8Linear) and node.args:
                sites.append(GemmSite(node, "module", str(node.target), mod.in_features, mod.out_features,
                                      node.args[0], mod.bias is not None, mod.weight))
        elif node.op == "call_function" and C.op_kind(node) == "linear":
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if isinstance(w, fx.Node) and w.op == "get_attr":
                wt = get_attr_value(gm, w)
                if isinstance(wt, torch.Tensor) and wt.dim() == 2:
                    # Dynamo names parameters L__self___a_b_weight; its nn_module_stack has the real path.
                    fqn = module_path_of(node) or (w.target[: -len(".weight")] if w.target.endswith(".weight")
                                                   else w.target)
                    sites.append(GemmSite(node, "linear_fn", fqn, wt.shape[1], wt.shape[0], node.args[0],
                                          b is not None, wt))
        elif node.op == "call_function" and C.op_kind(node) == "matmul" and len(node.args) == 2:
            w = node.args[1]
            if isinstance(w, fx.Node) and w.op == "get_attr":
                wt = get_attr_value(gm, w)
                if isinstance(wt, torch.Tensor) and wt.dim() == 2 and isinstance(node.args[0], fx.Node):
                    sites.append(GemmSite(node, "matmul", w.target, wt.shape[0], wt.shape[1], node.args[0],
                                          False, wt))
    return sites


def head_sites(gm: fx.GraphModule, sites: list) -> set:
    """Names of the sites that feed the graph output with no other site in between (the heads)."""
    site_names = {s.node.name for s in sites}
    heads, seen = set(), set()
    stack = [n for n in gm.graph.nodes if n.op == "output"]
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        if n.name in site_names:
            heads.add(n.name)
            continue
        stack.extend(n.all_input_nodes)
    return heads


def op_label(gm: fx.GraphModule, node: fx.Node) -> str:
    """A short, stable label of what a node computes (``layer_norm``, ``silu``, ``linear`` …)."""
    if node.op == "call_module":
        mod = dict(gm.named_modules()).get(node.target)
        name = type(mod).__name__
        return {"LayerNorm": "layer_norm", "RMSNorm": "rms_norm", "SiLU": "silu", "Sigmoid": "sigmoid",
                "Hardswish": "hardswish", "ReLU": "relu", "GELU": "gelu", "BlockNorm": "blocknorm",
                "Linear": "linear", "FP8Linear": "linear"}.get(name, name)
    if node.op == "call_function":
        t = node.target
        if t in NORM_FUNCS:
            return "rms_norm" if "rms" in getattr(t, "__name__", "") else "layer_norm"
        if C.op_kind(node) == "linear":
            return "linear"
        return getattr(t, "__name__", str(t)).lstrip("_")
    if node.op == "call_method":
        return str(node.target)
    return node.op


def consumer_of(gm: fx.GraphModule, node: fx.Node) -> str:
    """Label of the consumer pattern of a site's output: swish / swish_norm detected across users."""
    users = list(node.users)
    labels = []
    for u in users:
        lab = op_label(gm, u)
        if lab in ("mul",) and is_swish_mul(gm, u) is not None:
            lab = is_swish_mul(gm, u)[0]
        elif lab == "sigmoid":
            # x * sigmoid(x) where this node is x
            for uu in u.users:
                sw = is_swish_mul(gm, uu)
                if sw is not None:
                    lab = sw[0]
        labels.append(lab)
    return "+".join(sorted(set(labels))) or "output"


def is_sigmoid(gm: fx.GraphModule, node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target in SIGMOID_FUNCS:
        return True
    if node.op == "call_method" and node.target == "sigmoid":
        return True
    if node.op == "call_module":
        return isinstance(dict(gm.named_modules()).get(node.target), nn.Sigmoid)
    return False


def is_norm(gm: fx.GraphModule, node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_module":
        return isinstance(dict(gm.named_modules()).get(node.target), NORM_MODULES + (BlockNorm,))
    return node.op == "call_function" and node.target in NORM_FUNCS


def is_swish_mul(gm: fx.GraphModule, node: fx.Node):
    """For ``x * sigmoid(x)`` → ("swish", x, sig); ``x * sigmoid(norm(x))`` → ("swish_norm", x, sig); else None."""
    if node.op != "call_function" or C.op_kind(node) != "mul" or len(node.args) != 2:
        return None
    for x, s in (node.args, node.args[::-1]):
        if isinstance(x, fx.Node) and is_sigmoid(gm, s):
            inner = s.args[0] if s.args else None
            if inner is x:
                return ("swish", x, s)
            if is_norm(gm, inner) and inner.args and inner.args[0] is x:
                return ("swish_norm", x, s)
    return None


def site_rows(node: fx.Node, k: int) -> Optional[int]:
    """M of a site from the input's shape metadata (numel / K), or None."""
    tm = node.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    if shape is None:
        val = node.meta.get("val")
        shape = getattr(val, "shape", None)
    if shape is None or k == 0:
        return None
    numel = 1
    for d in shape:
        numel *= int(d)
    return numel // k


def fqn_of(site: GemmSite) -> str:
    return site.fqn or module_path_of(site.node) or site.node.name
