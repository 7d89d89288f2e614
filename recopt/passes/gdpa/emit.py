"""Graph-building helpers shared by the attention rewrites (layouts, masks, scalars, metadata)."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from recopt.graph import attention as A
from recopt.graph import canon as C
from recopt.graph.nodes import node_dtype, node_shape




def _scalar_expr(g, value: float, nodes: list):
    """``value`` times/divided by shape-derived scalar nodes, as a graph value."""
    out = value
    for node, op in nodes:
        out = g.call_function(operator.mul if op == "mul" else operator.truediv, (out, node))
    return out


def _permuted(shape, perm):
    if shape is None:
        return None
    return tuple(shape[p] for p in perm) if perm is not None else tuple(shape)


def _swap(shape):
    return tuple(shape[:-2]) + (shape[-1], shape[-2])


def _broadcast(*shapes):
    return tuple(torch.broadcast_shapes(*[torch.Size(s) for s in shapes]))


def _permute(g: fx.Graph, node, perm):
    if perm is None or C.is_identity(perm):
        return node
    return g.call_method("permute", (node, *perm))


def _materialize(g, f):
    if isinstance(f, A.Negated):
        return g.call_function(operator.invert, (f.node,))
    return f


def _mask_shape(f) -> tuple:
    return tuple(node_shape(f.node if isinstance(f, A.Negated) else f))


def _key_mask_column(g, f):
    """A key mask over [*batch, 1, Tk] (or [Tk]) as a column [*batch, Tk, 1] to multiply k."""
    shape = _mask_shape(f)
    m = _materialize(g, f)
    if len(shape) >= 2:
        m = g.call_function(torch.select, (m, -2, 0))
        shape = shape[:-2] + shape[-1:]
    return g.call_method("unsqueeze", (m, -1)), shape + (1,)


def _zero_bias_where_masked(g, bias, factors, rank: int, nb: int):
    """The 4-D ``bias`` times each query/key zero mask (score layout): q/k masks are folded
    into q and k, which zeroes ``q·k`` but not the bias, and ``act(bias) != 0``."""
    for f in factors:
        m = _materialize(g, f)
        for _ in range(rank - len(_mask_shape(f))):
            m = g.call_method("unsqueeze", (m, 0))
        bias = g.call_function(operator.mul, (bias, _to4d(g, m, rank - 2, nb)))
    return bias


def _combine_softmax_mask(g, parts, rank: int, nb: int):
    """One SDPA attn_mask (bool keep or additive float) in [B, H, Tq, Tk] layout."""
    keep, bias = None, None
    for kind, node, flag in parts:
        r = len(node_shape(node) or ())
        for _ in range(rank - r):
            node = g.call_method("unsqueeze", (node, 0))
        node = _to4d(g, node, rank - 2, nb)
        if kind == "keep":
            k = g.call_function(operator.invert, (node,)) if flag else node
            keep = k if keep is None else g.call_function(operator.and_, (keep, k))
        else:
            b = node if flag > 0 else g.call_function(operator.neg, (node,))
            bias = b if bias is None else g.call_function(operator.add, (bias, b))
    if bias is None:
        return keep
    if keep is not None:
        bias = g.call_function(torch.masked_fill, (bias, g.call_function(operator.invert, (keep,)), float("-inf")))
    return bias


def _rebuild_shape_sources(g: fx.Graph, m1: C.MatmulView, chain: list):
    """``x.view_as(s)`` on a score node ``s`` (in the first matmul's layout) becomes
    ``x.view(shape)`` with ``shape = broadcast(q, X batch dims) + (Tq, Tk)`` read from q and X
    at run time, so the scores are not computed for their shape alone."""
    users = [(u, n) for n in chain for u in list(n.users) if A.shape_source_use(u, n)]
    if not users:
        return
    first = min((u for u, _ in users), key=lambda u: list(g.nodes).index(u))
    with g.inserting_before(first):
        sa = g.call_function(getattr, (_permute(g, m1.lhs, m1.lhs_perm), "shape"))
        sb = g.call_function(getattr, (_permute(g, m1.rhs, m1.rhs_perm), "shape"))
        batch = g.call_function(torch.broadcast_shapes, (g.call_function(operator.getitem, (sa, slice(None, -2))),
                                                         g.call_function(operator.getitem, (sb, slice(None, -2)))))
        tail = g.call_function(operator.add, (g.call_function(operator.getitem, (sa, slice(-2, -1))),
                                              g.call_function(operator.getitem, (sb, slice(-1, None)))))
        shape = g.call_function(operator.add, (g.call_function(tuple, (batch,)), g.call_function(tuple, (tail,))))
    for u, _ in users:
        u.target = {"view_as": "view", "reshape_as": "reshape", "expand_as": "expand"}[u.target]
        u.args = (u.args[0], shape)


def _training_flag(g: fx.Graph) -> fx.Node:
    """``self.training`` of the graph module, read at run time (so ``.train()``/``.eval()``
    of the optimized model switch dropout on and off as in the original)."""
    return g.create_node("get_attr", "training")


def _scaled_bias(g, b, plan: A.AttentionPlan):
    """The bias as GDPA adds it: after the whole pre-activation scale.

    ``(s + b) * c`` is ``c*s + c*b``: scale factors applied after the bias
    scale it too (constants and shape-derived scalars alike)."""
    node = b.node
    ratio = plan.pre_scale / b.pre_scale_at
    if ratio != 1.0:
        node = g.call_function(operator.mul, (node, ratio))
    for sc, op in plan.pre_nodes[b.pre_nodes_at:]:
        node = g.call_function(operator.mul if op == "mul" else operator.truediv, (node, sc))
    if node is not b.node:
        _copy_meta(node, b.node)   # same shape: _combine_softmax_mask reads its rank
    # ``(s + b) * t`` with a tensor t constant along the keys ([B, 1, 1], [B, Tq, 1]): t is
    # folded into q (scaling q·k), so it must scale the bias too
    for t, op in plan.pre_tensors[b.pre_tensors_at:]:
        shape = _broadcast(node_shape(node), node_shape(t))
        node = g.call_function(operator.mul if op == "mul" else operator.truediv, (node, t))
        # shape metadata only (a meta tensor): _combine_softmax_mask reads the product's rank
        node.meta["val"] = torch.empty(shape, device="meta", dtype=node_dtype(b.node) or torch.float32)
    return node


def _lengths_expr(g, lens: list):
    """``[B]`` lengths from ``(node, offset)`` parts (the tightest when several)."""
    out = None
    for node, off in lens:
        x = g.call_method("reshape", (node, -1))
        if off:
            x = g.call_function(operator.add, (x, off))
        out = x if out is None else g.call_function(torch.minimum, (out, x))
    return out


def _to4d(g, node, nbatch: int, nb: int):
    """Give an operand with ``nbatch`` batch dims the [B, H, T, d] layout (nb = target batch rank)."""
    for _ in range(nb - nbatch):
        node = g.call_method("unsqueeze", (node, 0))
    if nb == 1:
        node = g.call_method("unsqueeze", (node, 1))
    elif nb == 0:
        node = g.call_method("unsqueeze", (g.call_method("unsqueeze", (node, 0)), 0))
    return node


def _from4d(g, node, nb: int):
    if nb == 1:
        return g.call_method("squeeze", (node, 1))
    if nb == 0:
        return g.call_method("squeeze", (g.call_method("squeeze", (node, 0)), 0))
    return node


def _copy_meta(new: fx.Node, old: fx.Node):
    for key in ("tensor_meta", "val", "nn_module_stack", "stack_trace"):
        if key in old.meta:
            new.meta[key] = old.meta[key]


