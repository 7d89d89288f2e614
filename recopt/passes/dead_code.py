"""dead_code: remove nodes whose results nobody uses.

Side-effecting calls are kept: the impure ops fx knows about, in-place
methods and functions (``buf.add_(1)``: a buffer counter the graph keeps as
a real mutation), and random draws (removing an unused draw would shift
every later draw, so dropout masks would change). Each removed node is
reported as a rewritten site.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .base import Pass, PassContext, PassResult, Semantics
from .registry import register_pass


@register_pass
class DeadCodeElimination(Pass):
    name = "dead_code"
    semantics = Semantics.EXACT
    default_targets = ("*",)
    description = "Remove graph nodes whose results are never used."

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        before = {n.name: n for n in gm.graph.nodes}
        gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
        after = {n.name for n in gm.graph.nodes}
        sites = [
            self.rewritten(node, "result unused; removed")
            for name, node in before.items()
            if name not in after
        ]
        if sites:
            gm.delete_all_unused_submodules()
            gm.recompile()
        return PassResult(gm, sites)


_RANDOM_NAMES = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like",
                 "bernoulli", "multinomial", "normal", "poisson", "dropout", "native_dropout",
                 "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d",
                 "uniform_", "normal_", "exponential_", "geometric_", "log_normal_", "cauchy_", "random_"}


_OPERATOR_INPLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                     operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                     operator.ilshift, operator.irshift, operator.imatmul}


def _is_impure(node: fx.Node) -> bool:
    """fx's notion of impure, plus in-place ops and random draws."""
    if node.is_impure():
        return True
    if node.op not in ("call_method", "call_function"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if isinstance(node.target, torch._ops.OpOverload):
        name = node.target._schema.name.split("::")[-1]
        if node.target._schema.is_mutable:
            return True
    if name.endswith("_") and not name.endswith("__"):
        return True
    if node.target in _OPERATOR_INPLACE:  # x += y on a tensor is x.add_(y)
        return True
    if name in _RANDOM_NAMES:
        return True
    return bool(node.kwargs.get("out") is not None)
