"""Capture a plain nn.Module as a torch.fx GraphModule with shape metadata.

Two captures, tried in order (``method="auto"``):

1. ``symbolic_trace`` with :class:`RecTracer`, which keeps TorchRec modules
   (and user-named modules) as leaves, so KeyedJaggedTensor handling stays
   inside them. Produces a shape-generic graph.
2. Dynamo (``torch._dynamo.export``) when symbolic tracing fails, as it does
   on ``len(x.shape)`` checks and Python branches on sizes. Dynamo
   specialises such branches; the shape guards it needed are recorded in
   :attr:`CapturedModel.guards` and checked on every later call
   (:meth:`CapturedModel.guards_hold`).

Either way the graph is then run once on the example inputs with
:class:`ShapeRecorder` (torch.fx's ShapeProp, quieter), so every tensor-valued node
carries ``node.meta["tensor_meta"]``.
"""
from __future__ import annotations

import inspect
import linecache
import re
import traceback
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .errors import CaptureError, InputError

CAPTURE_METHODS = ("auto", "symbolic_trace", "dynamo")


# TorchRec modules kept whole: embedding collections (they take a
# KeyedJaggedTensor and do data-dependent work inside), feature processors,
# and everything sharded. Other TorchRec modules (the DLRM archs, MLPs) are
# plain PyTorch and are traced through, so passes see their layers and the
# collections inside them.
_TORCHREC_LEAF_PACKAGES = (
    "torchrec.distributed.",
    "torchrec.modules.embedding_modules",
    "torchrec.modules.fused_embedding_modules",
    "torchrec.modules.feature_processor",
    "torchrec.modules.mc_",
    "torchrec.sparse.",
)


def _is_torchrec_leaf(m: nn.Module) -> bool:
    mod = type(m).__module__
    return mod.startswith("torchrec.") and mod.startswith(_TORCHREC_LEAF_PACKAGES)


class RecTracer(fx.Tracer):
    """A symbolic tracer that treats TorchRec modules, listed types and
    classes marked ``__recopt_leaf__ = True`` as leaves.

    TorchRec's sharded and unsharded embedding modules take a
    KeyedJaggedTensor and do data-dependent work inside; as leaves they
    appear in the graph as one ``call_module`` each, which the sparse passes
    consume.
    """

    def __init__(self, leaf_modules: Sequence[type] = ()):
        super().__init__()
        self.extra_leaf_types = tuple(leaf_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.extra_leaf_types and isinstance(m, self.extra_leaf_types):
            return True
        if _is_torchrec_leaf(m):
            return True
        # recopt's own modules that passes insert (FP8Linear, BlockNorm) are
        # single ops to later passes and to a re-capture.
        if getattr(type(m), "__recopt_leaf__", False):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclass
class CapturedModel:
    """The result of :func:`capture`.

    ``graph_module`` computes the same function as the model on inputs that
    satisfy ``guards`` (always, for symbolic tracing). ``method`` says which
    capture produced it; ``diagnostics`` holds why earlier methods failed.
    """

    graph_module: fx.GraphModule
    method: str
    example_inputs: tuple
    input_names: list
    guards: list = field(default_factory=list)
    diagnostics: list = field(default_factory=list)
    source_module: Optional[str] = None
    example_output: Any = None
    flops: Optional[float] = None

    def guards_hold(self, args: tuple) -> bool:
        """Whether Dynamo's shape guards hold for these call arguments."""
        if not self.guards:
            return True
        env = {"L": dict(zip(self.input_names, args))}
        for g in self.guards:
            try:
                if not eval(g, {"__builtins__": {"str": str, "len": len}}, env):  # noqa: S307 - guard text from Dynamo
                    return False
            except Exception:
                return False
        return True


def _normalise_inputs(example_inputs: Any) -> tuple:
    if example_inputs is None:
        raise InputError(
            "example_inputs is required: pass a tuple of tensors shaped like a real batch, "
            "e.g. recopt.optimize(model, (dense, ids, lengths))"
        )
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)):
        return (example_inputs,)
    return tuple(example_inputs)


