"""A rule layer for passes: match → check → rewrite.

In the spirit of onnxscript's rewriter (``MatchResult.fail(reason)``) and
Inductor's ``register_replacement`` (replacements written as plain torch
functions):

- ``match(gm, node)`` says whether ``node`` is a candidate and binds what the
  rewrite needs (a dict), or returns None — not a candidate, not reported;
- ``check(gm, bindings)`` returns None when the rewrite is exact here, or a
  :class:`Reason` (stable code + sentence) — the site is reported as left alone;
- ``rewrite(bindings)`` returns ``(fn, inputs)``: a plain Python function of
  tensors and the graph values to call it with. It never rejects: ``fn`` is
  traced with ``torch.fx`` and its nodes are inlined in place of ``node``.

A :class:`RulePass` runs its rules over the graph once, then removes dead
code, lints and recompiles once. See docs/writing_passes.md and
examples/custom_pass.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch.fx as fx

from ..graph.nodes import tidy_graph
from .base import Pass, PassContext, PassResult


@dataclass(frozen=True)
class Reason:
    """Why a matched site is left alone: a stable ``code`` and a ``text`` for people."""

    code: str
    text: str


@dataclass
class Rule:
    """One rewrite: ``match`` → ``check`` → ``rewrite`` (see the module docstring)."""

    name: str
    match: Callable[[fx.GraphModule, fx.Node], Optional[dict]]
    rewrite: Callable[[dict], tuple]
    check: Optional[Callable[[fx.GraphModule, dict], Optional[Reason]]] = None
    description: str = ""


def inline(gm: fx.GraphModule, before: fx.Node, fn: Callable, inputs: Sequence[Any]) -> Any:
    """Trace ``fn(*inputs)`` and insert its nodes before ``before``; returns the output value.

    ``inputs`` are graph nodes or Python constants; constants are baked into
    the trace (they are not placeholders).
    """
    consts = {i: x for i, x in enumerate(inputs) if not isinstance(x, fx.Node)}
    nodes = [x for x in inputs if isinstance(x, fx.Node)]

    def wrapper(*tensors):
        it = iter(tensors)
        return fn(*[consts[i] if i in consts else next(it) for i in range(len(inputs))])

    names = [f"x{i}" for i in range(len(nodes))]
    src = f"def traced({', '.join(names)}):\n    return wrapper({', '.join(names)})\n"
    scope: dict = {"wrapper": wrapper}
    exec(compile(src, "<recopt.rules>", "exec"), scope)   # a fixed-arity signature for fx
    sub = fx.symbolic_trace(scope["traced"])
    env: dict = {}
    placeholders = iter(nodes)
    out = None
    with gm.graph.inserting_before(before):
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                env[n] = next(placeholders)
            elif n.op == "output":
                out = fx.node.map_arg(n.args[0], lambda a: env[a])
            elif n.op in ("get_attr", "call_module"):
                raise ValueError(f"rule replacement {getattr(fn, '__name__', fn)} uses module state "
                                 f"({n.target}); pass parameters in as inputs instead")
            else:
                env[n] = gm.graph.node_copy(n, lambda a: env[a])
    return out


class RulePass(Pass):
    """A pass made of :class:`Rule` s. Subclasses set ``name``, ``semantics`` and ``rules``."""

    rules: Sequence[Rule] = ()

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sites = []
        done: set = set()
        for node in list(gm.graph.nodes):
            if node in done or node.graph is not gm.graph:
                continue
            for rule in self.rules:
                bindings = rule.match(gm, node)
                if bindings is None:
                    continue
                why = rule.check(gm, bindings) if rule.check is not None else None
                if why is not None:
                    sites.append(self.rejected(node, why.code, why.text, details={"rule": rule.name}))
                    break
                fn, inputs = rule.rewrite(bindings)
                out = inline(gm, node, fn, inputs)
                node.replace_all_uses_with(out)
                if isinstance(out, fx.Node):
                    for key in ("tensor_meta", "val", "nn_module_stack", "stack_trace"):
                        if key in node.meta:
                            out.meta.setdefault(key, node.meta[key])
                done.add(node)
                sites.append(self.rewritten(node, rule.description or rule.name,
                                            details={"rule": rule.name}))
                break
        if any(s.status == "rewritten" for s in sites):
            tidy_graph(gm)
        return PassResult(gm, sites)
