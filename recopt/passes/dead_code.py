"""dead_code: remove nodes whose results nobody uses.

Side-effecting calls (in-place ops, RNG-free impure ops that fx knows
about) are kept by ``Graph.eliminate_dead_code``; each removed node is
reported as a rewritten site.
"""
from __future__ import annotations

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
        gm.graph.eliminate_dead_code()
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