def check_model_and_inputs(model: nn.Module, example_inputs: Any) -> tuple:
    """Validate the model and inputs; return the inputs as a tuple.

    Errors name the problem and the fix: not a module, parameters on the
    meta device, inputs that do not bind to ``forward``'s signature.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"recopt expects a torch.nn.Module, got {type(model).__name__}")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise InputError(
                f"parameter/buffer {name!r} is on the meta device, so the model cannot run; "
                "materialise it first (e.g. model.to_empty(device='cpu') and load a state dict)"
            )
    args = _normalise_inputs(example_inputs)
    try:
        inspect.signature(model.forward).bind(*args)
    except TypeError as e:
        sig = inspect.signature(model.forward)
        raise InputError(
            f"example_inputs do not match {type(model).__name__}.forward{sig}: {e}. "
            f"Pass one value per positional argument of forward, in order."
        ) from None
    return args


def _input_names(model: nn.Module, args: tuple) -> list:
    params = list(inspect.signature(model.forward).parameters.values())
    names = []
    for i, _ in enumerate(args):
        names.append(params[i].name if i < len(params) else f"arg{i}")
    return names


def _user_frame(exc: BaseException, model: nn.Module) -> str:
    """The innermost frame of the traceback that is in the model's own source."""
    try:
        model_file = inspect.getsourcefile(type(model))
    except TypeError:
        model_file = None
    best = None
    for fs in traceback.extract_tb(exc.__traceback__):
        if "/torch/" in fs.filename or "/recopt/capture" in fs.filename:
            continue
        if model_file is None or fs.filename == model_file or best is None:
            best = fs
    if best is None:
        return ""
    line = (best.line or linecache.getline(best.filename, best.lineno)).strip()
    return f"{best.filename}:{best.lineno} ({best.name}): {line}"


def _symbolic_trace(model: nn.Module, leaf_modules: Sequence[type]) -> fx.GraphModule:
    tracer = RecTracer(leaf_modules)
    graph = tracer.trace(model)
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


_GUARD_INPUT_RE = re.compile(r"L\['([A-Za-z_][A-Za-z0-9_]*)'\]")
_GUARD_KEEP_RE = re.compile(r"\.size\(\)|\.ndimension\(\)|\.dim\(\)|\.dtype|\.device")
_GUARD_DROP_RE = re.compile(r"stride|storage_offset|___|hasattr|requires_grad")


def _dynamo_capture(model: nn.Module, args: tuple, input_names: list) -> tuple:
    import torch._dynamo as dynamo

    dynamo.reset()
    result = dynamo.export(model)(*args)
    guards = []
    for g in result.guards:
        for code in getattr(g, "code_list", None) or []:
            refs = set(_GUARD_INPUT_RE.findall(code))
            # Keep only guards on the call's own inputs (not on parameters,
            # which Dynamo guards through `self`) that decide what the graph
            # computes: sizes, rank, dtype, device. Strides, requires_grad and
            # Dynamo's bookkeeping attributes do not.
            if refs and refs <= set(input_names) and _GUARD_KEEP_RE.search(code) \
                    and not _GUARD_DROP_RE.search(code):
                guards.append(code)
    return result.graph_module, sorted(set(guards))


