"""One attention matcher: the region ``scores -> [bias] -> mask -> normaliser -> [scale] -> @ v``.

:func:`match_attention` is pure: it reads an fx graph (shapes from
``node.meta``) and returns an :class:`AttentionMatch` describing the region
anchored at the second matmul ``o = P @ v`` — or raises :class:`Mismatch`
with a stable reason code. Nothing is emitted here; a pass that gets a match
rewrites without rejecting.

The region, walking back from ``P @ v`` to a first matmul ``S = q @ X``
(``@``/matmul/bmm/einsum/baddbmm, any transpose/permute spelling)::

    S -> [scale] -> [+ bias] -> [mask] -> softmax | pointwise act | none
      -> [scale, per-row factor] -> [dropout] -> @ v

- **scale**: Python numbers and shape-derived scalars (``1/sqrt(q.size(-1))``),
  kept as graph values so they follow the runtime shape; tensors constant
  along the keys (a literal size-1 key dim, read symbolically) scale q or the
  output rows;
- **masks** (``where``/``masked_fill``/bool or 0/1 multiply, additive for
  softmax) are read by :mod:`recopt.graph.masks` from how they are built:
  causal, band(w), key/query lengths, key/query masks — never from the
  example's sizes;
- **normaliser**: softmax over the keys, a pointwise activation GDPA has, or
  none; a fully-masked softmax row follows the model's fill (uniform for a
  finite fill, NaN for ``-inf``);
- **layout**: heads and batch dims up to two, GQA/broadcast through size-1
  dims; the key is taken as the transpose of what the first matmul
  multiplies by, as computed.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from recopt.ops import gdpa_ref as R

from . import canon as C
from . import masks as M
from .nodes import (const_value, depends_on_inputs, get_module, is_parameter, is_shape_scalar, node_dtype,
                    node_shape)

class Mismatch(Exception):
    """The region is not expressible: ``code`` (stable, for tools) and ``reason`` (for people)."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason

_MAX_CHAIN = 16
_CHAIN_KINDS = {
    "permute", "transpose", "t", "permute_attr", "view", "identity", "cast", "dropout",
    "gelu", "silu", "relu", "leaky_relu", "hardswish", "softmax", "sigmoid",
    "mul", "div", "add", "sub", "neg", "pow", "square", "where", "masked_fill",
}


@dataclass
class _Mask:
    node: fx.Node          # bool tensor
    invert: bool           # True: node marks dropped scores
    fill: Any              # python float, or "mul" for a bool multiply (fill 0)
    post: bool             # applied after the activation
    pre_scale_at: float    # pre_scale accumulated when the mask was applied


@dataclass
class _Bias:
    node: fx.Node
    sign: float
    pre_scale_at: float    # pre_scale accumulated when the bias was added
    pre_nodes_at: int      # shape-derived pre-scale factors seen by then
    masks_before: int      # masks applied to the scores before the bias
    pre_tensors_at: int = 0  # tensor pre-scale factors (constant along the keys) seen by then


@dataclass
class _Plan:
    act: str = "raw"
    pre_scale: float = 1.0
    qk_scale: float = 1.0
    pre_nodes: list = field(default_factory=list)     # shape-derived scalar nodes: (node, op)
    post_nodes: list = field(default_factory=list)
    pre_tensors: list = field(default_factory=list)   # (node, op) with op in mul/div
    post_tensors: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    biases: list = field(default_factory=list)        # _Bias
    masked_rows: str = "zero"                         # softmax: rows with no kept key
    dropout: Optional[tuple] = None                   # (p, True | "graph") on activated scores
    notes: list = field(default_factory=list)


class _Lazy:
    """A mask factor to be negated when emitted (``~mask``)."""

    def __init__(self, op, node):
        self.op, self.node = op, node
        self.name = f"~{node.name}"


def _label(n: fx.Node) -> str:
    if n.op == "call_module":
        return f"{n.name} (module {n.target})"
    return f"{n.name} ({getattr(n.target, '__name__', n.target)})"



def _side_inputs(nodes: list, depth: int) -> set:
    """Nodes feeding ``nodes`` through their inputs, up to ``depth`` steps back."""
    out: set = set()
    frontier = list(nodes)
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if a not in out:
                    out.add(a)
                    nxt.append(a)
        frontier = nxt
    return out



def _other_operand(n: fx.Node, main) -> Any:
    args = list(n.args[:2]) if len(n.args) >= 2 else list(n.args) + list(n.kwargs.values())
    for a in args:
        if a is not main:
            return a
    return None



def _and_factors(gm, node) -> list:
    """Split ``a & b & c`` into its factors (only nodes used by this product)."""
    if C.op_kind(node, gm) == "and" and all(isinstance(a, fx.Node) for a in node.args[:2]):
        return _and_factors(gm, node.args[0]) + _and_factors(gm, node.args[1])
    return [node]



