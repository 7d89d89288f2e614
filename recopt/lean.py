"""A lean generated forward for an fx GraphModule: less Python per call, same semantics.

``GraphModule.forward`` as fx generates it reaches every submodule and
parameter through a chain of ``nn.Module.__getattr__`` calls
(``getattr(self.layers, "0").attn.q_proj``), each a Python-level fallback
lookup: on the flattened InterFormer graph that is ~780 lookups per call
where the model itself does ~340, a measurable share of a batch-1 call on
the CPU. :class:`LeanForward` runs the same graph with

- every called submodule bound once, as a plain attribute of a small
  namespace object (one fast attribute read per call instead of a chain);
- every parameter and buffer read per call from its owner's
  ``_parameters`` / ``_buffers`` dict (one dict lookup): the dicts are the
  module's own, so in-place optimizer updates, ``.to()`` / ``.half()``
  (which may put new tensors in those dicts), ``load_state_dict`` (also
  with ``assign=True``) and ``train()`` / ``eval()`` are all seen, and
  parameters stay shared with the user's model.

The code is fx's own code generator run on a copy of the graph whose
``call_module`` / ``get_attr`` targets were re-pointed, so every other node
(call_function, call_method, pytree in/out specs) is emitted exactly as fx
would — except calls with a registered per-site specialiser
(:func:`_specialisers`: ``recopt.ops.gdpa`` sites become thin functions with
their constant options bound, see :func:`recopt.ops.gdpa_site.specialize`). If the graph module is recompiled (its graph edited), the lean
forward rebuilds itself on the next call. What it does not see: a
submodule *replaced* after it was built (``gm.layers[0] = other``) — build
a new one with :func:`lean_forward` — and hooks registered on the
GraphModule object itself (hooks on its submodules run as usual).
"""
from __future__ import annotations

import linecache
import operator
import re
from typing import Any

import torch.fx as fx
import torch.nn as nn

from .errors import InputError

_counter = [0]


class LeanForward:
    """Callable running ``gm``'s graph with pre-bound submodules (see module doc).

    ``lean.graph_module`` is the GraphModule it runs; it owns the parameters.
    Picklable and deep-copyable (rebuilt from the graph module).
    """

    def __init__(self, gm: fx.GraphModule):
        if not isinstance(gm, fx.GraphModule):
            raise InputError(f"lean_forward needs a torch.fx.GraphModule, got {type(gm).__name__}")
        object.__setattr__(self, "graph_module", gm)
        self._build()

    # -- building ----------------------------------------------------------
    def _build(self) -> None:
        gm = self.graph_module
        ns = self.__dict__
        for key in [k for k in ns if k.startswith("_b")]:
            del ns[key]
        bound: dict = {}  # id(object) -> alias, so shared modules/dicts get one name

        def alias(obj, prefix: str) -> str:
            name = bound.get(id(obj))
            if name is None:
                name = f"_b{prefix}{len(bound)}"
                bound[id(obj)] = name
                ns[name] = obj
            return name

        specialisers = _specialisers()
        graph = fx.Graph(owning_module=None, tracer_cls=gm.graph._tracer_cls)
        graph._codegen = gm.graph._codegen
        env: dict = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                mod = gm.get_submodule(node.target)
                new = graph.call_module(alias(mod, "m"), fx.map_arg(node.args, env.__getitem__),
                                        fx.map_arg(node.kwargs, env.__getitem__))
            elif node.op == "get_attr":
                new = self._lean_get_attr(graph, gm, node.target, alias)
            elif node.op == "call_function" and node.target in specialisers:
                new = self._specialised(graph, node, specialisers[node.target], env)
            else:
                new = graph.node_copy(node, env.__getitem__)
            new.meta = node.meta
            env[node] = new
        code = graph.python_code(root_module="self")
        for attr in set(re.findall(r"\bself\.(\w+)", code.src)) - set(ns):
            # Non-node attributes the code generator refers to (pytree in/out specs).
            if not hasattr(gm, attr):
                raise InputError(f"lean_forward: generated code refers to self.{attr}, which the graph module lacks")
            ns[attr] = getattr(gm, attr)
        _counter[0] += 1
        filename = f"<recopt-lean-{_counter[0]}>"
        linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
        glb = dict(code.globals)
        exec(compile(code.src, filename, "exec"), glb)  # noqa: S102 - fx-generated code of our own graph
        ns["_fn"] = glb["forward"]
        ns["_code_seen"] = gm._code
        ns["src"] = code.src

    @staticmethod
    def _specialised(graph: fx.Graph, node: fx.Node, specialise, env: dict) -> fx.Node:
        """``node`` re-pointed at a per-site function when ``specialise`` offers one.

        Keyword arguments that are graph values stay arguments; the constant
        ones are given to ``specialise``, which returns the site function or
        ``None`` (then the node is copied unchanged).
        """
        consts = {k: v for k, v in node.kwargs.items() if not isinstance(v, fx.Node)}
        dynamic = [k for k, v in node.kwargs.items() if isinstance(v, fx.Node)]
        nested = any(isinstance(a, (list, tuple, dict, slice)) for a in consts.values())
        site = None if nested else specialise(consts, dynamic)
        if site is None:
            return graph.node_copy(node, env.__getitem__)
        dyn = {k: env[v] for k, v in node.kwargs.items() if isinstance(v, fx.Node)}
        return graph.call_function(site, fx.map_arg(node.args, env.__getitem__), dyn)

    @staticmethod
    def _lean_get_attr(graph: fx.Graph, gm: fx.GraphModule, target: str, alias) -> fx.Node:
        owner_path, _, field = target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        for dict_name in ("_parameters", "_buffers", "_modules"):
            d = owner.__dict__.get(dict_name)
            if d is not None and field in d:
                break
        else:
            d = owner.__dict__
            if field not in d:
                raise InputError(f"lean_forward: the graph reads {target!r}, which the graph module does not have")
        holder = graph.get_attr(alias(d, "d"))
        return graph.call_function(operator.getitem, (holder, field))

    # -- calling -----------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.graph_module._code is not self._code_seen:  # graph edited and recompiled
            self._build()
        return self._fn(self, *args, **kwargs)

    def __reduce__(self):
        return (LeanForward, (self.graph_module,))

    def __repr__(self) -> str:
        return f"LeanForward({type(self.graph_module).__name__}, {len(self.graph_module.graph.nodes)} nodes)"


def _specialisers() -> dict:
    """call_function target -> factory of a per-site function (see :meth:`LeanForward._specialised`).

    GDPA: on the CPU each call site gets a thin function with its activation
    and scales baked in (:func:`recopt.ops.gdpa_site.specialize`), which falls
    back to the generic ``gdpa`` off the CPU or on layouts it does not handle.
    """
    from .ops.gdpa import gdpa
    from .ops.gdpa_site import specialize

    return {gdpa: specialize}


def lean_forward(gm: fx.GraphModule) -> LeanForward:
    """A :class:`LeanForward` for ``gm``: same outputs, same parameters, less per-call Python."""
    return LeanForward(gm)


def count_module_getattr(fn, *args, **kwargs) -> int:
    """How many ``nn.Module.__getattr__`` fallbacks one call of ``fn(*args)`` makes (a diagnostic)."""
    orig = nn.Module.__getattr__
    n = [0]

    def counting(self, name):
        n[0] += 1
        return orig(self, name)

    nn.Module.__getattr__ = counting
    try:
        fn(*args, **kwargs)
    finally:
        nn.Module.__getattr__ = orig
    return n[0]
