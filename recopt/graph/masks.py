"""What a mask means, read from how it is built — for every size, not the example's.

Attention masks are built from sizes (``torch.arange(T)``, ``torch.ones(T, T).tril()``),
from data (``lengths``, a ``key_padding_mask`` input) or sliced from a buffer
(``self.causal[:T, :T]``). Evaluating one on the example's sizes and reading the
result is wrong in general: a band of half width 5 looks like "all kept" at
length 3, a causal mask looks like a key mask at length 1, a ``[B, 1, 1]``
gate looks like a scalar at batch 1. This module interprets the mask's
producers *symbolically* instead:

- every size that comes from an input's shape is a symbol (never its value);
- every dimension is tagged ``"1"`` (a literal 1: ``unsqueeze``, ``None``
  indexing, ``keepdim``, a constant's own size), ``"n"`` (a size that follows
  the inputs, or a constant > 1) or ``"?"`` (size 1 in the example but of
  unknown origin — never trusted as a broadcast dim);
- index tensors are affine forms over positions along the dims, counted from
  the right (axis 0 = last = keys ``j``, axis 1 = queries ``i``), so
  broadcasting needs no bookkeeping;
- comparisons give predicates: ``j - i <= 0`` (causal), ``|i - j| <= w``
  (band), ``j < lengths[b]`` (key lengths) and their conjunctions.

A constant tensor (buffer, literal) is classified from its whole value, which
is exact for any slice ``[:T, :T]`` of it. :func:`keep_parts` turns a keep
mask into parts GDPA can express, or a reason it cannot.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.fx as fx

from .nodes import _SYM_SIZE_OPS, depends_on_inputs, get_attr_value, node_shape

# ----------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Size:
    """An int: ``value`` when it is a literal, None when it follows an input's shape."""

    value: Optional[int] = None


@dataclass(frozen=True)
class Affine:
    """``c + sum(coef[a] * pos_a)``, ``pos_a`` the position along axis ``a`` (0 = last)."""

    coefs: tuple = ()          # sorted ((axis, coef), ...), coef != 0
    c: int = 0

    def add(self, other: "Affine", sign: int = 1) -> "Affine":
        d = dict(self.coefs)
        for a, k in other.coefs:
            d[a] = d.get(a, 0) + sign * k
        return Affine(tuple(sorted((a, k) for a, k in d.items() if k)), self.c + sign * other.c)

    def scale(self, k: int) -> "Affine":
        return Affine(tuple((a, k * v) for a, v in self.coefs if k * v), self.c * k)

    def shift(self, at: int) -> "Affine":
        return Affine(tuple((a + 1 if a >= at else a, k) for a, k in self.coefs), self.c)


@dataclass(frozen=True)
class Data:
    """Values read from an input (``lengths``), plus ``c``; varies along ``axes``."""

    node: fx.Node
    axes: frozenset
    c: int = 0

    def shift(self, at: int) -> "Data":
        return Data(self.node, frozenset(a + 1 if a >= at else a for a in self.axes), self.c)