def _main_input(gm, node) -> Optional[fx.Node]:
    """The input of a chain node that carries the score tensor."""
    kind = C.op_kind(node, gm)
    shape = node_shape(node)
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if kind in ("where",):
        cands = [a for a in node.args[1:3] if isinstance(a, fx.Node)]
        # where(pad, full_like(s, -inf), s): the fill has the scores' shape too, but is a constant
        cands = [a for a in cands if _constant_fill(gm, a) is None] or cands
        full = [a for a in cands if node_shape(a) == shape]
        return (full or cands or [None])[0]
    if kind in ("mul", "div", "add", "sub"):
        full = [a for a in tensors if node_shape(a) == shape and node_dtype(a) != torch.bool]
        if full:
            return full[0]
        return tensors[0] if tensors else None
    if kind == "einsum":
        return None
    if node.args and isinstance(node.args[0], fx.Node):
        return node.args[0]
    full = [a for a in tensors if node_shape(a) == shape]
    return full[0] if full else None


def _find_chain(gm, m2: C.MatmulView):
    """(first matmul view, path of nodes from after it up to m2's lhs) or None."""
    cur = m2.lhs
    path = []
    for _ in range(_MAX_CHAIN):
        if not isinstance(cur, fx.Node) or cur.op in ("placeholder", "get_attr", "output"):
            return None
        m1 = C.as_matmul(cur, gm)
        if m1 is None:
            bad = C.as_baddbmm(cur, gm)
            m1 = bad.matmul if bad is not None else None
        if m1 is not None:
            return m1, list(reversed(path))
        # Walk only through ops that can sit between attention matmuls
        # (plus reductions, so "softmax-like" normalisations are reported).
        if C.op_kind(cur, gm) not in _CHAIN_KINDS | {"reduction"}:
            return None
        nxt = _main_input(gm, cur)
        if nxt is None:
            return None
        path.append(cur)
        cur = nxt
    return None


