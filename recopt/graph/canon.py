"""Canonical views of fx nodes across spellings.

The same computation reaches a pass in many spellings: ``a @ b``,
``torch.matmul``, ``torch.bmm``, ``Tensor.matmul``, a two-operand
``einsum``, ``aten.bmm``; ``k.transpose(-2, -1)``, ``k.mT``,
``k.permute(0, 1, 3, 2)``; ``nn.GELU()`` vs ``F.gelu`` vs ``aten.gelu``. The
functions here map each spelling to one small record so passes match
meaning, not syntax:

- :func:`op_kind` — a canonical name ("matmul", "permute", "view", "gelu",
  "mul", ...) for any node, or None;
- :func:`as_permute` / :func:`strip_permutes` — a node as ``permute(base, perm)``;
- :func:`as_matmul` — a batched matmul as ``(lhs, lhs_perm) @ (rhs, rhs_perm)``
  with an output permutation (einsum included);
- :func:`as_linear` — ``x @ Wᵀ + b`` with a weight (FP8 and other passes);
- :func:`as_activation` — a pointwise activation with its canonical GDPA name.

All of them need shapes (``node.meta``) only where the spelling leaves the
rank implicit (negative dims, ``mT``); they return None when unsure.
"""
from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .nodes import get_module, node_rank

aten = torch.ops.aten

# --------------------------------------------------------------------------- tables

_FUNCS = {
    # matmul family
    torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "matmul", torch.mm: "matmul",
    aten.matmul.default: "matmul", aten.bmm.default: "matmul", aten.mm.default: "matmul",
    torch.einsum: "einsum", aten.einsum.default: "einsum",
    torch.baddbmm: "baddbmm", aten.baddbmm.default: "baddbmm",
    # linear
    F.linear: "linear", torch._C._nn.linear: "linear", aten.linear.default: "linear",
    torch.addmm: "addmm", aten.addmm.default: "addmm",
    # layout
    torch.transpose: "transpose", torch.swapaxes: "transpose", torch.swapdims: "transpose",
    aten.transpose.int: "transpose", torch.permute: "permute", aten.permute.default: "permute",
    torch.t: "t", aten.t.default: "t",
    torch.reshape: "view", aten.view.default: "view", aten.reshape.default: "view",
    aten._unsafe_view.default: "view", torch.flatten: "view", torch.unflatten: "view",
    torch.squeeze: "view", torch.unsqueeze: "view", aten.unsqueeze.default: "view",
    aten.squeeze.dim: "view", aten.clone.default: "identity", torch.clone: "identity",
    aten.contiguous.default: "identity", aten.expand.default: "expand",
    # arithmetic
    operator.mul: "mul", torch.mul: "mul", aten.mul.Tensor: "mul", aten.mul.Scalar: "mul",
    operator.truediv: "div", torch.div: "div", torch.true_divide: "div",
    aten.div.Tensor: "div", aten.div.Scalar: "div",
    operator.add: "add", torch.add: "add", aten.add.Tensor: "add", aten.add.Scalar: "add",
    operator.sub: "sub", torch.sub: "sub", aten.sub.Tensor: "sub",
    operator.pow: "pow", torch.pow: "pow", aten.pow.Tensor_Scalar: "pow",
    torch.square: "square", aten.square.default: "square",
    operator.neg: "neg", torch.neg: "neg",
    operator.and_: "and", torch.logical_and: "and", aten.logical_and.default: "and",
    aten.bitwise_and.Tensor: "and", torch.bitwise_and: "and",
    operator.invert: "not", torch.logical_not: "not", aten.logical_not.default: "not",
    aten.bitwise_not.default: "not", torch.bitwise_not: "not",
    # masking
    torch.where: "where", aten.where.self: "where", aten.where.ScalarOther: "where",
    aten.where.ScalarSelf: "where", aten.where.Scalar: "where",
    torch.masked_fill: "masked_fill", aten.masked_fill.Scalar: "masked_fill",
    aten.masked_fill.Tensor: "masked_fill",
    # activations
    F.gelu: "gelu", torch._C._nn.gelu: "gelu", aten.gelu.default: "gelu",
    F.silu: "silu", aten.silu.default: "silu",
    F.relu: "relu", torch.relu: "relu", aten.relu.default: "relu",
    F.leaky_relu: "leaky_relu", torch._C._nn.leaky_relu: "leaky_relu",
    aten.leaky_relu.default: "leaky_relu",
    F.hardswish: "hardswish", torch._C._nn.hardswish: "hardswish", aten.hardswish.default: "hardswish",
    F.softmax: "softmax", torch.softmax: "softmax", aten._softmax.default: "softmax",
    aten.softmax.int: "softmax", torch.sigmoid: "sigmoid", aten.sigmoid.default: "sigmoid",
    # dropout
    F.dropout: "dropout", torch.dropout: "dropout", aten.dropout.default: "dropout",
    # reductions (things that must not sit between attention matmuls)
    torch.sum: "reduction", torch.mean: "reduction", torch.amax: "reduction",
    torch.max: "reduction", torch.logsumexp: "reduction", torch.norm: "reduction",
    torch.cumsum: "reduction", F.log_softmax: "reduction", torch.log_softmax: "reduction",
    F.normalize: "reduction", F.layer_norm: "reduction", aten.sum.dim_IntList: "reduction",
    aten.mean.dim: "reduction", aten.amax.default: "reduction",
    aten._log_softmax.default: "reduction", aten.cumsum.default: "reduction",
    # attention
    F.scaled_dot_product_attention: "sdpa", aten.scaled_dot_product_attention.default: "sdpa",
}

