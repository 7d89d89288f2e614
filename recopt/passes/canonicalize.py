"""remove_identity: drop operations that return their input unchanged.

Matches ``nn.Identity`` modules, ``F.dropout(..., training=False)``,
``x * 1``, ``x + 0`` (integer x only: on floats it turns -0.0 into +0.0),
``x - 0``, ``x / 1`` and ``x.to(d)`` / ``x.type(d)``
where ``x`` already has dtype ``d``. Arithmetic with a constant is removed
only when the result has the input's shape and dtype (broadcasting or type
promotion would change them), which ``tensor_meta`` tells.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..graph import canon as C
from ..graph.nodes import tidy_graph
from .base import Pass, PassContext, PassResult, Semantics
from .registry import register_pass

# By canonical op kind (recopt.graph.canon.op_kind: every spelling of mul/div/add/sub).
_NEUTRAL = {"mul": 1, "div": 1, "add": 0, "sub": 0}
_RIGHT_ONLY = {"div", "sub"}
# x + 0 is not the identity on floats: -0.0 + 0 is +0.0 (and 1/x then flips
# sign). It is removed only for integer and bool results; x - 0 keeps -0.0.
_FLOAT_UNSAFE = {"add"}


def _meta(n):
    return n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None


@register_pass
class RemoveIdentity(Pass):
    name = "remove_identity"
    semantics = Semantics.EXACT
    default_targets = ("*",)
    before = ("dead_code",)
    description = "Remove operations that return their input unchanged."

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sites = []
        modules = dict(gm.named_modules())
        for node in list(gm.graph.nodes):
            src, why = self._identity_source(node, modules)
            if src is None:
                if why:
                    sites.append(self.rejected(node, *why))
                continue
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            sites.append(self.rewritten(node, "returns its input unchanged; removed"))
        if any(s.status == "rewritten" for s in sites):
            tidy_graph(gm)
            gm.delete_all_unused_submodules()
        return PassResult(gm, sites)

    def _identity_source(self, node: fx.Node, modules: dict):
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.Identity):
            return node.args[0], None
        if node.op == "call_function" and node.target is F.dropout:
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            if training is False:
                return node.args[0], None
            return None, None
        key = node.target if node.op in ("call_function", "call_method") else None
        if key in ("to", "type") and node.op == "call_method" and len(node.args) == 2 and not node.kwargs:
            x, d = node.args
            m = _meta(x)
            if isinstance(d, torch.dtype) and m is not None and m.dtype == d:
                return x, None
            return None, None
        kind = C.op_kind(node) if key is not None else None
        if kind in _NEUTRAL and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            neutral = _NEUTRAL[kind]
            for x, c in ((a, b), (b, a)):
                if c is b or kind not in _RIGHT_ONLY:
                    if isinstance(x, fx.Node) and isinstance(c, (int, float)) and not isinstance(c, bool) and c == neutral:
                        mx, mo = _meta(x), _meta(node)
                        if mx is None or mo is None:
                            return None, ("no_shape_info", "no shape/dtype metadata to prove the op is a no-op")
                        if mx.shape != mo.shape or mx.dtype != mo.dtype:
                            return None, ("changes_dtype_or_shape",
                                          f"arithmetic with {c} changes dtype/shape ({mx.dtype}→{mo.dtype}); kept")
                        if kind in _FLOAT_UNSAFE and (mx.dtype.is_floating_point or mx.dtype.is_complex):
                            return None, ("signed_zero",
                                          "x + 0 turns -0.0 into +0.0 on floating types; kept")
                        return x, None
        return None, None