def _analyze(gm, m1: C.MatmulView, m2: C.MatmulView, path: list, convert_nan_masks: bool = False) -> _Plan:
    plan = _Plan()
    bad = C.as_baddbmm(m1.node, gm)
    if bad is not None:   # scores = beta*input + alpha*(q kᵀ)
        if isinstance(bad.alpha, fx.Node):
            if not is_shape_scalar(bad.alpha):
                raise Mismatch("score_scaled_by_tensor", f"{m1.node.name}: alpha is not a constant")
            plan.pre_nodes.append((bad.alpha, "mul"))
        else:
            plan.pre_scale *= bad.alpha
        if bad.beta != 0.0 and bad.input is not None:
            if not isinstance(bad.input, fx.Node):
                raise Mismatch("score_bias", f"{m1.node.name} adds a constant to the scores")
            # GDPA adds bias * (pre-scale after the add); the add comes after
            # alpha, and beta folds into the recorded scale.
            plan.biases.append(_Bias(bad.input, 1.0, plan.pre_scale / bad.beta,
                                     len(plan.pre_nodes), 0))
    chain = [m1.node] + path
    feeding = _side_inputs(chain[1:] + [m2.node], depth=3)
    # nodes holding the scores in the first matmul's own layout ([*batch, Tq, Tk]): a
    # ``x.view_as(node)`` there reads a shape the rewrite can rebuild from q and k
    canonical = set()
    if m1.out_perm is None:
        for n in chain:
            if C.op_kind(n, gm) in ("permute", "transpose", "t", "permute_attr", "view") \
                    or node_shape(n) != node_shape(m1.node):
                break
            canonical.add(n)
    for i, n in enumerate(chain):
        expected = chain[i + 1] if i + 1 < len(chain) else m2.node
        others = [u for u in n.users if u is not expected and not _reads_only_shape(u, n)
                  and not (n in canonical and shape_source_use(u, n))]
        if others:
            kinds = {C.op_kind(u, gm) for u in others}
            if kinds & {"reduction", "softmax"} and any(u in feeding for u in others):
                raise Mismatch("reduction_between_matmuls",
                              f"{n.name} is reduced by {', '.join(u.name for u in others)} "
                              "between the matmuls (a row normalisation GDPA does not compute)")
            raise Mismatch("score_used_twice",
                          f"{n.name} is also used by {', '.join(u.name for u in others)}; "
                          "fusing would drop that use")
    rank = len(node_shape(m1.node) or ())
    if not rank:
        raise Mismatch("shape_unknown", f"no shape metadata on {m1.node.name}")
    cur_perm = m1.out_perm or tuple(range(rank))
    reshaped = False
    prev_kind = None
    wrong_softmax = None
    for n in path:
        kind = C.op_kind(n, gm)
        if kind not in _CHAIN_KINDS:
            code = "reduction_between_matmuls" if kind == "reduction" else "unsupported_op"
            raise Mismatch(code, f"{_label(n)} between the matmuls is not expressible in GDPA")
        act_seen = plan.act != "raw" or any(isinstance(x, str) and x == "act" for x in plan.notes)
        if kind in ("permute", "transpose", "t", "permute_attr"):
            p = C.as_permute(n, gm)
            if p is None or reshaped:
                raise Mismatch("layout", f"cannot follow the layout change at {n.name}")
            cur_perm = C.compose(cur_perm, p[1])
        elif kind == "view":
            reshaped = node_shape(n) != node_shape(m1.node) or not C.is_identity(cur_perm)
        elif kind in ("identity", "cast"):
            pass
        elif kind == "dropout":
            _check_dropout(gm, n, plan, act_seen)
        elif kind in ("gelu", "silu", "relu", "leaky_relu", "hardswish", "softmax", "sigmoid"):
            av = C.as_activation(n, gm)
            if av.name is None:
                raise Mismatch("activation_unsupported", f"{_label(n)}: {av.unsupported}")
            if act_seen:
                raise Mismatch("two_activations", f"second activation {_label(n)}")
            if av.name == R.SOFTMAX:
                dim = av.dim if av.dim is not None else -1
                if not isinstance(dim, int):
                    raise Mismatch("softmax_wrong_dim", f"softmax dim {dim!r} is not static")
                dim = dim + rank if dim < 0 else dim
                if reshaped or cur_perm[dim] != rank - 1:
                    # raised after the walk: scores computed keys-first get a clearer reason
                    wrong_softmax = Mismatch("softmax_wrong_dim",
                                             f"{n.name} normalises over dim {dim}, not over the keys")
            plan.act = av.name
            plan.notes.append("act")
        elif kind in ("pow", "square") or (kind == "mul" and n.args[0] is n.args[1]):
            exp2 = kind == "square" or kind == "mul" or C.scalar(C.arg(n, 1, "exponent")) == 2.0
            if plan.act == "relu" and prev_kind == "relu" and exp2:
                plan.act = "relu_square"
            else:
                raise Mismatch("unsupported_op", f"{_label(n)} is not relu(x)**2")
        elif kind in ("mul", "div", "neg"):
            _scale_or_mask(gm, n, kind, plan, act_seen, cur_perm, reshaped)
        elif kind in ("add", "sub"):
            other = _other_operand(n, _main_input(gm, n))
            if not isinstance(other, fx.Node):
                raise Mismatch("score_bias", f"{_label(n)} adds a constant to the scores")
            if act_seen:
                raise Mismatch("unsupported_op", f"{_label(n)} adds to the activated scores")
            _require_canonical(n, cur_perm, reshaped)
            plan.biases.append(_Bias(other, 1.0 if kind == "add" else -1.0, plan.pre_scale,
                                     len(plan.pre_nodes), len(plan.masks), len(plan.pre_tensors)))
        elif kind in ("where", "masked_fill"):
            _require_canonical(n, cur_perm, reshaped)
            plan.masks.append(_mask_of(gm, n, act_seen, plan.pre_scale))
        prev_kind = kind if kind not in ("identity", "cast") else prev_kind
    # The second matmul must read the scores with keys on its contraction axis.
    lhs2 = m2.lhs_perm or tuple(range(rank))
    if wrong_softmax is not None:
        if not reshaped and rank >= 2 and C.compose(cur_perm, lhs2) == C.swap_last(rank):
            raise Mismatch("layout", f"scores are computed keys-first ({m1.node.name} is [.., Tk, Tq], "
                                     "as keys @ query) and normalised over the keys: GDPA matches "
                                     "query @ keys.transpose(-1, -2); write the scores that way to fuse")
        raise wrong_softmax
    if reshaped:
        if not C.is_identity(cur_perm) or not C.is_identity(lhs2) or node_shape(m2.lhs) != node_shape(m1.node):
            raise Mismatch("layout", "scores are reshaped between the matmuls")
    elif C.compose(cur_perm, lhs2) != tuple(range(rank)):
        raise Mismatch("layout", "the second matmul does not contract over the keys of the "
                      f"first (score layout {C.compose(cur_perm, lhs2)})")
    _check_masks(gm, plan, convert_nan_masks)
    return plan


def _require_canonical(n, cur_perm, reshaped):
    if reshaped or not C.is_identity(cur_perm):
        raise Mismatch("mask_layout", f"{n.name} masks/scales scores in a permuted or reshaped layout")