_METHODS = {
    "matmul": "matmul", "bmm": "matmul", "mm": "matmul", "__matmul__": "matmul",
    "baddbmm": "baddbmm",
    "transpose": "transpose", "swapaxes": "transpose", "swapdims": "transpose",
    "permute": "permute", "t": "t",
    "view": "view", "reshape": "view", "flatten": "view", "unflatten": "view",
    "squeeze": "view", "unsqueeze": "view", "view_as": "view", "reshape_as": "view",
    "expand": "expand", "expand_as": "expand",
    "contiguous": "identity", "clone": "identity",
    "to": "cast", "float": "cast", "half": "cast", "bfloat16": "cast", "type_as": "cast",
    "type": "cast", "double": "cast",
    "mul": "mul", "__mul__": "mul", "div": "div", "__truediv__": "div", "add": "add",
    "sub": "sub", "pow": "pow", "square": "square", "neg": "neg",
    "where": "where", "masked_fill": "masked_fill",
    # in-place spellings (FuxiCTR: ``scores.masked_fill_(mask, v)``): the same value; a
    # rewrite still has to check the mutated input has no other user (the matcher does)
    "masked_fill_": "masked_fill", "mul_": "mul", "div_": "div", "add_": "add", "sub_": "sub",
    "relu": "relu", "softmax": "softmax", "sigmoid": "sigmoid",
    "logical_and": "and", "__and__": "and", "logical_not": "not", "__invert__": "not",
    "sum": "reduction", "mean": "reduction", "amax": "reduction", "max": "reduction",
    "logsumexp": "reduction", "norm": "reduction", "cumsum": "reduction",
    "log_softmax": "reduction",
}

_MODULES = (
    (nn.Linear, "linear"), (nn.GELU, "gelu"), (nn.SiLU, "silu"), (nn.ReLU, "relu"),
    (nn.LeakyReLU, "leaky_relu"), (nn.Hardswish, "hardswish"), (nn.Softmax, "softmax"),
    (nn.Dropout, "dropout"), (nn.Identity, "identity"), (nn.Sigmoid, "sigmoid"),
    (nn.MultiheadAttention, "mha"), (nn.LayerNorm, "reduction"),
)


