"""SDPA routing: ``F.scaled_dot_product_attention`` calls → GDPA's softmax mode.

``nn.MultiheadAttention`` reaches this as the SDPA call (or the softmax chain)
the ``decompose_attention`` pass opens it into. A dropout probability of the
form ``p * self.training`` (what that pass emits) follows the graph's mode:
in an eval graph it becomes GDPA's ``dropout_p`` with the run-time flag; in a
train graph the call stays SDPA (``sdpa_dropout``), whose dropout draws its
own random stream inside the kernel.
"""
from __future__ import annotations

import math
import operator

import torch.fx as fx

from recopt.graph import canon as C
from recopt.graph.nodes import node_shape
from recopt.ops import gdpa as gdpa_fn
from recopt.ops.gdpa import gdpa_flops
from recopt.ops.gdpa_softmax import static_note as softmax_note

from .emit import _copy_meta


def try_sdpa(p, gm, node, erased):
    if not p.config.sdpa_calls:
        return None
    q, k, v = node.args[:3]
    mask = C.arg(node, 3, "attn_mask")
    dropout = C.arg(node, 4, "dropout_p", 0.0)
    causal = C.arg(node, 5, "is_causal", False)
    scale = C.arg(node, 6, "scale")
    gqa = node.kwargs.get("enable_gqa", False)
    if causal and mask is not None:
        return p.rejected(node, "unsupported_op", "SDPA with both attn_mask and is_causal")
    if not isinstance(causal, bool):
        return p.rejected(node, "unsupported_op", f"is_causal={causal!r} is not a constant")
    graph_dropout = _mode_dropout(dropout)
    if graph_dropout is not None and gm.training:
        return p.rejected(node, "sdpa_dropout", f"dropout_p={graph_dropout} * self.training is live in this "
                          "train graph: SDPA draws its dropout inside the kernel, which GDPA cannot reproduce; "
                          "left as SDPA")
    if graph_dropout is None and dropout:
        return p.rejected(node, "sdpa_dropout", f"dropout_p={dropout}: left as SDPA")
    shapes = [node_shape(t) for t in (q, k, v)]
    if any(s is None or len(s) != 4 for s in shapes):
        return p.rejected(node, "rank", "SDPA call on non-4-D tensors: left as is")
    if not isinstance(scale, (int, float, type(None))):
        return p.rejected(node, "unsupported_op", "non-constant SDPA scale")
    if shapes[1][1] != shapes[0][1] and not gqa:
        return p.rejected(node, "unsupported_op", "head counts differ without enable_gqa")
    pre = float(scale) if scale is not None else 1.0 / math.sqrt(shapes[0][-1])
    kwargs = dict(activation="softmax", pre_scale=pre)
    if mask is not None:
        kwargs["attn_mask"] = mask
    if causal:
        kwargs["causal"] = True
    if graph_dropout is not None:
        kwargs["dropout_p"] = graph_dropout
        kwargs["training"] = dropout.args[1] if _is_training_attr(dropout.args[1]) else dropout.args[0]
    g = gm.graph
    with g.inserting_before(node):
        out = g.call_function(gdpa_fn, (q, k, v), kwargs)
    _copy_meta(out, node)
    node.replace_all_uses_with(out)
    g.erase_node(node)
    erased.add(node)
    B, H, Tq, d = shapes[0]
    fl = gdpa_flops(B, H, Tq, shapes[1][2], d, shapes[2][3])
    return p.rewritten(out, "sdpa: F.scaled_dot_product_attention routed through gdpa(softmax)",
                          flops_before=fl, flops_after=fl,
                          details={"pattern": "sdpa", "activation": "softmax",
                                   "kernel": softmax_note(dropout=graph_dropout is not None)})


def _is_training_attr(x) -> bool:
    return isinstance(x, fx.Node) and x.op == "get_attr" and x.target == "training"


def _mode_dropout(dropout):
    """``p`` when ``dropout`` is ``p * self.training`` (a float times the graph's mode flag)."""
    if isinstance(dropout, fx.Node) and dropout.op == "call_function" and dropout.target is operator.mul \
            and len(dropout.args) == 2:
        a, b = dropout.args
        for flag, p in ((a, b), (b, a)):
            if _is_training_attr(flag) and isinstance(p, float) and 0.0 < p < 1.0:
                return p
    return None