def _check_dropout(gm, n, plan: _Plan, post: bool):
    """Dropout on the activated scores becomes GDPA's ``dropout_p``; an
    ``nn.Dropout`` (or ``F.dropout(training=self.training)`` of the graph
    module) follows the graph's ``self.training`` at run time."""
    mod = get_module(gm, n)
    if mod is not None:
        p, training = float(mod.p), "graph"
    else:
        p = C.arg(n, 1, "p", 0.5)
        training = C.arg(n, 2, "training", C.arg(n, 2, "train", True))
        if isinstance(training, fx.Node) and training.op == "get_attr" and training.target == "training":
            training = "graph"     # F.dropout(..., training=self.training) of the graph module
        if not isinstance(training, (bool, str)) or C.scalar(p) is None:
            raise Mismatch("dropout_training", f"{_label(n)}: p or training is not a constant")
        p = float(p)
    if p == 0.0 or training is False:
        return
    if not post:
        raise Mismatch("dropout_training", f"{_label(n)} drops scores before the activation")
    if plan.dropout is not None:
        raise Mismatch("dropout_training", f"{_label(n)}: a second dropout between the matmuls")
    plan.dropout = (p, training)


def _scale_or_mask(gm, n, kind, plan: _Plan, post: bool, cur_perm, reshaped):
    if kind == "neg":
        c, other = -1.0, None
    else:
        main = _main_input(gm, n)
        other = _other_operand(n, main)
        c = C.scalar(other)
        if kind == "div" and other is n.args[0]:
            raise Mismatch("unsupported_op", f"{_label(n)} divides by the scores")
    if c is not None:
        if kind == "div":
            c = 1.0 / c
        if post:
            plan.qk_scale *= c
        else:
            plan.pre_scale *= c
        return
    if not isinstance(other, fx.Node):
        raise Mismatch("unsupported_op", f"{_label(n)}: unrecognised operand {other!r}")
    if is_shape_scalar(other):
        # e.g. 1/sqrt(q.size(-1)): kept as a graph scalar so it follows the runtime shape
        (plan.post_nodes if post else plan.pre_nodes).append((other, kind))
        return
    shape = node_shape(other)
    if shape is None:
        raise Mismatch("shape_unknown", f"no shape for {other.name}")
    if node_dtype(other) == torch.bool and kind == "mul":
        _require_canonical(n, cur_perm, reshaped)
        plan.masks.append(_Mask(other, False, 0.0, post, plan.pre_scale))
        return
    ab = M.interpret(gm, other)
    if kind == "mul" and isinstance(ab, M.Abs) and ab.kind == "pred":
        # a 0/1 tensor built from index comparisons or lengths: a zero-fill mask
        _require_canonical(n, cur_perm, reshaped)
        plan.masks.append(_Mask(other, False, 0.0, post, plan.pre_scale))
        return
    val = const_value(gm, other)
    if kind == "mul" and isinstance(val, torch.Tensor) and bool(((val == 0) | (val == 1)).all()):
        _require_canonical(n, cur_perm, reshaped)
        plan.masks.append(_Mask(other, False, 0.0, post, plan.pre_scale))
        return
    tags = M.dim_tags(gm, other)
    rank = len(node_shape(n) or ())
    # A factor constant along the keys (a literal 1 there, not a size that
    # happens to be 1 in the example) commutes with the key sum: applied to
    # q before the activation or to the output after it. Never read from
    # the example's sizes: a [B, 1, 1] gate at B = 1 is not a scalar.
    if tags is not None and len(tags) <= rank and M.is_broadcast_along(tags, 0):
        _require_canonical(n, cur_perm, reshaped)
        if not post and any(m.fill != 0.0 for m in plan.masks if not m.post):
            raise Mismatch("score_scaled_by_tensor",
                          f"{_label(n)} scales masked scores by {other.name}: the fill would change")
        (plan.post_tensors if post else plan.pre_tensors).append((other, kind))
        return
    raise Mismatch("score_scaled_by_tensor",
                  f"{_label(n)} scales the scores by {other.name} of shape {list(shape)}")


_LIKE = {"ones_like": 1.0, "zeros_like": 0.0, "full_like": None}


def _like_name(n) -> Optional[str]:
    if not isinstance(n, fx.Node) or n.op not in ("call_function", "call_method"):
        return None
    name = getattr(n.target, "__name__", n.target) if n.op == "call_function" else n.target
    return name if name in _LIKE else None


def _reads_only_shape(user: fx.Node, n: fx.Node) -> bool:
    """``ones_like(n)``, ``zeros_like(n)``, ``full_like(n, c)``: a use of ``n``'s shape and dtype only
    (DeepCTR's ``paddings = torch.ones_like(scores) * (-2 ** 32 + 1)``); fusing drops no value."""
    return _like_name(user) is not None and user.args[:1] == (n,) and n not in user.args[1:]


_SHAPE_AS = ("view_as", "reshape_as", "expand_as")


def shape_source_use(user: fx.Node, n: fx.Node) -> bool:
    """``x.view_as(n)`` / ``reshape_as`` / ``expand_as``: ``n`` only gives the shape (FuxiCTR's
    ``mask = mask.view_as(scores)``); the rewrite rebuilds that shape from q and k."""
    return (user.op == "call_method" and user.target in _SHAPE_AS and len(user.args) == 2
            and user.args[1] is n and user.args[0] is not n)


