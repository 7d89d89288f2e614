"""dead_code: remove nodes whose results nobody uses.

Side-effecting calls are kept (:func:`recopt.graph.nodes.has_side_effects`):
the impure ops fx knows about, in-place methods and functions
(``buf.add_(1)``: a buffer counter the graph keeps as a real mutation), and
random draws (removing an unused draw would shift every later draw, so
dropout masks would change). Each removed node is reported as a rewritten
site. The manager removes dead code with the same rule after every pass
(without reporting sites); this pass is how a pipeline reports it.
"""
from __future__ import annotations

import torch.fx as fx

from ..graph.nodes import has_side_effects
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
        gm.graph.eliminate_dead_code(is_impure_node=has_side_effects)
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