class ShapeRecorder(fx.Interpreter):
    """Runs a graph and records ``tensor_meta`` (shape, dtype, ...) and ``type`` on each node.

    Like torch.fx's ShapeProp, but an op that fails raises an error naming
    the node and its source, without printing a traceback (a rewrite that
    fails verification is an expected event, reported, not logged).
    """

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            stack = (n.meta.get("stack_trace") or "").strip().splitlines()
            where = f" (from {stack[-2].strip()})" if len(stack) >= 2 else ""
            raise type(e)(f"node {n.name} = {n.format_node()}{where}: {e}") if _reraisable(e) else e
        found = False

        def extract(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = fx.node.map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


def _reraisable(e: Exception) -> bool:
    try:
        type(e)("probe")
        return True
    except Exception:
        return False


def propagate_shapes(gm: fx.GraphModule, args: tuple) -> Any:
    """Run ``gm`` on ``args`` recording ``tensor_meta`` on every node; return its output.

    Runs under ``torch.no_grad``; the caller chooses train/eval mode.
    """
    with torch.no_grad():
        return ShapeRecorder(gm).run(*args)


def _raise_if_inputs_are_bad(model: nn.Module, args: tuple, was_training: bool) -> None:
    """Run the model eagerly (eval mode, no grad); raise InputError if it fails.

    Called when a capture fails, to tell bad inputs (the user's fix) from
    an untraceable model (ours to work around).
    """
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    except Exception as e:
        where = _user_frame(e, model)
        raise InputError(
            f"{type(model).__name__} fails on example_inputs before any capture: "
            f"{type(e).__name__}: {e}" + (f" at {where}" if where else "")
            + ". Check the inputs' shapes and dtypes against what forward expects."
        ) from None
    finally:
        model.train(was_training)


def _propagate_in_eval(gm: fx.GraphModule, args: tuple) -> tuple:
    """propagate_shapes in eval mode with a fixed seed, counting FLOPs.

    Returns ``(output, flops or None)``; restores the mode and every buffer.
    """
    from .costs import count_graph_flops
    from .verify import run_deterministic

    out = run_deterministic(lambda *a: propagate_shapes(gm, a), args, 0, module=gm)
    return out, count_graph_flops(gm, args)


def capture(
    model: nn.Module,
    example_inputs: Any,
    *,
    method: str = "auto",
    leaf_modules: Sequence[type] = (),
) -> CapturedModel:
    """Capture ``model`` as an fx GraphModule with shapes from ``example_inputs``.

    ``method``: ``"auto"`` (symbolic tracing, then Dynamo), ``"symbolic_trace"``
    or ``"dynamo"``. Raises :class:`CaptureError` naming the failing source
    line and what to do when every method fails.
    """
    if method not in CAPTURE_METHODS:
        raise InputError(f"unknown capture method {method!r}; valid: {', '.join(CAPTURE_METHODS)}")
    args = check_model_and_inputs(model, example_inputs)
    input_names = _input_names(model, args)
    diagnostics = []
    was_training = model.training
    try:
        if method in ("auto", "symbolic_trace"):
            try:
                gm = _symbolic_trace(model, leaf_modules)
                out, flops = _propagate_in_eval(gm, args)
                return CapturedModel(gm, "symbolic_trace", args, input_names, diagnostics=diagnostics,
                                     source_module=type(model).__name__, example_output=out, flops=flops)
            except Exception as e:
                _raise_if_inputs_are_bad(model, args, was_training)
                where = _user_frame(e, model)
                diagnostics.append(
                    f"symbolic_trace failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    + (f" at {where}" if where else "")
                )
                if method == "symbolic_trace":
                    raise CaptureError(
                        f"torch.fx symbolic tracing of {type(model).__name__} failed: {diagnostics[-1]}. "
                        "Use method='auto' to fall back to Dynamo capture, or mark the offending "
                        "submodule as a leaf (leaf_modules=[...])."
                    ) from None
        else:
            _raise_if_inputs_are_bad(model, args, was_training)

        try:
            gm, guards = _dynamo_capture(model, args, input_names)
            gm.train(was_training)
            out, flops = _propagate_in_eval(gm, args)
            return CapturedModel(gm, "dynamo", args, input_names, guards=guards, diagnostics=diagnostics,
                                 source_module=type(model).__name__, example_output=out, flops=flops)
        except Exception as e:
            where = _user_frame(e, model)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            diagnostics.append(f"dynamo capture failed: {type(e).__name__}: {first}" + (f" at {where}" if where else ""))
            raise CaptureError(
                f"could not capture {type(model).__name__} as one graph. "
                + " | ".join(diagnostics)
                + ". Fix: remove data-dependent Python control flow at that line (use torch.where), "
                "mark the submodule as a leaf with leaf_modules=[...], or call "
                "recopt.optimize(..., on_untraceable='eager') to run the model unchanged."
            ) from None
    finally:
        model.train(was_training)