def _constant_fill(gm, fill) -> Optional[float]:
    """The value of a fill that is constant everywhere: a number, a 1-element constant tensor,
    ``ones_like(x) * c``, ``zeros_like(x)``, ``full_like(x, c)`` (times/divided by numbers)."""
    f = C.scalar(fill)
    if f is not None or not isinstance(fill, fx.Node):
        return f
    v = const_value(gm, fill)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v.item())
    like = _like_name(fill)
    if like is not None:
        val = _LIKE[like] if like != "full_like" else C.scalar(C.arg(fill, 1, "fill_value"))
        return None if val is None else float(val)
    kind = C.op_kind(fill, gm)
    if kind in ("mul", "div") and len(fill.args) == 2:
        a, b = fill.args
        if kind == "mul" and C.scalar(a) is not None:
            a, b = b, a
        base, c = _constant_fill(gm, a), C.scalar(b)
        if base is not None and c is not None:
            return base * c if kind == "mul" else base / c
    return None


def _mask_of(gm, n, post, pre_scale_now) -> _Mask:
    kind = C.op_kind(n, gm)
    if kind == "masked_fill":
        mask, fill = C.arg(n, 1, "mask"), C.arg(n, 2, "value")
        invert = True
    else:
        cond, a, b = n.args[0], n.args[1], n.args[2] if len(n.args) > 2 else n.kwargs.get("other")
        main = _main_input(gm, n)
        if a is main:
            mask, fill, invert = cond, b, False
        else:
            mask, fill, invert = cond, a, True
    f = _constant_fill(gm, fill)
    if f is None:
        raise Mismatch("unsupported_op", f"{_label(n)} fills masked scores with a tensor")
    if not isinstance(mask, fx.Node) or node_dtype(mask) not in (torch.bool, None):
        raise Mismatch("unsupported_op", f"{_label(n)}: mask is not a bool tensor")
    return _Mask(mask, invert, f, post, pre_scale_now)


def _check_masks(gm, plan: _Plan, convert_nan_masks: bool):
    act = plan.act
    for m in plan.masks:
        fill = m.fill * (plan.pre_scale / m.pre_scale_at) if not m.post and m.fill not in (0.0,) else m.fill
        if act == R.SOFTMAX:
            if m.post:
                raise Mismatch("mask_after_softmax", "scores are masked after the softmax")
            if fill == 0.0:
                raise Mismatch("zero_mask_before_softmax",
                              "scores are zeroed before softmax; exp(0) != 0 so they still count")
            if not (fill <= -1e4):
                raise Mismatch("mask_fill_nonzero", f"softmax mask fill {fill} is not -inf")
            continue
        if m.post:
            if fill != 0.0:
                raise Mismatch("mask_fill_nonzero", f"activated scores are filled with {fill}")
            continue
        out = R.act_fwd(torch.tensor([fill], dtype=torch.float32), act)
        if bool(torch.isnan(out).any()):
            if not convert_nan_masks:
                raise Mismatch(
                    "neg_inf_mask_nan",
                    f"scores are masked with {fill} before {act}, and {act}({fill}) is NaN: "
                    "the model outputs NaN there. Mask with 0 instead (exact, since "
                    f"{act}(0) = 0), or set GDPAConfig.convert_nan_masks=True")
            plan.notes.append(f"-inf mask before {act} converted to zero masking")
        elif float(out.abs().max()) != 0.0:
            raise Mismatch("mask_fill_nonzero",
                          f"masked scores are filled with {fill} and {act}({fill}) != 0")
    if act == R.SOFTMAX:
        # What a query row with every key masked returns, as the model
        # computes it: all its scores equal a finite fill -> uniform; -inf -> NaN.
        fills = {math.isinf(m.fill) for m in plan.masks}
        if len(fills) > 1:
            raise Mismatch("mask_fills_differ",
                          "scores are masked with both -inf and a finite fill: a fully masked "
                          "row would attend uniformly to only some keys")
        if fills:
            plan.masked_rows = "nan" if fills.pop() else "uniform"
        elif plan.biases:
            # only additive masks: a row the model fills with -inf everywhere is NaN
            plan.masked_rows = "nan"
        return
    for b in plan.biases:
        if b.masks_before:
            raise Mismatch("score_bias", f"{b.node.name} is added to scores that are already "
                          "masked: masked scores would no longer be zero")