def op_kind(node: Any, gm: Optional[fx.GraphModule] = None) -> Optional[str]:
    """Canonical name of what ``node`` computes, or None if unknown/not a call."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function":
        if node.target is builtins.getattr and len(node.args) >= 2:
            return {"mT": "permute_attr", "T": "permute_attr", "mH": "permute_attr"}.get(node.args[1])
        try:
            return _FUNCS.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _METHODS.get(node.target)
    if node.op == "call_module" and gm is not None:
        mod = get_module(gm, node)
        for cls, name in _MODULES:
            if isinstance(mod, cls):
                return name
    return None


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument ``i``/``name`` of a call node."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


# --------------------------------------------------------------------------- permutes


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def as_permute(node: Any, gm: Optional[fx.GraphModule] = None) -> Optional[tuple]:
    """``(base, perm)`` if ``node`` is a pure permutation of ``base``, else None.

    ``node`` equals ``base.permute(perm)``. Covers transpose/swapaxes, permute,
    ``t``, ``.mT``/``.T`` and their aten forms. Needs the base's rank for
    negative dims; returns None without it.
    """
    kind = op_kind(node, gm)
    if kind not in ("transpose", "permute", "t", "permute_attr"):
        return None
    base = node.args[0]
    rank = node_rank(base)
    if not isinstance(base, fx.Node) or rank is None:
        return None
    perm = list(range(rank))
    if kind == "transpose":
        d0, d1 = arg(node, 1, "dim0"), arg(node, 2, "dim1")
        if not isinstance(d0, int) or not isinstance(d1, int):
            return None
        d0, d1 = _norm_dim(d0, rank), _norm_dim(d1, rank)
        perm[d0], perm[d1] = perm[d1], perm[d0]
    elif kind == "permute":
        dims = node.args[1:] if node.op == "call_method" else (arg(node, 1, "dims"),)
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        if len(dims) != rank or not all(isinstance(d, int) for d in dims):
            return None
        perm = [_norm_dim(d, rank) for d in dims]
    elif kind == "t":
        if rank < 2:
            return base, tuple(perm)
        perm = [1, 0]
    else:  # .mT / .T / .mH
        attr = node.args[1]
        if attr == "T":
            perm = list(reversed(perm))
        else:
            if rank < 2:
                return None
            perm[-1], perm[-2] = perm[-2], perm[-1]
    return base, tuple(perm)


def compose(first: tuple, then: tuple) -> tuple:
    """Permutation of ``x.permute(first).permute(then)`` as one ``x.permute(p)``."""
    return tuple(first[i] for i in then)


def inverse(perm: tuple) -> tuple:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def is_identity(perm: Optional[tuple]) -> bool:
    return perm is None or tuple(perm) == tuple(range(len(perm)))


def swap_last(rank: int) -> tuple:
    p = list(range(rank))
    p[-1], p[-2] = p[-2], p[-1]
    return tuple(p)


def strip_permutes(node: Any, gm: Optional[fx.GraphModule] = None) -> tuple:
    """``(base, perm, n_stripped)``: follow permute-like nodes up to a non-permute base.

    ``node == base.permute(perm)``; ``n_stripped`` counts the permute nodes passed.
    """
    rank = node_rank(node)
    perm = tuple(range(rank)) if rank is not None else None
    n = 0
    cur = node
    while True:
        p = as_permute(cur, gm)
        if p is None or perm is None:
            return cur, perm, n
        base, bperm = p
        perm = compose(bperm, perm)
        cur = base
        n += 1


# --------------------------------------------------------------------------- matmul


@dataclass
class MatmulView:
    """``node = permute(lhs.permute(lhs_perm) @ rhs.permute(rhs_perm), out_perm)``.

    After the permutes, ``lhs`` is ``[*batch, M, K]`` and ``rhs`` is
    ``[*batch, K, N]`` (batch dims broadcast as in ``torch.matmul``; a 1-D
    operand is not supported). ``None`` perms mean identity.
    """

    node: fx.Node
    lhs: fx.Node
    rhs: fx.Node
    lhs_perm: Optional[tuple] = None
    rhs_perm: Optional[tuple] = None
    out_perm: Optional[tuple] = None
    spelling: str = "matmul"


def as_matmul(node: Any, gm: Optional[fx.GraphModule] = None) -> Optional[MatmulView]:
    """A matmul-family node (``@``, matmul, bmm, mm, 2-operand einsum) as a MatmulView."""
    kind = op_kind(node, gm)
    if kind == "matmul":
        a, b = node.args[0], arg(node, 1, "other", arg(node, 1, "mat2"))
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
            return None
        ra, rb = node_rank(a), node_rank(b)
        if ra is not None and ra < 2 or rb is not None and rb < 2:
            return None
        return MatmulView(node, a, b, spelling=str(getattr(node.target, "__name__", node.target)))
    if kind == "einsum":
        return _einsum_view(node)
    return None


@dataclass
class BaddbmmView:
    """``node = beta * input + alpha * (batch1 @ batch2)`` (``torch.baddbmm``);
    ``alpha`` is a float or a graph scalar node (``1 / sqrt(q.size(-1))``)."""

    matmul: MatmulView
    input: Any
    beta: float
    alpha: float


def as_baddbmm(node: Any, gm: Optional[fx.GraphModule] = None) -> Optional[BaddbmmView]:
    """A ``baddbmm`` with constant ``beta``/``alpha`` as a matmul plus a scaled input, or None.

    Not a matmul on its own (:func:`as_matmul` returns None for it): its
    output includes the added input."""
    if op_kind(node, gm) != "baddbmm":
        return None
    inp, b1, b2 = node.args[0], arg(node, 1, "batch1"), arg(node, 2, "batch2")
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    if not all(isinstance(x, fx.Node) for x in (b1, b2)) or scalar(beta) is None:
        return None
    if scalar(alpha) is None and not isinstance(alpha, fx.Node):
        return None
    return BaddbmmView(MatmulView(node, b1, b2, spelling="baddbmm"), inp, float(beta),
                       float(alpha) if scalar(alpha) is not None else alpha)


def _einsum_operands(node: fx.Node):
    eq = node.args[0]
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    return eq, list(ops)


def _einsum_view(node: fx.Node) -> Optional[MatmulView]:
    """A two-operand einsum that is one (broadcast) batched matmul.

    One contracted index; the free index of each operand is its last
    output index that the other operand lacks; the remaining output indices
    are batch dims, which an operand may lack only as leading dims (matmul
    broadcasting), e.g. ``'bkd,ke->bde'``, ``'bthd,bfhd->bthf'``.
    """
    eq, ops = _einsum_operands(node)
    if not isinstance(eq, str) or len(ops) != 2 or "..." in eq or "->" not in eq:
        return None
    a, b = ops
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        return None
    lhs_s, out_s = eq.replace(" ", "").split("->")
    terms = lhs_s.split(",")
    if len(terms) != 2:
        return None
    ta, tb = terms
    if len(set(ta)) != len(ta) or len(set(tb)) != len(tb) or len(set(out_s)) != len(out_s):
        return None
    contracted = [c for c in ta if c in tb and c not in out_s]
    if len(contracted) != 1 or any(c not in out_s for c in set(ta + tb) - set(contracted)):
        return None  # several contractions, or an index summed away
    k = contracted[0]
    a_only = [c for c in out_s if c in ta and c not in tb]
    b_only = [c for c in out_s if c in tb and c not in ta]
    if not a_only or not b_only:
        return None
    m, n = a_only[-1], b_only[-1]
    batch = [c for c in out_s if c not in (m, n)]
    a_batch = [c for c in batch if c in ta]
    b_batch = [c for c in batch if c in tb]
    # an operand may only lack leading batch dims (right-aligned broadcasting)
    if a_batch != batch[len(batch) - len(a_batch):] or b_batch != batch[len(batch) - len(b_batch):]:
        return None
    a_order, b_order = a_batch + [m, k], b_batch + [k, n]
    canon_out = batch + [m, n]
    if sorted(ta) != sorted(a_order) or sorted(tb) != sorted(b_order):
        return None
    lhs_perm = tuple(ta.index(c) for c in a_order)
    rhs_perm = tuple(tb.index(c) for c in b_order)
    out_perm = tuple(canon_out.index(c) for c in out_s)
    return MatmulView(node, a, b,
                      None if is_identity(lhs_perm) else lhs_perm,
                      None if is_identity(rhs_perm) else rhs_perm,
                      None if is_identity(out_perm) else out_perm,
                      spelling=f"einsum('{eq}')")


# --------------------------------------------------------------------------- linear


@dataclass
class LinearView:
    """``y = x @ weight.T + bias``; ``weight`` is a module parameter or a node."""

    node: fx.Node
    input: fx.Node
    weight: Any          # nn.Parameter/Tensor (call_module) or fx.Node
    bias: Any = None
    module: Optional[nn.Module] = None
    spelling: str = ""


def as_linear(node: Any, gm: Optional[fx.GraphModule] = None) -> Optional[LinearView]:
    """``nn.Linear`` modules, ``F.linear``/``torch._C._nn.linear``/``aten.linear``,
    and ``addmm(bias, x, w.t())`` as a :class:`LinearView`."""
    kind = op_kind(node, gm)
    if kind == "linear":
        if node.op == "call_module":
            mod = get_module(gm, node)
            return LinearView(node, node.args[0], mod.weight, mod.bias, mod, "nn.Linear")
        return LinearView(node, node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias"),
                          spelling="linear")
    if kind == "addmm":
        bias, x, wt = node.args[0], node.args[1], node.args[2]
        p = as_permute(wt, gm)
        if p is not None and p[1] == (1, 0):
            return LinearView(node, x, p[0], bias, spelling="addmm")
    return None


# --------------------------------------------------------------------------- activations


@dataclass
class ActivationView:
    """A pointwise activation: GDPA name (``"gelu_tanh"``, ``"softmax"`` ...) and input.

    ``name`` is None when the activation is recognised but not supported by
    GDPA (``unsupported`` says why, e.g. a leaky_relu slope other than 0.01).
    ``dim`` is the softmax dim.
    """

    node: fx.Node
    input: fx.Node
    name: Optional[str]
    unsupported: str = ""
    dim: Optional[int] = None


def as_activation(node: Any, gm: Optional[fx.GraphModule] = None) -> Optional[ActivationView]:
    kind = op_kind(node, gm)
    if kind not in ("gelu", "silu", "relu", "leaky_relu", "hardswish", "softmax", "sigmoid"):
        return None
    mod = get_module(gm, node) if node.op == "call_module" and gm is not None else None
    x = node.args[0] if node.args else node.kwargs.get("input")
    if kind == "gelu":
        approx = getattr(mod, "approximate", None) if mod is not None else arg(node, 1, "approximate", "none")
        if approx not in ("none", "tanh", None):
            return ActivationView(node, x, None, f"gelu approximate={approx!r}")
        return ActivationView(node, x, "gelu_tanh" if approx == "tanh" else "gelu")
    if kind == "leaky_relu":
        slope = mod.negative_slope if mod is not None else arg(node, 1, "negative_slope", 0.01)
        if not isinstance(slope, (int, float)) or abs(slope - 0.01) > 1e-12:
            return ActivationView(node, x, None, f"leaky_relu slope {slope} (GDPA supports 0.01)")
        return ActivationView(node, x, "leaky_relu")
    if kind == "softmax":
        if mod is not None:
            dim = mod.dim
        else:
            dim = arg(node, 1, "dim")
        return ActivationView(node, x, "softmax", dim=dim)
    if kind == "sigmoid":
        return ActivationView(node, x, None, "sigmoid(0) != 0, so masked scores cannot be zeroed")
    return ActivationView(node, x, kind)


def scalar(x: Any) -> Optional[float]:
    """A Python number (not bool) as float, else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return None