# Predicates: ("true",) ("false",) ("and", p, q) ("or", p, q) ("not", p)
# ("cmp", Affine, op, rhs) with rhs 0 or Data, meaning  Affine op rhs
# ("abs", Affine, op, c)    meaning |Affine| op c
_FLIP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}
_NEG = {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt", "eq": "ne", "ne": "eq"}


def _shift_pred(p, at):
    tag = p[0]
    if tag in ("true", "false"):
        return p
    if tag in ("and", "or"):
        return (tag, _shift_pred(p[1], at), _shift_pred(p[2], at))
    if tag == "not":
        return ("not", _shift_pred(p[1], at))
    if tag == "cmp":
        rhs = p[3].shift(at) if isinstance(p[3], Data) else p[3]
        return ("cmp", p[1].shift(at), p[2], rhs)
    return ("abs", p[1].shift(at), p[2], p[3])


@dataclass
class Abs:
    """The abstract value of one node."""

    kind: str                      # idx | absidx | pred | fill | additive | data | opaque
    tags: tuple = ()               # per dim, left to right: "1" | "n" | "?"
    expr: Any = None               # Affine (idx/absidx), predicate (pred/additive), float (fill)
    fill: Optional[float] = None   # additive: value where expr holds (0 elsewhere)

    def shift(self, at: int) -> "Abs":
        e = self.expr
        if isinstance(e, (Affine, Data)):
            e = e.shift(at)
        elif isinstance(e, tuple):
            e = _shift_pred(e, at)
        return Abs(self.kind, self.tags, e, self.fill)


def _tags_of_shape(shape, literal: bool) -> tuple:
    return tuple(("1" if literal else "?") if s == 1 else "n" for s in shape)


def _broadcast_tags(a: tuple, b: tuple) -> tuple:
    n = max(len(a), len(b))
    a = ("1",) * (n - len(a)) + tuple(a)
    b = ("1",) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        out.append("n" if "n" in (x, y) else ("?" if "?" in (x, y) else "1"))
    return tuple(out)


# ----------------------------------------------------------------------------- interpreter

_CMP = {
    operator.lt: "lt", operator.le: "le", operator.gt: "gt", operator.ge: "ge",
    operator.eq: "eq", operator.ne: "ne", torch.lt: "lt", torch.le: "le", torch.gt: "gt",
    torch.ge: "ge", torch.eq: "eq", torch.ne: "ne", torch.less: "lt", torch.greater: "gt",
    torch.less_equal: "le", torch.greater_equal: "ge",
}
_CMP_METHODS = {"lt": "lt", "le": "le", "gt": "gt", "ge": "ge", "eq": "eq", "ne": "ne",
                "__lt__": "lt", "__le__": "le", "__gt__": "gt", "__ge__": "ge",
                "__eq__": "eq", "__ne__": "ne"}
_CASTS = {"bool", "float", "int", "long", "half", "double", "bfloat16", "to", "type_as",
          "type", "contiguous", "clone", "detach"}


def _is_shape_access(n: fx.Node) -> bool:
    if n.op == "call_function" and n.target is getattr and len(n.args) == 2:
        return n.args[1] == "shape"
    if n.op == "call_function" and n.target in _SYM_SIZE_OPS:
        return True
    return n.op == "call_method" and n.target == "size"


class _Interp:
    def __init__(self, gm: fx.GraphModule, max_nodes: int = 96):
        self.gm = gm
        self.env: dict = {}
        self.budget = max_nodes

    # -- helpers
    def val(self, x):
        if isinstance(x, fx.Node):
            if x not in self.env:
                self.budget -= 1
                self.env[x] = self._eval(x) if self.budget >= 0 else self._opaque(x)
            return self.env[x]
        if isinstance(x, bool):
            return x
        if isinstance(x, int):
            return Size(x)
        if isinstance(x, (tuple, list)):
            return type(x)(self.val(a) for a in x)
        return x

    def _opaque(self, n: fx.Node) -> Abs:
        shape = node_shape(n)
        tags = _tags_of_shape(shape, literal=False) if shape is not None else None
        if depends_on_inputs(n):
            if tags is None:
                return Abs("opaque", ())
            axes = frozenset(len(tags) - 1 - d for d, t in enumerate(tags) if t != "1")
            return Abs("data", tags, Data(n, axes))
        return self._constant(n, shape)

    def _constant(self, n: fx.Node, shape) -> Abs:
        """A node that reads no input data. Classified from its value only when
        its value cannot depend on input sizes either."""
        if _reads_shapes(n):
            return Abs("opaque", _tags_of_shape(shape, False) if shape is not None else ())
        from .nodes import const_value

        v = const_value(self.gm, n)
        if not isinstance(v, torch.Tensor):
            return Abs("opaque", ())
        return classify_constant(v)

    # -- the interpreter
    def _eval(self, n: fx.Node):  # noqa: C901 - one dispatch table
        if n.op == "placeholder":
            return self._opaque(n)
        if n.op == "get_attr":
            v = get_attr_value(self.gm, n)
            return classify_constant(v) if isinstance(v, torch.Tensor) else v
        if _is_shape_access(n):
            rank = len(node_shape(n.args[0]) or ())
            if (n.op == "call_method" and (len(n.args) > 1 or "dim" in n.kwargs)) or \
                    (n.op == "call_function" and n.target in _SYM_SIZE_OPS):
                return Size(None)
            return tuple(Size(None) for _ in range(rank))
        t, args, kw = n.target, n.args, n.kwargs
        name = t if n.op == "call_method" else getattr(t, "__name__", None)
        if n.op == "call_function" and t is operator.getitem:
            return self._getitem(n)
        if n.op not in ("call_function", "call_method"):
            return self._opaque(n)
        a = [self.val(x) for x in args]
        if all(isinstance(x, (Size, bool)) or x is None for x in a) and not any(isinstance(x, Abs) for x in a):
            # python arithmetic on sizes
            if n.op == "call_function" and t in (operator.add, operator.sub, operator.mul,
                                                operator.floordiv, operator.neg) and a:
                vals = [x.value if isinstance(x, Size) else None for x in a]
                if None in vals:
                    return Size(None)
                return Size(int(t(*vals)))
        if name == "arange":
            return self._arange(a, kw)
        if name in ("ones", "zeros", "full", "ones_like", "zeros_like", "full_like", "new_ones",
                    "new_zeros", "new_full"):
            return self._factory(n, name, a, kw)
        if name in ("tril", "triu"):
            return self._tri(name, a[0], kw.get("diagonal", a[1] if len(a) > 1 else Size(0)))
        if name in _CASTS and a and isinstance(a[0], Abs):
            if name == "to" and len(a) > 1 and isinstance(a[1], Abs):
                return self._opaque(n)
            return a[0]
        if name in ("unsqueeze",) and isinstance(a[0], Abs):
            d = a[1] if len(a) > 1 else kw.get("dim")
            d = d.value if isinstance(d, Size) else d
            return self._unsqueeze(a[0], d) if isinstance(d, int) else self._opaque(n)
        if name in ("view", "reshape") and a and isinstance(a[0], Abs):
            return self._view(n, a)
        if name in ("expand", "expand_as"):
            return self._expand(n, a)
        if name == "abs" and isinstance(a[0], Abs) and a[0].kind == "idx":
            return Abs("absidx", a[0].tags, a[0].expr)
        op = _CMP.get(t) if n.op == "call_function" else _CMP_METHODS.get(t)
        if op is not None and len(a) >= 2:
            return self._cmp(n, a[0], op, a[1])
        if (t in (operator.and_, torch.logical_and, torch.bitwise_and)
                or name in ("logical_and", "__and__", "bitwise_and")):
            return self._logic(n, "and", a[0], a[1])
        if t in (operator.or_, torch.logical_or, torch.bitwise_or) or name in ("logical_or", "__or__", "bitwise_or"):
            return self._logic(n, "or", a[0], a[1])
        if t in (operator.invert, torch.logical_not, torch.bitwise_not) or name in ("logical_not", "__invert__", "bitwise_not"):
            x = a[0]
            if isinstance(x, Abs) and x.kind == "pred":
                return Abs("pred", x.tags, ("not", x.expr))
            return self._opaque(n)
        if t in (operator.add, torch.add) or name in ("add", "__add__", "__radd__"):
            return self._lin(n, a[0], a[1], 1)
        if t in (operator.sub, torch.sub) or name in ("sub", "__sub__"):
            return self._lin(n, a[0], a[1], -1)
        if name in ("__rsub__", "rsub"):
            return self._lin(n, a[1], a[0], -1)
        if t in (operator.neg, torch.neg) or name in ("neg", "__neg__"):
            x = a[0]
            if isinstance(x, Abs) and x.kind == "idx":
                return Abs("idx", x.tags, x.expr.scale(-1))
            return self._opaque(n)
        if t in (operator.mul, torch.mul) or name in ("mul", "__mul__"):
            return self._mul(n, a[0], a[1])
        return self._opaque(n)

    def _arange(self, a, kw):
        nums = [x for x in a if isinstance(x, Size)]
        if "end" in kw:
            nums = nums + [self.val(kw["end"])]
        if "start" in kw:
            nums = [self.val(kw["start"])] + nums
        step = kw.get("step", 1)
        if len(nums) == 3:
            step, nums = nums[2].value, nums[:2]
        if step != 1 or not nums or len(nums) > 2:
            return Abs("opaque", ("n",))
        start = nums[0].value if len(nums) == 2 else 0
        end = nums[-1]
        if start is None:
            return Abs("opaque", ("n",))
        if end.value is not None and end.value - start == 1:
            return Abs("idx", ("1",), Affine((), start))
        return Abs("idx", ("n",), Affine(((0, 1),), start))

    def _factory(self, n, name, a, kw):
        if name.endswith("_like") or name.startswith("new_"):
            base = a[0]
            sizes = None if name.endswith("_like") else (a[1:] if name != "new_full" else a[1:2])
            tags = base.tags if isinstance(base, Abs) and sizes is None else None
            if sizes is not None:
                if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                    sizes = sizes[0]
                tags = tuple("1" if isinstance(s, Size) and s.value == 1 else "n" for s in sizes)
            fill_arg = a[-1] if name in ("full_like", "new_full") else kw.get("fill_value")
        else:
            sizes = a[:1] if name == "full" else a
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = sizes[0]
            if "size" in kw:
                sizes = self.val(kw["size"])
            if not all(isinstance(s, Size) for s in sizes):
                return self._opaque(n)
            tags = tuple("1" if s.value == 1 else "n" for s in sizes)
            fill_arg = a[1] if name == "full" and len(a) > 1 else kw.get("fill_value")
        if tags is None:
            return self._opaque(n)
        if name.startswith("ones") or name == "new_ones":
            value = 1.0
        elif name.startswith("zeros") or name == "new_zeros":
            value = 0.0
        else:
            value = fill_arg.value if isinstance(fill_arg, Size) else fill_arg
            if isinstance(value, bool):
                value = float(value)
            if not isinstance(value, (int, float)):
                return self._opaque(n)
        if value == 1.0:
            return Abs("pred", tags, ("true",))
        return Abs("fill", tags, float(value))

    def _tri(self, name, x, diag):
        k = diag.value if isinstance(diag, Size) else diag
        if not isinstance(x, Abs) or not isinstance(k, int) or len(x.tags) < 2:
            return Abs("opaque", getattr(x, "tags", ()))
        jmi = Affine(((0, 1), (1, -1)), 0)             # j - i
        # tril keeps j - i <= k; triu keeps j - i >= k
        keep = ("cmp", jmi, "le" if name == "tril" else "ge", Affine((), k))
        keep = _cmp_norm(keep)
        if x.kind == "pred":
            return Abs("pred", x.tags, ("and", x.expr, keep))
        if x.kind == "fill":
            return Abs("additive", x.tags, keep, x.expr) if x.expr != 0.0 else Abs("fill", x.tags, 0.0)
        return Abs("opaque", x.tags)

    def _unsqueeze(self, x: Abs, d: int) -> Abs:
        r = len(x.tags)
        d = d + r + 1 if d < 0 else d
        tags = x.tags[:d] + ("1",) + x.tags[d:]
        # new dim's right-axis index is r - d; axes at or above it move up
        y = x.shift(r - d)
        return Abs(y.kind, tags, y.expr, y.fill)

    def _getitem(self, n: fx.Node):
        base, idx = n.args
        b = self.val(base)
        if isinstance(b, (tuple, list)):
            i = idx if isinstance(idx, int) else None
            return b[i] if i is not None and -len(b) <= i < len(b) else Size(None)
        if not isinstance(b, Abs):
            return self._opaque(n)
        items = idx if isinstance(idx, tuple) else (idx,)
        if sum(1 for it in items if it is Ellipsis) > 1:
            return self._opaque(n)
        real = [it for it in items if it is not None and it is not Ellipsis]
        if len(real) > len(b.tags):
            return self._opaque(n)
        # expand the ellipsis
        if Ellipsis in items:
            e = items.index(Ellipsis)
            fill = (slice(None),) * (len(b.tags) - len(real))
            items = items[:e] + fill + items[e + 1:]
        else:
            items = items + (slice(None),) * (len(b.tags) - len(real))
        out, pos = b, 0                 # pos: index into the current (growing) tags
        for it in items:
            if it is None:
                out = self._unsqueeze(out, pos)
                pos += 1
            elif isinstance(it, slice):
                start = self.val(it.start) if isinstance(it.start, fx.Node) else it.start
                step = it.step
                if start not in (None, 0) or step not in (None, 1):
                    return self._opaque(n)   # only leading slices keep positions
                stop = self.val(it.stop) if isinstance(it.stop, fx.Node) else it.stop
                if isinstance(stop, Size):
                    stop = stop.value if stop.value is not None else "sym"
                if out.tags[pos] == "n" and stop not in (None, "sym") and stop == 1:
                    tags = out.tags[:pos] + ("1",) + out.tags[pos + 1:]
                    out = Abs(out.kind, tags, out.expr, out.fill)
                pos += 1
            else:
                return self._opaque(n)
        return out

    def _view(self, n, a):
        """Tags from the requested sizes (a literal 1 stays a literal 1); content is kept
        only for data, whose axes follow the tags."""
        sizes = a[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = sizes[0]
        shape = node_shape(n)
        if shape is None or len(sizes) != len(shape):
            return self._opaque(n)
        tags = tuple("1" if isinstance(s, Size) and s.value == 1 else
                     ("n" if not (isinstance(s, Size) and s.value is not None) or s.value > 1
                      else "?") for s in sizes)
        x = a[0]
        if x.kind == "data":
            axes = frozenset(len(tags) - 1 - d for d, t in enumerate(tags) if t != "1")
            return Abs("data", tags, Data(x.expr.node, axes, x.expr.c))
        return Abs("opaque", tags)

    def _expand(self, n, a):
        x = a[0]
        if not isinstance(x, Abs):
            return self._opaque(n)
        shape = node_shape(n)
        if shape is None:
            return self._opaque(n)
        lead = len(shape) - len(x.tags)
        old = ("1",) * lead + tuple(x.tags)
        if n.target == "expand_as":
            other = a[1]
            new = other.tags if isinstance(other, Abs) and len(other.tags) == len(shape) else \
                _tags_of_shape(shape, False)
        else:
            sizes = a[1:]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = sizes[0]
            new = tuple("1" if isinstance(s, Size) and s.value == 1 else
                        ("keep" if isinstance(s, Size) and s.value == -1 else "n") for s in sizes)
        tags = tuple(o if t == "keep" else _broadcast_tags((o,), (t,))[0] for o, t in zip(old, new))
        return Abs(x.kind, tags, x.expr, x.fill)

    def _as_affine(self, x):
        if isinstance(x, Size):
            return (Affine((), x.value), ()) if x.value is not None else None
        if isinstance(x, (int, float)) and not isinstance(x, bool) and float(x).is_integer():
            return Affine((), int(x)), ()
        if isinstance(x, Abs) and x.kind == "idx":
            return x.expr, x.tags
        return None

    def _lin(self, n, x, y, sign):
        ax, ay = self._as_affine(x), self._as_affine(y)
        if ax is not None and ay is not None:
            if not ax[1] and not ay[1]:
                return Size(ax[0].c + sign * ay[0].c)
            return Abs("idx", _broadcast_tags(ax[1], ay[1]), ax[0].add(ay[0], sign))
        # data + const (lengths - 1)
        if isinstance(x, Abs) and x.kind == "data" and ay is not None and not ay[1]:
            return Abs("data", x.tags, Data(x.expr.node, x.expr.axes, x.expr.c + sign * ay[0].c))
        if sign == -1 and isinstance(x, (Size,)) and x.value == 1 and isinstance(y, Abs) and y.kind == "pred":
            return Abs("pred", y.tags, ("not", y.expr))     # 1 - mask
        if sign == -1 and isinstance(x, (int, float)) and x == 1 and isinstance(y, Abs) and y.kind == "pred":
            return Abs("pred", y.tags, ("not", y.expr))
        return self._opaque(n)

    def _mul(self, n, x, y):
        if isinstance(x, Abs) and isinstance(y, Abs) and x.kind == "pred" and y.kind == "pred":
            return Abs("pred", _broadcast_tags(x.tags, y.tags), ("and", x.expr, y.expr))
        for p, c in ((x, y), (y, x)):
            if isinstance(p, Abs) and p.kind == "idx":
                k = c.value if isinstance(c, Size) else (c if isinstance(c, int) and not isinstance(c, bool) else None)
                if k is not None:
                    return Abs("idx", p.tags, p.expr.scale(k))
            if isinstance(p, Abs) and p.kind == "pred" and isinstance(c, (Size, int, float)) \
                    and not isinstance(c, bool):
                v = c.value if isinstance(c, Size) else c
                if v is not None and v != 0:
                    return Abs("additive", p.tags, p.expr, float(v))
        return self._opaque(n)

    def _logic(self, n, op, x, y):
        if isinstance(x, Abs) and isinstance(y, Abs) and x.kind == "pred" and y.kind == "pred":
            return Abs("pred", _broadcast_tags(x.tags, y.tags), (op, x.expr, y.expr))
        return self._opaque(n)

    def _cmp(self, n, x, op, y):
        # pred == 0 / == 1 / != 0
        for p, c, o in ((x, y, op), (y, x, _FLIP[op])):
            if isinstance(p, Abs) and p.kind in ("pred", "additive") and isinstance(c, (Size, int, float, bool)):
                v = c.value if isinstance(c, Size) else float(c)
                on = 1.0 if p.kind == "pred" else p.fill
                if v is None or o not in ("eq", "ne"):
                    return self._opaque(n)
                if v == on:
                    e = p.expr if o == "eq" else ("not", p.expr)
                elif v == 0.0:
                    e = ("not", p.expr) if o == "eq" else p.expr
                else:
                    e = ("false",) if o == "eq" else ("true",)
                return Abs("pred", p.tags, e)
        if isinstance(x, Abs) and x.kind == "absidx":
            c = self._as_affine(y)
            if c is not None and not c[1]:
                return Abs("pred", x.tags, ("abs", x.expr, op, c[0].c))
            return self._opaque(n)
        if isinstance(y, Abs) and y.kind == "absidx":
            return self._cmp(n, y, _FLIP[op], x)
        ax, ay = self._as_affine(x), self._as_affine(y)
        if ax is not None and ay is not None:
            tags = _broadcast_tags(ax[1], ay[1])
            return Abs("pred", tags, _cmp_norm(("cmp", ax[0].add(ay[0], -1), op, Affine((), 0))))
        for i_, d_, o in ((ax, y, op), (ay, x, _FLIP[op])):
            if i_ is not None and isinstance(d_, Abs) and d_.kind == "data":
                tags = _broadcast_tags(i_[1], d_.tags)
                return Abs("pred", tags, ("cmp", i_[0], o, d_.expr))
        return self._opaque(n)


def _cmp_norm(p):
    """``A op B`` with affine B folded into A: ``A - B op 0`` (rhs constant 0)."""
    _, a, op, b = p
    if isinstance(b, Affine):
        return ("cmp", a.add(b, -1), op, 0)
    return p


def _reads_shapes(node: fx.Node) -> bool:
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if _is_shape_access(n) or (n.op == "call_method" and n.target in ("dim", "numel")):
            return True
        stack.extend(n.all_input_nodes)
    return False


# ----------------------------------------------------------------------------- constants


def classify_constant(v: torch.Tensor) -> Abs:
    """A constant tensor's meaning, from its whole value (exact for leading slices).

    A bool / 0-1 tensor that, over its last two dims (and the same in every
    leading index), is ``lo <= j - i <= hi`` becomes a predicate; a tensor of
    one value a ``fill``; ``{0, f}`` with such a pattern an ``additive`` mask.
    """
    tags = _tags_of_shape(v.shape, literal=True)
    if v.numel() == 0:
        return Abs("opaque", tags)
    if v.dtype != torch.bool and not (v.is_floating_point() or not v.is_complex()):
        return Abs("opaque", tags)
    flat = v.reshape(-1)
    if v.dtype != torch.bool and bool((flat == flat[0]).all()):
        f = float(flat[0])
        return Abs("pred", tags, ("true",)) if f == 1.0 else Abs("fill", tags, f)
    if v.dtype == torch.bool:
        keep, fill, kind = v, None, "pred"
    else:
        vals = torch.unique(flat[~torch.isnan(flat)]) if v.is_floating_point() else torch.unique(flat)
        if vals.numel() != 2 or 0 not in vals.tolist():
            return Abs("opaque", tags)
        other = float(vals[vals != 0][0])
        if other == 1.0:
            keep, fill, kind = v != 0, None, "pred"
        else:
            keep, fill, kind = v == other, other, "additive"
    pred = _band_pred(keep)
    if pred is None:
        return Abs("opaque", tags)
    return Abs(kind, tags, pred, fill)


def _band_pred(keep: torch.Tensor):
    """``lo <= j - i <= hi`` over the last two dims (same for every leading index), or None."""
    if keep.dim() == 0:
        return ("true",) if bool(keep) else ("false",)
    if keep.dim() == 1:
        return ("true",) if bool(keep.all()) else None
    m = keep.reshape(-1, *keep.shape[-2:])
    if not bool((m == m[:1]).all()):
        return None
    m = m[0]
    R, Cn = m.shape
    if not bool(m.any()):
        return ("false",)
    i = torch.arange(R)[:, None]
    j = torch.arange(Cn)[None, :]
    d = j - i
    hi, lo = int(d[m].max()), int(d[m].min())
    if not bool((m == ((d <= hi) & (d >= lo))).all()):
        return None
    p = ("true",)
    jmi = Affine(((0, 1), (1, -1)), 0)
    if hi < Cn - 1:                     # else: no upper bound inside the tensor
        p = ("and", p, ("cmp", jmi.add(Affine((), hi), -1), "le", 0))
    if lo > -(R - 1):
        p = ("and", p, ("cmp", jmi.add(Affine((), lo), -1), "ge", 0))
    return p


# ----------------------------------------------------------------------------- meaning


@dataclass
class MaskParts:
    """A keep mask as GDPA's parts (all kept scores satisfy every part)."""

    causal: bool = False
    window: Optional[int] = None
    kv_lengths: list = field(default_factory=list)   # (node, offset): keys j < node + offset
    q_lengths: list = field(default_factory=list)
    key_masks: list = field(default_factory=list)    # (node, invert): varies only along keys
    query_masks: list = field(default_factory=list)  # (node, invert): varies only along queries
    notes: list = field(default_factory=list)


def interpret(gm: fx.GraphModule, node: Any) -> Union[Abs, Size, Any]:
    """The abstract value of ``node`` (see the module docstring)."""
    return _Interp(gm).val(node)


def dim_tags(gm: fx.GraphModule, node: Any) -> Optional[tuple]:
    """Per-dim tags of a tensor node: ``"1"`` literal broadcast, ``"n"`` size-following, ``"?"`` unknown."""
    a = interpret(gm, node)
    if isinstance(a, Abs) and a.tags is not None and (a.tags or node_shape(node) == ()):
        return a.tags
    shape = node_shape(node)
    return _tags_of_shape(shape, False) if shape is not None else None


def is_broadcast_along(tags: Optional[tuple], axis_from_right: int) -> bool:
    """True if a tensor with these tags is a literal 1 (or absent) along that axis."""
    if tags is None:
        return False
    if axis_from_right >= len(tags):
        return True
    return tags[len(tags) - 1 - axis_from_right] == "1"


def _nnf(p, neg=False):
    tag = p[0]
    if tag == "not":
        return _nnf(p[1], not neg)
    if tag in ("and", "or"):
        t = tag if not neg else ("or" if tag == "and" else "and")
        return (t, _nnf(p[1], neg), _nnf(p[2], neg))
    if tag == "true":
        return ("false",) if neg else p
    if tag == "false":
        return ("true",) if neg else p
    if neg:
        return (tag, p[1], _NEG[p[2]], p[3])
    return p


def _simplify(p):
    """Fold ``true``/``false`` out of and/or."""
    if p[0] not in ("and", "or"):
        return p
    x, y = _simplify(p[1]), _simplify(p[2])
    unit, zero = (("true",), ("false",)) if p[0] == "and" else (("false",), ("true",))
    if x == zero or y == zero:
        return zero
    if x == unit:
        return y
    if y == unit:
        return x
    return (p[0], x, y)


def _conjuncts(p) -> Optional[list]:
    if p[0] == "and":
        a, b = _conjuncts(p[1]), _conjuncts(p[2])
        return None if a is None or b is None else a + b
    if p[0] == "or":
        return None
    return [p]


def keep_parts(gm: fx.GraphModule, node: fx.Node, invert: bool, score_rank: int):
    """``node`` (or ``~node`` when ``invert``) as a keep mask over scores of rank ``score_rank``.

    Returns :class:`MaskParts`, or ``(code, reason)`` when GDPA cannot express it.
    """
    a = interpret(gm, node)
    if not isinstance(a, Abs):
        return ("unsupported_op", f"mask {node.name} is not a tensor")
    if len(a.tags) > score_rank:
        return ("mask_layout", f"mask {node.name} has more dims than the scores")
    why = None
    if a.kind == "pred":
        got = _pred_parts(node, _simplify(_nnf(("not", a.expr) if invert else a.expr)), score_rank)
        if isinstance(got, MaskParts):
            return got
        why = got
    parts = MaskParts()
    if is_broadcast_along(a.tags, 1):      # constant along the queries: a key mask
        parts.key_masks.append((node, invert))
        return parts
    if is_broadcast_along(a.tags, 0):      # constant along the keys: a query mask
        parts.query_masks.append((node, invert))
        return parts
    if why is not None:
        return why
    amb = "?" in a.tags[-2:]
    why = ("its size 1 along the query or key axis in this example may follow the input sizes"
           if amb else "its construction is not an index comparison GDPA recognises")
    return ("mask_not_separable",
            f"mask {node.name} depends on both the query and the key index: {why}")


def _pred_parts(node, pred, score_rank: int):
    """A predicate (in negation normal form) as :class:`MaskParts`, or ``(code, reason)``."""
    parts = MaskParts()
    conj = _conjuncts(pred)
    if conj is None:
        return ("mask_not_separable", f"mask {node.name} is a disjunction of conditions")
    upper, lower = None, None            # j - i <= upper ; i - j <= lower
    batch_axis = score_rank - 1
    for c in conj:
        if c[0] == "true":
            continue
        if c[0] == "false":
            return ("mask_not_separable", f"mask {node.name} masks every score")
        if c[0] == "abs":
            w = _abs_band(c)
            if w is None:
                return ("mask_not_separable", f"mask {node.name}: |{_fmt(c[1])}| {c[2]} {c[3]} is not a band")
            upper = w if upper is None else min(upper, w)
            lower = w if lower is None else min(lower, w)
            continue
        _, aff, op, rhs = c
        coefs = dict(aff.coefs)
        if isinstance(rhs, Data):
            axis = next(iter(coefs)) if len(coefs) == 1 else None
            if axis not in (0, 1) or coefs[axis] != 1 or op not in ("lt", "le"):
                return ("mask_not_separable",
                        f"mask {node.name}: {_fmt(aff)} {op} {rhs.node.name} is not a length mask")
            if not rhs.axes <= {batch_axis} or batch_axis in (0, 1):
                return ("mask_layout", f"mask {node.name}: lengths {rhs.node.name} do not vary "
                                       "along the batch dim of the scores only")
            off = rhs.c - aff.c + (1 if op == "le" else 0)
            (parts.kv_lengths if axis == 0 else parts.q_lengths).append((rhs.node, off))
            continue
        # index-only: coefs over j (axis 0) and i (axis 1)
        if set(coefs) - {0, 1} or coefs.get(0, 0) != -coefs.get(1, 0) or abs(coefs.get(0, 0)) != 1:
            return ("mask_not_separable", f"mask {node.name}: {_fmt(aff)} {op} 0 is not causal, "
                                          "a band or a length mask")
        # aff = s*(j - i) + c  op 0
        s, k = coefs[0], aff.c
        if op in ("eq", "ne"):
            return ("mask_not_separable", f"mask {node.name}: {_fmt(aff)} {op} 0")
        # normalise to s*(j-i) <= -k (le) ; strict: <= -k-1
        if op in ("gt", "ge"):
            s, k, op = -s, -k, ("lt" if op == "gt" else "le")
        bound = -k - (1 if op == "lt" else 0)
        if s == 1:
            upper = bound if upper is None else min(upper, bound)
        else:
            lower = bound if lower is None else min(lower, bound)
    if upper is not None and upper < 0 or lower is not None and lower < 0:
        return ("mask_not_separable", f"mask {node.name} drops the diagonal (j - i <= {upper}, "
                                      f"i - j <= {lower})")
    if upper == 0:
        parts.causal = True
        if lower is not None:
            parts.window = lower
    elif upper is not None and lower is not None and upper == lower:
        parts.window = upper
    elif upper is not None or lower is not None:
        return ("mask_not_separable", f"mask {node.name} keeps {-(lower if lower is not None else 10**9)}"
                                      f" <= j - i <= {upper}: neither causal nor a symmetric band")
    return parts


def _abs_band(c) -> Optional[int]:
    _, aff, op, k = c
    coefs = dict(aff.coefs)
    if set(coefs) != {0, 1} or coefs[0] != -coefs[1] or abs(coefs[0]) != 1 or aff.c != 0:
        return None
    if op == "le":
        return k if k >= 0 else None
    if op == "lt":
        return k - 1 if k >= 1 else None
    return None


def _fmt(aff: Affine) -> str:
    names = {0: "j", 1: "i"}
    terms = [f"{'' if k == 1 else '-' if k == -1 else k}{names.get(a, f'x{a}')}" for a, k in aff.coefs]
    if aff.c:
        terms.append(str(aff.c))
    return " + ".join(terms) or "0"