def _plan_masks(gm, plan: _Plan, rank: int) -> dict:
    """Each mask's meaning, read symbolically (:mod:`recopt.graph.masks`), as GDPA arguments.

    Pointwise: causal / window / lengths / key and query masks (zero
    masking), or a reason. Softmax: causal where a factor is exactly
    causal; everything else stays an ``attn_mask`` (exact).
    """
    out = dict(window=None, causal=False, q_masks=[], k_masks=[], kv_len=[], q_len=[],
               attn_mask_parts=None, parts=[])
    parts = []
    for m in plan.masks:
        node, invert = m.node, m.invert
        if invert and C.op_kind(node, gm) == "not" and isinstance(node.args[0], fx.Node) \
                and node_dtype(node.args[0]) == torch.bool:
            node, invert = node.args[0], False       # masked_fill(~keep): keeps `keep` (a & b split below)
        factors = [node] if invert else _and_factors(gm, node)
        for f in factors:
            if node_shape(f) is None:
                raise Mismatch("shape_unknown", f"no shape for mask {f.name}")
            got = M.keep_parts(gm, f, invert, rank)
            out["parts"].append(MaskFactor(f, invert, got, m.fill))
            if plan.act == R.SOFTMAX:
                if isinstance(got, M.MaskParts) and got.causal and got.window is None and not (
                        got.kv_lengths or got.q_lengths or got.key_masks or got.query_masks):
                    out["causal"] = True
                else:
                    parts.append(("keep", f, invert))
                continue
            if not isinstance(got, M.MaskParts):
                raise Mismatch(*got)
            out["causal"] |= got.causal
            if got.window is not None:
                out["window"] = got.window if out["window"] is None else min(out["window"], got.window)
            out["kv_len"] += got.kv_lengths
            out["q_len"] += got.q_lengths
            out["k_masks"] += [_Lazy("not", n) if inv else n for n, inv in got.key_masks]
            out["q_masks"] += [_Lazy("not", n) if inv else n for n, inv in got.query_masks]
    if plan.act == R.SOFTMAX:
        out["attn_mask_parts"] = parts or None
    for node, _off in out["kv_len"] + out["q_len"]:
        dt = node_dtype(node)
        if dt is not None and (dt.is_floating_point or dt == torch.bool):
            raise Mismatch("mask_not_separable", f"lengths {node.name} are not integers ({dt})")
    return out



# ----------------------------------------------------------------------------- the matcher


@dataclass
class MaskFactor:
    """One factor of a mask as :func:`recopt.graph.masks.keep_parts` reads it (symbolically).

    ``node`` (negated when ``invert``) keeps the scores where True; ``parts`` is a
    :class:`~recopt.graph.masks.MaskParts` or the ``(code, reason)`` it cannot be
    read as; ``fill`` is the value masked scores get (``-inf``, ``-1e9``, ``0``)."""

    node: fx.Node
    invert: bool
    parts: Any
    fill: float


def additive_keep(gm: fx.GraphModule, node) -> Optional[tuple]:
    """``(keep, fill)`` when ``node`` is an additive mask ``where(keep, 0, fill)`` with
    ``fill <= -1e4`` (what ``scores + mask`` before a softmax writes), else None."""
    if not isinstance(node, fx.Node) or C.op_kind(node, gm) != "where" or len(node.args) < 3:
        return None
    cond, a, b = node.args[:3]
    va, vb = (C.scalar(x) for x in (a, b))
    if va == 0.0 and vb is not None and vb <= -1e4 and isinstance(cond, fx.Node):
        return cond, float(vb)
    return None


def bias_mask_factors(gm: fx.GraphModule, match: "AttentionMatch") -> list:
    """The match's additive biases read as masks (:class:`MaskFactor` per factor of
    their keep condition), or None when some bias is not an additive mask."""
    out = []
    for b in match.plan.biases:
        got = additive_keep(gm, b.node) if b.sign > 0 else None
        if got is None:
            return None
        keep, fill = got
        for f in _and_factors(gm, keep):
            if node_shape(f) is None:
                raise Mismatch("shape_unknown", f"no shape for mask {f.name}")
            out.append(MaskFactor(f, False, M.keep_parts(gm, f, False, match.rank), fill))
    return out


_POSITIONWISE = {"identity", "cast", "dropout", "gelu", "silu", "relu", "leaky_relu", "hardswish", "sigmoid"}


def _getitem_axis(index, axis: int) -> Optional[int]:
    """The input dim that output dim ``axis`` of ``x[index]`` reads whole, or None."""
    items = index if isinstance(index, tuple) else (index,)
    if any(it is Ellipsis for it in items[:-1]) or any(isinstance(it, fx.Node) for it in items):
        return None
    out_dim, in_dim = 0, 0
    for it in items:
        if it is Ellipsis:
            break
        if it is None:
            if out_dim == axis:
                return None
            out_dim += 1
        elif isinstance(it, slice):
            if out_dim == axis:
                return in_dim if it == slice(None) else None
            out_dim += 1
            in_dim += 1
        elif isinstance(it, int):
            in_dim += 1
        else:
            return None
    if items and items[-1] is Ellipsis:
        return None
    return in_dim + (axis - out_dim) if axis >= out_dim else None


