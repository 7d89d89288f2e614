"""From ``recopt.optimize``'s result (or any nn.Module) to a ``torch.export`` program.

Shared by every format: ONNX is translated from this program, ``pt2`` saves
it and ``aoti`` compiles it.

Dynamic dimensions are requested with ``Dim.AUTO``: torch.export keeps a
dimension symbolic where the model allows it and fixes it where the model
needs a constant (e.g. ``x[:, :6]`` makes ``seq >= 6``, a ``view`` to a
literal size fixes the dim). What it decided is read back from the program
(:func:`describe_program`), so the manifest states the real contract, and a
requested dim that became a constant is reported with a warning.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from ..errors import InputError

BATCH = "batch"


@dataclass
class ExportSource:
    """What gets exported: ``module`` (eval mode) called as ``module(*args)``."""

    module: nn.Module
    args: tuple
    input_names: List[str]
    report: Any = None               # OptimizationReport or None
    original: Optional[nn.Module] = None
    notes: List[str] = field(default_factory=list)


def resolve_source(opt_or_module: Any, example_inputs: Any) -> ExportSource:
    """Unwrap an ``OptimizedModel`` to its rewritten graph; accept any nn.Module."""
    from ..api import OptimizedModel

    if example_inputs is None:
        raise InputError("example_inputs is required: pass the tuple of tensors the model is called with")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) or not isinstance(
        example_inputs, (tuple, list)) else tuple(example_inputs)
    notes: List[str] = []
    if isinstance(opt_or_module, OptimizedModel):
        report = opt_or_module.report
        original = opt_or_module.original
        # Exported artifacts serve inference: the eval-mode graph, whatever
        # mode the optimized model is in (a train graph has live dropout).
        if opt_or_module.graph_for(False) is None:
            module = original
            notes.append("the model was not captured by recopt.optimize (eager fallback): the original "
                         "module is exported, without recopt rewrites")
            names = _forward_names(original, args)
        else:
            module = opt_or_module.graph_for(False)
            cap = opt_or_module.captured_for(False)
            names = list(cap.input_names) if cap is not None else _forward_names(original, args)
            if cap is not None and not cap.guards_hold(args):
                raise InputError(
                    "example_inputs break the shape guards the optimized graph was specialised on "
                    f"({cap.guards[:2]}...); export with inputs shaped like the ones given to recopt.optimize"
                )
    elif isinstance(opt_or_module, nn.Module):
        report, original, module = None, opt_or_module, opt_or_module
        names = _forward_names(module, args)
    else:
        raise InputError(
            f"recopt.export expects the result of recopt.optimize or an nn.Module, got {type(opt_or_module).__name__}"
        )
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise InputError(
                f"example input {i} ({names[i] if i < len(names) else '?'}) is a {type(a).__name__}; "
                "exported models take tensors only — pass tensors (e.g. jagged data as values + offsets)"
            )
    return ExportSource(module, args, names, report, original, notes)


def _forward_names(module: nn.Module, args: tuple) -> List[str]:
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return [params[i].name if i < len(params) else f"input_{i}" for i in range(len(args))]


def normalise_dynamic_dims(dynamic_dims: Any, input_names: Sequence[str], args: tuple,
                           dynamic_batch: bool) -> Dict[Tuple[int, int], str]:
    """``{(input index, axis): dim name}`` from ``dynamic_batch`` and ``dynamic_dims``.

    ``dynamic_dims`` maps an input name to ``{axis: name}`` or to a list of
    axes (named ``<input>_dim<axis>``); the same name on several inputs
    declares that those sizes are equal (e.g. ``{"seq_ids": {2: "seq"},
    "seq_times": {2: "seq"}}``).
    """
    out: Dict[Tuple[int, int], str] = {}
    if dynamic_batch:
        for i, a in enumerate(args):
            if a.dim() >= 1:
                out[(i, 0)] = BATCH
    for name, spec in (dynamic_dims or {}).items():
        if name not in input_names:
            raise InputError(f"dynamic_dims names input {name!r}, but the inputs are {list(input_names)}")
        i = list(input_names).index(name)
        items = spec.items() if isinstance(spec, dict) else ((ax, f"{name}_dim{ax}") for ax in spec)
        for axis, dim_name in items:
            axis = int(axis)
            nd = args[i].dim()
            if not -nd <= axis < nd:
                raise InputError(f"dynamic_dims: input {name!r} has {nd} dims, axis {axis} does not exist")
            out[(i, axis % nd)] = str(dim_name)
    return out


class no_mha_fastpath:
    """Turn off the fused "fast path" of ``nn.TransformerEncoder`` / ``nn.MultiheadAttention`` (eval mode).

    That path runs on nested tensors and writes 0 at padded positions, while
    torch.export (and every runtime) computes the regular path, which gives
    those positions ordinary values (NaN for rows with every key masked). The
    export and its parity reference both run the regular path, so they agree
    on every position; a server should ignore padded positions either way.
    """

    def __enter__(self):
        mha = getattr(torch.backends, "mha", None)
        self._prev = mha.get_fastpath_enabled() if mha is not None else None
        if mha is not None:
            mha.set_fastpath_enabled(False)
        return self

    def __exit__(self, *exc):
        if self._prev is not None:
            torch.backends.mha.set_fastpath_enabled(self._prev)
        return False


def export_program(src: ExportSource, dims: Dict[Tuple[int, int], str]):
    """``torch.export.export`` of ``src.module`` with ``Dim.AUTO`` on the requested dims."""
    auto = torch.export.Dim.AUTO
    shapes = []
    for i, a in enumerate(src.args):
        axes = {ax: auto for (j, ax) in dims if j == i}
        shapes.append(axes or None)
    module = src.module
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings(), no_mha_fastpath():
            warnings.simplefilter("ignore")
            return torch.export.export(module, src.args, dynamic_shapes=tuple(shapes), strict=False)
    finally:
        module.train(was_training)


def _placeholder_vals(ep) -> list:
    from torch.export.graph_signature import InputKind

    user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    by_name = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    return [by_name[n].meta.get("val") for n in user]


def describe_program(ep, src: ExportSource, dims: Dict[Tuple[int, int], str]) -> dict:
    """What export decided: per-input shapes with dim names, dim ranges, specialised dims.

    Returns ``{"inputs": [...], "dynamic_dims": {...}, "specialized_dims": [...],
    "symbols": {symbol: dim name}}``.
    """
    vals = _placeholder_vals(ep)
    symbols: Dict[str, str] = {}
    ranges = {str(k): v for k, v in ep.range_constraints.items()}
    dynamic: Dict[str, dict] = {}
    specialized = []
    inputs = []
    for i, (name, val) in enumerate(zip(src.input_names, vals)):
        shape = []
        for ax, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt) and getattr(size.node.expr, "is_number", False):
                size = int(size.node.expr)  # a symbol export solved to a constant
            if isinstance(size, torch.SymInt):
                sym = str(size.node.expr)
                dim_name = dims.get((i, ax))
                if sym not in symbols:
                    symbols[sym] = dim_name or f"{name}_dim{ax}"
                elif dim_name and symbols[sym] != dim_name and symbols[sym].endswith(f"_dim{ax}"):
                    symbols[sym] = dim_name
                shape.append(sym)
            else:
                shape.append(int(size))
                if (i, ax) in dims:
                    specialized.append({
                        "input": name, "axis": ax, "size": int(size),
                        "reason": "the model needs this size to be a constant (torch.export specialised it)"})
        inputs.append({"name": name, "dtype": str(val.dtype).replace("torch.", ""), "shape": shape})
    for inp in inputs:
        inp["shape"] = [symbols.get(s, s) if isinstance(s, str) else s for s in inp["shape"]]
    for sym, dim_name in symbols.items():
        vr = ranges.get(sym)
        lo = int(vr.lower) if vr is not None and _finite(vr.lower) else None
        hi = int(vr.upper) if vr is not None and _finite(vr.upper) else None
        uses = [[inp["name"], ax] for inp in inputs for ax, s in enumerate(inp["shape"]) if s == dim_name]
        if dim_name in dynamic:
            # Several symbols under one declared name (the caller said the sizes are equal):
            # the name accepts what all of them accept.
            prev = dynamic[dim_name]
            lo = max(x for x in (lo, prev["min"]) if x is not None) if (lo, prev["min"]) != (None, None) else None
            his = [x for x in (hi, prev["max"]) if x is not None]
            hi = min(his) if his else None
        dynamic[dim_name] = {"min": lo, "max": hi, "uses": uses}
    for s in specialized:
        warnings.warn(
            f"recopt.export: input {s['input']!r} axis {s['axis']} was asked to be dynamic but the model fixes it "
            f"to {s['size']}; the artifact accepts only that size there", stacklevel=3)
    return {"inputs": inputs, "dynamic_dims": dynamic, "specialized_dims": specialized, "symbols": symbols}


def _finite(x) -> bool:
    try:
        if getattr(x, "is_finite", True) is False:
            return False
        v = int(x)
    except Exception:  # sympy infinities raise assorted errors on int()
        return False
    return abs(v) < 2**62


def reference_outputs(module: nn.Module, args: tuple) -> List[torch.Tensor]:
    """Flattened outputs of ``module(*args)`` in eval mode without grad."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), no_mha_fastpath():
            out = module(*args)
    finally:
        module.train(was_training)
    flat, _ = pytree.tree_flatten(out)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def output_entries(outputs: List[torch.Tensor], output_names: Optional[Sequence[str]], out_shapes=None) -> list:
    names = list(output_names) if output_names else (
        ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))])
    if len(names) != len(outputs):
        raise InputError(f"output_names has {len(names)} names but the model returns {len(outputs)} tensors")
    entries = []
    for k, (n, t) in enumerate(zip(names, outputs)):
        shape = out_shapes[k] if out_shapes is not None else list(t.shape)
        entries.append({"name": n, "dtype": str(t.dtype).replace("torch.", ""), "shape": shape})
    return entries


def program_output_shapes(ep, symbols: Dict[str, str]) -> Optional[list]:
    """Output shapes of the program with dim names substituted (None if unknown)."""
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    vals = []
    for a in pytree.tree_leaves(out_node.args[0]):
        v = a.meta.get("val") if isinstance(a, torch.fx.Node) else None
        if not isinstance(v, torch.Tensor):
            return None
        vals.append([symbols.get(str(s.node.expr), str(s.node.expr)) if isinstance(s, torch.SymInt) else int(s)
                     for s in v.shape])
    return vals
