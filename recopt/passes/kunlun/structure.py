"""Graph structure shared by the Kunlun passes: module scopes, layer stacks,
residual branches and their roles, sequence summarizers, per-node FLOPs.

Scopes come from ``node.meta["nn_module_stack"]`` (recorded by both
``symbolic_trace`` and Dynamo) or a ``call_module`` target, normalised to a
dotted path (``towers.0.blocks.1``). A *stack* is an ``nn.ModuleList`` /
``nn.Sequential`` of at least two children of one class with identical
parameter shapes. Inside one child, the sequence stream is followed back from
the child's output through residual adds ``x + f(x)`` (optionally under a
post-norm ``LN(x + f(x))``); each branch ``f`` gets a role:

* ``"sa"`` — self-attention: a product of two tensors both computed from the stream
  (``q @ kᵀ``), or an attention call whose query and key both come from it;
* ``"pf"`` — personalized cross block: a product of a stream tensor with a tensor
  computed from another input (PFFN weights generated from the context summary);
* ``"ff"`` — anything else (a position-wise FFN).

A *summarizer* is the module that owns a learned query parameter (``[k, d]`` or
``[1, k, d]`` seeds) whose scope contains an attention with the seeds on the
query side and an outside sequence on the key side (PMA, HSP).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from recopt.graph import canon as C
from recopt.graph.nodes import depends_on_inputs, get_attr_value, get_module, node_shape
from recopt.graph.scopes import (flops_by_prefix, in_scope, node_flops_and_failures, nodes_in_scope,  # noqa: F401
                                 normalize_path, scope_of)


class FlopTable(dict):
    """``{node name: forward FLOPs}`` of one run, with ``failed``: ``{op name: why}`` for each op
    whose FLOP formula raised (counted as 0). A non-empty ``failed`` means figures built from
    this table are too low; :func:`mark_flops_incomplete` says so on the sites that carry them."""

    def __init__(self, flops: dict, failed: dict):
        super().__init__(flops)
        self.failed = dict(failed)


def node_flops(gm: fx.GraphModule, args: tuple) -> FlopTable:
    """Per-node forward FLOPs of ``gm`` on ``args`` (no grad), with the ops whose formula failed."""
    return FlopTable(*node_flops_and_failures(gm, args))


def mark_flops_incomplete(sites: Iterable, *tables: dict) -> None:
    """Say on every site that carries FLOP figures when a table they came from is incomplete.

    The site keeps its figures (a lower bound where the failing op ran) and gets
    ``details["flops_incomplete"]`` (the failing ops and why) and a sentence at the end of its
    ``reason``, so the report never shows a FLOP saving as if it were fully counted.
    """
    failed: dict = {}
    for t in tables:
        failed.update(getattr(t, "failed", {}) or {})
    if not failed:
        return
    shown = "; ".join(f"{op}: {why}" for op, why in sorted(failed.items()))
    for site in sites:
        if site.flops_before is None and site.flops_after is None:
            continue
        site.details["flops_incomplete"] = sorted(failed)
        site.reason = (f"{site.reason} [FLOP figures incomplete: the FLOP formula of {shown} failed and "
                       "was counted as 0]").strip()


def external_outputs(nodes: Iterable[fx.Node]) -> list:
    """Nodes of ``nodes`` used by a node outside the set (in graph order)."""
    inside = set(nodes)
    return [n for n in nodes if any(u not in inside for u in n.users)]


def external_inputs(nodes: Iterable[fx.Node]) -> list:
    """Nodes outside ``nodes`` that some node of the set reads (in first-use order)."""
    inside = set(nodes)
    out: list = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in out:
                out.append(a)
    return out


def ancestors(node: fx.Node, limit: Optional[set] = None) -> set:
    """All nodes ``node`` depends on (exclusive); restricted to ``limit`` when given."""
    seen: set = set()
    todo = list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n in seen or (limit is not None and n not in limit):
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def descendants(node: fx.Node, limit: Optional[set] = None) -> set:
    seen: set = set()
    todo = list(node.users)
    while todo:
        n = todo.pop()
        if n in seen or (limit is not None and n not in limit):
            continue
        seen.add(n)
        todo.extend(n.users)
    return seen


# --------------------------------------------------------------------------- FLOPs per node


# --------------------------------------------------------------------------- stacks


@dataclass
class Stack:
    path: str
    children: list            # dotted paths
    cls: type
    identical: bool
    why: str = ""


def _param_shapes(m: nn.Module) -> list:
    return [(n, tuple(p.shape)) for n, p in m.named_parameters()]


def scope_classes(gm: fx.GraphModule) -> dict:
    """``{module path: class}`` for every module that ran while tracing.

    A GraphModule keeps only the leaves it calls and rebuilds their parents as
    plain ``nn.Module`` containers, so classes come from ``nn_module_stack``.
    """
    out: dict = {}
    for n in gm.graph.nodes:
        for key, val in (n.meta.get("nn_module_stack") or {}).items():
            path, cls = (val if isinstance(val, tuple) and len(val) == 2 else (key, None))
            if isinstance(cls, type):
                out.setdefault(normalize_path(str(path)), cls)
        if n.op == "call_module":
            out.setdefault(normalize_path(str(n.target)), type(get_module(gm, n)))
    return out


def find_stacks(gm: fx.GraphModule) -> list:
    """Every container whose numbered children (``p.0``, ``p.1``, ...; at least 2)
    share one class, leaf torch.nn modules such as Linear/Embedding excluded
    (TransformerEncoderLayer included). ``identical`` compares parameter shapes."""
    classes = scope_classes(gm)
    groups: dict = {}
    for path, cls in classes.items():
        parent, _, last = path.rpartition(".")
        if last.isdigit():
            groups.setdefault(parent, []).append((int(last), path, cls))
    out = []
    for parent, kids in sorted(groups.items()):
        kids.sort()
        if len(kids) < 2 or len({c for _, _, c in kids}) != 1:
            continue
        cls = kids[0][2]
        if cls.__module__.startswith("torch.nn") and not issubclass(cls, (nn.TransformerEncoderLayer, nn.Sequential, nn.ModuleList)):
            continue  # a list of plain leaves (embedding tables, linears): not a layer stack
        shapes = []
        for _, path, _ in kids:
            try:
                shapes.append(_param_shapes(gm.get_submodule(path)))
            except AttributeError:
                shapes.append([])
        same = all(s == shapes[0] for s in shapes)
        why = "" if same else f"children of {parent} have different parameter shapes"
        out.append(Stack(parent, [p for _, p, _ in kids], cls, same, why))
    return out


# --------------------------------------------------------------------------- attention-like nodes

_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm)
_NORM_FUNCS = {F.layer_norm, torch.layer_norm, F.group_norm}
if hasattr(F, "rms_norm"):
    _NORM_FUNCS.add(F.rms_norm)
if hasattr(nn, "RMSNorm"):
    _NORM_MODULES = _NORM_MODULES + (nn.RMSNorm,)


def is_norm(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(get_module(gm, node), _NORM_MODULES)
    return node.op == "call_function" and node.target in _NORM_FUNCS


def is_add(node: fx.Node) -> bool:
    """A residual-style sum of two graph values: any spelling of add (``recopt.graph.canon``),
    or ``x += f(x)`` (``operator.iadd``, which canon leaves out because it writes in place)."""
    if C.op_kind(node) == "add" or (node.op == "call_function" and node.target is operator.iadd):
        return len(node.args) >= 2 and all(isinstance(a, fx.Node) for a in node.args[:2])
    return False


def attention_qk(node: fx.Node, gm: fx.GraphModule) -> Optional[tuple]:
    """``(query operand, key operand)`` of an attention-like node, else None.

    Recognises matmul-family products (the score product ``q @ kᵀ`` and also
    ``p @ v``), SDPA, recopt's gdpa / local_attention calls and
    ``nn.MultiheadAttention`` modules.
    """
    mm = C.as_matmul(node, gm)
    if mm is not None:
        return mm.lhs, mm.rhs
    if node.op == "call_module" and isinstance(get_module(gm, node), nn.MultiheadAttention):
        q = node.args[0] if node.args else node.kwargs.get("query")
        k = node.args[1] if len(node.args) > 1 else node.kwargs.get("key")
        return q, k
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if node.target is F.scaled_dot_product_attention or name in ("gdpa", "local_attention") \
                or "recopt.gdpa" in str(node.target):
            if len(node.args) >= 2:
                return node.args[0], node.args[1]
    return None


def is_side_effect(node: fx.Node) -> bool:
    """In-place or otherwise impure nodes (their effect outlives the branch)."""
    if node.op == "call_method" and str(node.target).endswith("_") and not str(node.target).startswith("__"):
        return True
    if node.op == "call_function":
        if node.target in (operator.setitem, operator.iadd, operator.imul):
            return True
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.startswith("__"):
            return True
    try:
        return node.is_impure()
    except Exception:
        return False


# --------------------------------------------------------------------------- residual chains


@dataclass
class Branch:
    """One residual step ``out = [norm](stream + f(stream))`` inside a layer."""

    add: fx.Node
    stream: fx.Node            # x
    branch_out: fx.Node        # f(x)
    norm: Optional[fx.Node]    # the post-norm node, if any
    nodes: set = field(default_factory=set)   # nodes computing f (inside the layer)
    role: str = "ff"

    @property
    def out(self) -> fx.Node:
        return self.norm if self.norm is not None else self.add


@dataclass
class Layer:
    path: str
    index: int
    nodes: list
    output: Optional[fx.Node] = None
    stream_in: Optional[fx.Node] = None
    branches: list = field(default_factory=list)     # in execution order
    problem: str = ""                                # reason code if not analysable
    problem_text: str = ""

    def role(self, role: str) -> list:
        return [b for b in self.branches if b.role == role]


def analyze_layer(gm: fx.GraphModule, path: str, index: int) -> Layer:
    """Follow the sequence stream of one stack child back through residual steps."""
    nodes = nodes_in_scope(gm, path)
    layer = Layer(path, index, nodes)
    if not nodes:
        layer.problem, layer.problem_text = "not_called", f"{path} never runs in the graph"
        return layer
    outs = external_outputs(nodes)
    if len(outs) != 1:
        layer.problem = "multiple_outputs"
        layer.problem_text = (f"{path} has {len(outs)} values used outside it "
                              f"({', '.join(n.name for n in outs[:4])}); CompSkip needs one sequence output")
        return layer
    layer.output = outs[0]
    inside = set(nodes)
    cur = layer.output
    branches = []
    while cur in inside:
        norm = None
        if is_norm(cur, gm) and cur.args and isinstance(cur.args[0], fx.Node) and is_add(cur.args[0]) \
                and cur.args[0] in inside:
            norm, cur = cur, cur.args[0]
        if not is_add(cur):
            break
        a, b = cur.args[0], cur.args[1]
        if a in ancestors(b):
            stream, out = a, b
        elif b in ancestors(a):
            stream, out = b, a
        else:
            break
        branches.append(Branch(cur, stream, out, norm))
        cur = stream
    if cur in inside or not branches:
        layer.problem = "not_residual"
        layer.problem_text = (f"the output of {path} is not a residual x + f(x) chain back to the layer input "
                              f"(stopped at {cur.name} = {cur.format_node()[:80]})")
        return layer
    layer.stream_in = cur
    branches.reverse()
    for br in branches:
        stream_anc = ancestors(br.stream) | {br.stream}
        body = (ancestors(br.branch_out) | {br.branch_out}) & inside
        br.nodes = body - stream_anc
        br.role = classify_branch(gm, br, inside)
    layer.branches = branches
    return layer


def classify_branch(gm: fx.GraphModule, br: Branch, layer_nodes: set) -> str:
    derived = descendants(br.stream, br.nodes) | {br.stream}
    has_cross = False
    for n in br.nodes:
        qk = attention_qk(n, gm)
        if qk is None:
            continue
        q, k = qk
        q_in = isinstance(q, fx.Node) and q in derived
        k_in = isinstance(k, fx.Node) and k in derived
        if q_in and k_in:
            return "sa"
        other = k if q_in else q if k_in else None
        if (q_in or k_in) and isinstance(other, fx.Node) and other.op != "get_attr" \
                and depends_on_inputs(other):
            has_cross = True
    return "pf" if has_cross else "ff"


# --------------------------------------------------------------------------- summarizers


@dataclass
class Summarizer:
    scope: str
    seeds: fx.Node          # get_attr of the learned queries
    output: fx.Node         # the one value used outside the scope
    sequence: fx.Node       # the sequence it attends over
    key_mask: Optional[fx.Node] = None   # a bool [B, T] outside input, if any
    n_queries: int = 0


def find_summarizers(gm: fx.GraphModule) -> tuple:
    """``(summarizers, rejected)``: learned-query attention poolers, and
    ``(scope, node, reason_code, reason)`` for seed-like parameters that do not fit."""
    found, rejected, seen = [], [], set()
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        val = get_attr_value(gm, n)
        if not isinstance(val, nn.Parameter):
            continue
        shape = tuple(val.shape)
        if not (len(shape) == 2 or (len(shape) == 3 and shape[0] == 1)):
            continue
        scope = normalize_path(str(n.target).rpartition(".")[0])
        if scope in seen or not scope:
            continue
        nodes = nodes_in_scope(gm, scope)
        inside = set(nodes)
        seed_desc = descendants(n, inside) | {n}
        attn = None
        for m in nodes:
            qk = attention_qk(m, gm)
            if qk is None:
                continue
            q, k = qk
            if isinstance(q, fx.Node) and q in seed_desc and isinstance(k, fx.Node) and k not in seed_desc:
                attn = (m, k)
                break
        if attn is None:
            continue  # an ordinary weight, not a query
        seen.add(scope)
        ext = [x for x in external_inputs(nodes) if x.op != "get_attr"]
        key_anc = ancestors(attn[1]) | {attn[1]}
        seqs = [x for x in ext if x in key_anc and (node_shape(x) or ()) and len(node_shape(x)) == 3]
        outs = external_outputs(nodes)
        if len(seqs) != 1 or len(outs) != 1:
            rejected.append((scope, n, "summarizer_shape",
                             f"{scope} has learned queries but {len(seqs)} sequence inputs and {len(outs)} "
                             "outputs; a summarizer reads one [B, T, d] sequence and returns one value"))
            continue
        masks = [x for x in ext if x is not seqs[0] and _is_bool_bt(x, seqs[0])]
        found.append(Summarizer(scope, n, outs[0], seqs[0], masks[0] if masks else None,
                                shape[-2]))
    return found, rejected


def _is_bool_bt(x: fx.Node, seq: fx.Node) -> bool:
    tm = x.meta.get("tensor_meta")
    s = node_shape(seq)
    return (tm is not None and getattr(tm, "dtype", None) == torch.bool and s is not None
            and tuple(tm.shape) == tuple(s[:2]))


def prune_unused(gm: fx.GraphModule) -> list:
    """Remove unused submodules *and* parameters/buffers that hang directly off a
    container still in use (``delete_all_unused_submodules`` keeps those).
    Returns the removed parameter/buffer names."""
    gm.delete_all_unused_submodules()
    used = set()
    for n in gm.graph.nodes:
        if n.op in ("get_attr", "call_module"):
            used.add(str(n.target))
    removed = []
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if any(name == u or name.startswith(u + ".") for u in used):
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]
        removed.append(name)
    return removed