def _split_dim(n: fx.Node) -> Optional[int]:
    """The dim of ``x.chunk(c, dim)`` / ``x.split(s, dim)`` (also ``torch.`` spellings), else None."""
    name = getattr(n.target, "__name__", n.target) if n.op in ("call_method", "call_function") else None
    if name not in ("chunk", "split") or not n.args or not isinstance(n.args[0], fx.Node):
        return None
    dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)
    return dim if isinstance(dim, int) else None


def _sequence_sources(gm, node, axis: int, depth: int) -> set:
    """``(node', axis')`` pairs whose positions along ``axis'`` are ``node``'s positions along
    ``axis``, found by following ops that keep that axis (projections, norms over other dims,
    pointwise ops, permutes, reshapes that keep the leading dims, chunks along another dim).
    Sizes read from a tensor (``x.size(0)`` in an ``expand``) are not followed: a query built
    from a parameter is not the sequence, whatever its example length."""
    out: set = set()
    frontier = [(node, axis)]
    for _ in range(depth):
        nxt = []
        for n, ax in frontier:
            if not isinstance(n, fx.Node) or (n, ax) in out:
                continue
            out.add((n, ax))
            shape = node_shape(n)
            rank = len(shape) if shape is not None else None
            if n.op in ("placeholder", "get_attr", "output") or rank is None or not 0 <= ax < rank:
                continue
            kind = C.op_kind(n, gm)
            mod = get_module(gm, n)
            src = n.args[0] if n.args else None
            if isinstance(mod, torch.nn.LayerNorm):
                if ax < rank - len(mod.normalized_shape):
                    nxt.append((src, ax))
            elif isinstance(mod, torch.nn.Embedding) or (n.op == "call_function" and n.target is F.embedding):
                if ax < rank - 1:
                    nxt.append((src, ax))
            elif kind in ("linear", "addmm") or (kind == "matmul" and is_parameter(gm, n.args[1])):
                if ax < rank - 1:
                    nxt.append((n.args[1] if kind == "addmm" else src, ax))
            elif kind in _POSITIONWISE:
                nxt.append((src, ax))
            elif kind in ("permute", "transpose", "t", "permute_attr"):
                p = C.as_permute(n, gm)
                if p is not None:
                    nxt.append((p[0], p[1][ax]))
            elif kind == "view":
                ins = node_shape(src)
                if ins is not None and len(ins) > ax and tuple(ins[:ax + 1]) == tuple(shape[:ax + 1]):
                    nxt.append((src, ax))
            elif kind in ("add", "sub", "mul", "div"):
                for a in n.args[:2]:
                    s_a = node_shape(a)
                    if isinstance(a, fx.Node) and s_a is not None:
                        a_ax = ax - (rank - len(s_a))
                        if a_ax >= 0 and s_a[a_ax] == shape[ax]:
                            nxt.append((a, a_ax))
            elif n.op == "call_function" and n.target is operator.getitem and isinstance(src, fx.Node):
                split_dim = _split_dim(src)
                if isinstance(n.args[1], int) and split_dim is not None:
                    bs = node_shape(src.args[0])     # q, k, v = x.chunk(3, -1): keeps other dims
                    if bs is not None and split_dim % len(bs) != ax:
                        nxt.append((src.args[0], ax))
                else:
                    a_in = _getitem_axis(n.args[1], ax)
                    if a_in is not None:
                        nxt.append((src, a_in))
        frontier = nxt
    return out


def same_sequence(q, k, depth: int = 14, q_axis: int = -2, k_axis: int = -2, gm=None) -> bool:
    """Whether the query positions of ``q`` (its dim ``q_axis``) and the key positions of ``k``
    (its dim ``k_axis``) are the positions of one input-derived sequence (self-attention).

    Read from how q and k are computed (:func:`_sequence_sources`), never by comparing the
    example's sizes: learned queries expanded to the batch, or a last-item query, are not the
    sequence even when their length equals T in the example."""
    if not isinstance(q, fx.Node) or not isinstance(k, fx.Node):
        return False
    qs, ks = node_shape(q), node_shape(k)
    if qs is None or ks is None or len(qs) < 2 or len(ks) < 2:
        return False
    gm = gm if gm is not None else q.graph.owning_module
    qa = _sequence_sources(gm, q, q_axis % len(qs), depth)
    ka = _sequence_sources(gm, k, k_axis % len(ks), depth)
    return any(n.op == "placeholder" or (n.op != "get_attr" and depends_on_inputs(n))
               for n, _ in qa & ka)


@dataclass
class AttentionMatch:
    """A matched region, everything a rewrite needs (no further checks)."""

    m1: C.MatmulView                 # scores = q @ X
    m2: C.MatmulView                 # out = P @ v
    path: list                       # nodes between the matmuls
    plan: _Plan                      # normaliser, scales, masks, biases, dropout
    masks: dict                      # _plan_masks: causal, window, lengths, key/query masks, attn_mask parts
    key: fx.Node                     # k = key.permute(k_perm)
    k_perm: tuple
    q_shape: tuple                   # canonical [*batch, Tq, d] (after q-side factors)
    k_shape: tuple
    v_shape: tuple
    rank: int                        # rank of the scores
    nb: int                          # batch dims of the GDPA call (0..2)

    @property
    def mask_factors(self) -> list:
        """Every mask factor (:class:`MaskFactor`), both normalisers."""
        return self.masks["parts"]


def _permuted(shape, perm):
    if shape is None:
        return None
    return tuple(shape[p] for p in perm) if perm is not None else tuple(shape)


def _broadcast(*shapes):
    return tuple(torch.broadcast_shapes(*[torch.Size(s) for s in shapes]))


def _factor_shape(f) -> tuple:
    return tuple(node_shape(f.node if isinstance(f, _Lazy) else f))


def find_region(gm: fx.GraphModule, m2_node: fx.Node):
    """``(m1, m2, path)`` if ``m2_node`` is a matmul whose left operand is reached from
    another matmul through ops that may sit in attention; None if not a candidate
    (including two trained-weight matmuls: an ordinary MLP)."""
    m2 = C.as_matmul(m2_node, gm)
    if m2 is None:
        return None
    found = _find_chain(gm, m2)
    if found is None:
        return None
    m1, path = found
    if is_parameter(gm, m1.rhs) and is_parameter(gm, m2.rhs):
        return None
    return m1, m2, path


def match_attention(gm: fx.GraphModule, m1: C.MatmulView, m2: C.MatmulView, path: list, *,
                    convert_nan_masks: bool = False) -> AttentionMatch:
    """Describe the region ``m1 .. m2`` (from :func:`find_region`) or raise :class:`Mismatch`."""
    plan = _analyze(gm, m1, m2, path, convert_nan_masks)
    rank = len(node_shape(m1.node))
    if rank < 2 or rank > 4:
        raise Mismatch("rank", f"scores of rank {rank}; GDPA handles 2..4")
    base, perm, n_stripped = C.strip_permutes(m1.rhs, gm)
    if perm is None:
        raise Mismatch("shape_unknown", f"no shape metadata on {m1.rhs.name}")
    x_perm = C.compose(perm, m1.rhs_perm) if m1.rhs_perm else perm   # X = base.permute(x_perm)
    k_perm = C.compose(x_perm, C.swap_last(len(x_perm)))             # k = base.permute(k_perm)
    explicit = n_stripped > 0 or m1.rhs_perm is not None
    if explicit and k_perm[-1] != len(k_perm) - 1:
        raise Mismatch("key_not_transposed",
                       f"key {base.name} is permuted by {x_perm}: the product contracts over its "
                       f"dim {x_perm[-2]}, not its feature dim; this is not q·kᵀ")
    dts = {node_dtype(m1.lhs), node_dtype(base), node_dtype(m2.rhs)}
    if len(dts) != 1:
        raise Mismatch("mixed_dtypes", f"q, k, v dtypes {sorted(map(str, dts))}")
    q_shape = _permuted(node_shape(m1.lhs), m1.lhs_perm)
    k_shape = _permuted(node_shape(base), k_perm)
    v_shape = _permuted(node_shape(m2.rhs), m2.rhs_perm)
    if None in (q_shape, k_shape, v_shape):
        raise Mismatch("shape_unknown", "missing shapes on q/k/v")
    nb = max(len(q_shape), len(k_shape), len(v_shape)) - 2
    if nb > 2:
        raise Mismatch("rank", f"{nb} batch dims; GDPA handles at most 2 (batch, heads)")
    mp = _plan_masks(gm, plan, rank)
    if (mp["kv_len"] or mp["q_len"]) and not (nb >= 1 and len(q_shape) - 2 == nb):
        raise Mismatch("mask_layout", "a length mask on scores without a leading batch dim of q")
    # shapes after the q-side / k-side factors, checked before anything is emitted
    for t, _ in plan.pre_tensors:
        q_shape = _broadcast(q_shape, node_shape(t))
    for f in mp["q_masks"]:
        q_shape = _broadcast(q_shape, _factor_shape(f))
    for f in mp["k_masks"]:
        s = _factor_shape(f)
        col = (s[:-2] + s[-1:] if len(s) >= 2 else s) + (1,)
        k_shape = _broadcast(k_shape, col)
    nb = max(len(q_shape), len(k_shape), len(v_shape)) - 2
    if nb > 2:
        raise Mismatch("rank", f"{nb} batch dims after masking; GDPA handles at most 2")
    return AttentionMatch(m1, m2, path, plan, mp, base, k_perm, q_shape, k_shape, v_shape, rank, nb)


# Names the attention passes use.
AttentionPlan = _Plan
Negated = _Lazy
main_input = _main_input
and_factors = _and_factors
label = _label
other_operand = _other_operand
