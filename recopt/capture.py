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

from .errors import CaptureError, InputError
from .graph.shapes import ShapeRecorder, propagate_shapes  # noqa: F401  (re-exported: lower and users import it from here)

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


# Random functions whose draws must stay in the graph (see RecTracer.trace).
RANDOM_FUNCTIONS = tuple(
    (torch, name) for name in (
        "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like",
        "bernoulli", "multinomial", "normal", "poisson",
    )
)


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
        # Buffers read as attributes become graph nodes, as parameters do. fx's default reads
        # them as plain tensors, so work done on buffers alone (``clamp(self.step / 10)``)
        # ran once at trace time and was frozen into a ``_tensor_constant``: the graph then
        # never saw later updates (a train step, an EMA, load_state_dict).
        self.proxy_buffer_attributes = True

    def trace(self, root, concrete_args=None):
        """Trace with the random factories and grad-mode switches patched, so they stay graph nodes.

        ``torch.randn(4, 8)`` has no traced argument, so plain symbolic
        tracing would call it once and freeze the draw as a constant. While
        tracing, the functions in :data:`RANDOM_FUNCTIONS` record a node
        whatever their arguments. ``with torch.no_grad():`` in a forward
        switches grad mode through ``torch._C._set_grad_enabled``, which fx
        does not see: it is recorded as a node too (tracing runs with grad
        mode on), and :func:`runtime_grad_regions` then makes each region
        restore the caller's mode.
        """
        saved = {}
        for owner, name in RANDOM_FUNCTIONS:
            orig = getattr(owner, name, None)
            if orig is None:
                continue
            saved[(owner, name)] = orig
            setattr(owner, name, self._recording(orig))
        set_grad = torch._C._set_grad_enabled
        tracer = self

        def recording_set_grad(mode):
            tracer.create_proxy("call_function", set_grad, (bool(mode),), {})

        try:
            with torch.enable_grad():
                torch._C._set_grad_enabled = recording_set_grad
                try:
                    return super().trace(root, concrete_args)
                finally:
                    torch._C._set_grad_enabled = set_grad
        finally:
            for (owner, name), orig in saved.items():
                setattr(owner, name, orig)

    def _recording(self, orig):
        tracer = self

        def random_op(*args, **kwargs):
            return tracer.create_proxy("call_function", orig, args, kwargs)

        random_op.__name__ = getattr(orig, "__name__", "random_op")
        return random_op

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

    ``graph_module`` computes the same function as the model in the mode
    ``training`` says, on inputs that satisfy ``guards`` (always, for
    symbolic tracing). ``method`` says which capture produced it;
    ``diagnostics`` holds why earlier methods failed.
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
    training: bool = False
    # Why ``flops`` is missing or too low (see recopt.costs.FlopCount.incomplete); empty: complete.
    flops_incomplete: list = field(default_factory=list)

    def guards_hold(self, args: tuple) -> bool:
        """Whether every shape guard (Dynamo's and the passes') holds for these call arguments.

        The guards are compiled once into one function
        (:func:`recopt.guards.compile_guards`) and recompiled only when the
        list changes.
        """
        if not self.guards:
            return True
        key = tuple(self.guards)
        cached = self.__dict__.get("_guard_check")
        if cached is None or cached[0] != key:
            from .guards import compile_guards

            cached = (key, compile_guards(self.guards, self.input_names))
            self.__dict__["_guard_check"] = cached
        return cached[1](args)


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
    gm = fx.GraphModule(tracer.root, graph, name)
    runtime_grad_regions(gm, traced_with_grad=True)
    return gm


def runtime_grad_regions(gm: fx.GraphModule, traced_with_grad: bool) -> int:
    """Rewrite ``torch._C._set_grad_enabled(mode)`` pairs into regions that restore the caller's mode.

    A ``with torch.no_grad():`` block traces as ``_set_grad_enabled(False)`` ...
    ``_set_grad_enabled(<the mode at trace time>)``; run under the caller's
    ``torch.no_grad()`` the second call would switch gradients *on*. Calls are
    paired like brackets (a call setting the mode that was current before the
    innermost open region closes it): the opening call becomes
    ``prev = enter_grad_mode(mode)``, the closing one ``exit_grad_mode(prev)``
    (:mod:`recopt.ops.grad_mode`). An unpaired call (a bare
    ``torch.set_grad_enabled(False)`` never undone) stays a plain switch, as in
    the model. Returns the number of regions rewritten.
    """
    from .ops.grad_mode import enter_grad_mode, exit_grad_mode

    graph = gm.graph
    stack: list = []          # (enter node, the mode before it)
    current = traced_with_grad
    regions = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch._C._set_grad_enabled:
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], bool):
            continue
        mode = node.args[0]
        if stack and mode == stack[-1][1]:
            enter, _ = stack.pop()
            with graph.inserting_before(node):
                new = graph.call_function(exit_grad_mode, (enter,))
        else:
            with graph.inserting_before(node):
                new = graph.call_function(enter_grad_mode, (mode,))
            stack.append((new, current))
            regions += 1
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        current = mode
    # An opened region never closed in the graph: a plain switch, as the model does it.
    for enter, _ in stack:
        enter.target = torch._C._set_grad_enabled
        regions -= 1
    if regions or stack:
        graph.lint()
        gm.recompile()
    return regions


_GUARD_INPUT_RE = re.compile(r"L\['([A-Za-z_][A-Za-z0-9_]*)'\]")
_GUARD_KEEP_RE = re.compile(r"\.size\(\)|\.ndimension\(\)|\.dim\(\)|\.dtype|\.device")
_GUARD_DROP_RE = re.compile(r"stride|storage_offset|___|hasattr|requires_grad")


def _dynamo_capture(model: nn.Module, args: tuple, input_names: list) -> tuple:
    import torch._dynamo as dynamo

    dynamo.reset()
    with torch.enable_grad():  # grad-mode regions are traced from grad mode on (see runtime_grad_regions)
        result = dynamo.export(model)(*args)
    runtime_grad_regions(result.graph_module, traced_with_grad=True)
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# How many fresh input sets (besides the example) capture checks the graph on.
CHECK_INPUT_SETS = 1
_CHECK_SEED = 1234


@dataclass
class _Reference:
    """What the model did on one input set: its output, the buffers it moved, the inputs it mutated."""

    args: tuple
    seed: int
    output: Any
    buffers: dict      # qualified name -> value after the call, for buffers changed in place
    inputs_after: list  # the input tensors' values after the call


def _run_and_observe(fn, module: nn.Module, args: tuple, seed: int, training: bool, snapshot) -> tuple:
    """Run ``fn`` on a copy of ``args`` in ``training`` mode with a fixed seed;
    return ``(output, changes, changed buffer values, input values after)``
    and put ``module``'s state back as ``snapshot`` recorded it."""
    from .state import clone_inputs, rng_devices

    work = clone_inputs(args)
    try:
        module.train(training)
        with torch.no_grad(), torch.random.fork_rng(devices=rng_devices(args)):
            torch.manual_seed(seed)
            out = fn(*work)
        changes = snapshot.changes()
        moved = {c.name: snapshot.tensors[c.name][3].detach().clone() for c in changes if c.kind == "data"}
        leaves = [x.detach() for x in torch.utils._pytree.tree_leaves(work) if isinstance(x, torch.Tensor)]
        return out, [c for c in changes if c.kind != "mode"], moved, leaves
    finally:
        snapshot.restore()


def _check_sets(args: tuple) -> list:
    from .verify import random_like_inputs

    gen = torch.Generator().manual_seed(_CHECK_SEED)
    return [tuple(args)] + [random_like_inputs(tuple(args), gen) for _ in range(CHECK_INPUT_SETS)]


def graph_differs_in_mode(model: nn.Module, gm: fx.GraphModule, args: tuple, training: bool) -> Optional[str]:
    """Why ``gm`` differs from ``model`` in mode ``training`` on the example (same seed), or None.

    ``optimize`` asks this of an eval-mode graph before letting it serve
    train mode too, so a mode dependence the class-level scan
    (:func:`recopt.modes.mode_dependent_modules`) missed is still caught.
    Leaves the model and ``gm`` as they were.
    """
    from .state import ModuleState

    snapshot = ModuleState(model)
    was = gm.training
    try:
        refs = _model_references(model, args, training, snapshot, n_fresh=0)
        gm.train(training)
        return _graph_differs(model, gm, refs, training, snapshot)
    except (InputError, CaptureError) as e:
        return str(e)
    finally:
        gm.train(was)
        snapshot.restore()


def _model_references(model: nn.Module, args: tuple, training: bool, snapshot,
                      n_fresh: int = CHECK_INPUT_SETS) -> list:
    """Run the model on the example and on fresh inputs; refuse state a graph cannot repeat.

    Raises :class:`InputError` when the model fails on the example itself,
    :class:`CaptureError` when forward changes Python-side state (a plain
    attribute, or a parameter/buffer rebound to a new tensor).
    """
    refs = []
    mode = "train" if training else "eval"
    for i, a in enumerate(_check_sets(args)[:1 + n_fresh]):
        try:
            out, changes, moved, after = _run_and_observe(model, model, a, _CHECK_SEED + i, training, snapshot)
        except Exception as e:
            if i > 0:
                continue  # a fresh set the model itself rejects is no evidence either way
            where = _user_frame(e, model)
            raise InputError(
                f"{type(model).__name__} fails on example_inputs in {mode} mode before any capture: "
                f"{type(e).__name__}: {_first_line(e)}" + (f" at {where}" if where else "")
                + ". Check the inputs' shapes and dtypes against what forward expects."
            ) from None
        python_side = [c for c in changes if c.kind != "data"]
        if python_side:
            c = python_side[0]
            if c.kind == "attribute":
                what = f"changes the Python attribute self.{c.name} ({c.before} -> {c.after})"
                fix = (f"keep it in a buffer updated in place (register_buffer({c.name.rsplit('.', 1)[-1]!r}, ...) "
                       f"and .add_(1)/.copy_(...)), or move the bookkeeping out of forward")
            else:
                what = f"{'assigns a new tensor to' if c.kind == 'rebound' else c.kind + ' '} self.{c.name}"
                fix = (f"update the tensor in place instead (self.{c.name.rsplit('.', 1)[-1]}.add_(1) or "
                       f".copy_(new_value)), which the graph keeps, or move the update out of forward")
            raise CaptureError(
                f"{type(model).__name__}.forward {what} in {mode} mode: a captured graph runs the Python "
                f"around it once, at capture, so the optimized model would never do it again. Fix: {fix}."
                + (f" ({len(python_side) - 1} more such change(s).)" if len(python_side) > 1 else "")
            )
        refs.append(_Reference(a, _CHECK_SEED + i, out, moved, after))
    return refs


def _graph_differs(model: nn.Module, gm: fx.GraphModule, refs: list, training: bool, snapshot) -> Optional[str]:
    """Why ``gm`` does not do what the model did on the reference runs, or None."""
    from .verify import compare_outputs

    for i, ref in enumerate(refs):
        which = "the example inputs" if i == 0 else f"fresh input set {i}"
        try:
            out, changes, moved, after = _run_and_observe(gm, model, ref.args, ref.seed, training, snapshot)
        except Exception as e:
            return f"the graph fails on {which}: {type(e).__name__}: {_first_line(e)}"
        mismatch = compare_outputs(ref.output, out)
        if mismatch is not None:
            return f"{mismatch} (on {which}, same RNG seed)"
        for name in sorted(set(ref.buffers) | set(moved)):
            if name not in moved:
                return f"forward updates {name} in place but the graph does not (on {which})"
            if name not in ref.buffers:
                return f"the graph updates {name} but forward does not (on {which})"
            mismatch = compare_outputs(ref.buffers[name], moved[name])
            if mismatch is not None:
                return f"{name} after the call: {mismatch.message} (on {which})"
        for k, (x, y) in enumerate(zip(ref.inputs_after, after)):
            mismatch = compare_outputs(x, y)
            if mismatch is not None:
                return f"input {k} after the call (forward mutates it): {mismatch.message} (on {which})"
    return None


def _grad_signature(fn, module: nn.Module, args: tuple, training: bool, snapshot) -> tuple:
    """Which output leaves and which buffers (after the call) require grad, when ``fn`` runs on
    ``args`` with grad mode on: a graph that lost a ``torch.no_grad()`` block (an EMA buffer
    updated from activations) or a ``.detach()`` differs here while its values agree."""
    from .state import clone_inputs, rng_devices

    work = clone_inputs(args)
    try:
        module.train(training)
        with torch.enable_grad(), torch.random.fork_rng(devices=rng_devices(args)):
            torch.manual_seed(_CHECK_SEED)
            out = fn(*work)
        outs = tuple(bool(t.requires_grad) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        bufs = tuple(sorted(name for name, b in snapshot.module.named_buffers() if b is not None and b.requires_grad))
        return outs, bufs
    finally:
        snapshot.restore()


def _grad_differs(model: nn.Module, gm: fx.GraphModule, args: tuple, training: bool, snapshot,
                  model_signature: tuple) -> Optional[str]:
    """Why ``gm``'s outputs or buffers take part in autograd where the model's do not (or the
    reverse), or None."""
    try:
        got = _grad_signature(gm, model, args, training, snapshot)
    except Exception as e:
        return f"the graph fails with grad mode on: {type(e).__name__}: {_first_line(e)}"
    if got[0] != model_signature[0]:
        return (f"output leaves requiring grad {list(got[0])} differ from the model's {list(model_signature[0])} "
                "(a torch.no_grad()/inference_mode block or a detach the graph did not keep)")
    if got[1] != model_signature[1]:
        return (f"after the call, buffers requiring grad {list(got[1])} differ from the model's "
                f"{list(model_signature[1])} (a buffer updated under torch.no_grad() in forward joined autograd)")
    return None


def _propagate(gm: fx.GraphModule, args: tuple, training: bool) -> tuple:
    """propagate_shapes in the capture's mode with a fixed seed, counting FLOPs.

    Returns ``(output, FlopCount)``; restores the mode and every buffer.
    """
    from .costs import graph_flop_count
    from .verify import eval_mode_restored, run_deterministic

    out = run_deterministic(lambda *a: propagate_shapes(gm, a), args, 0, module=gm, training=training)
    with eval_mode_restored(gm, training):
        flops = graph_flop_count(gm, args)
    return out, flops


def capture(
    model: nn.Module,
    example_inputs: Any,
    *,
    method: str = "auto",
    leaf_modules: Sequence[type] = (),
    training: Optional[bool] = None,
) -> CapturedModel:
    """Capture ``model`` as an fx GraphModule with shapes from ``example_inputs``.

    ``method``: ``"auto"`` (symbolic tracing, then Dynamo), ``"symbolic_trace"``
    or ``"dynamo"``. ``training``: the mode to capture in (default: the
    model's current mode); the graph computes what the model computes in
    that mode (``F.dropout(x, training=self.training)`` and Dynamo's inlined
    BatchNorm read the flag at capture).

    Capture checks itself before returning: the model and the graph run on
    the example and on a fresh input set with the same RNG seed, and must
    agree on the outputs, the buffers updated in place and the inputs
    mutated. A graph that differs is refused (``"auto"`` then tries the next
    method). A forward that changes Python-side state (``self.calls += 1``,
    ``self.buf = self.buf + 1``) is refused with a :class:`CaptureError`
    naming the attribute and the fix. The model's parameters, buffers,
    Python attributes, modes, the example inputs and the global RNG are left
    as they were.

    Raises :class:`CaptureError` naming the failing source line and what to
    do when every method fails.
    """
    from .state import ModuleState, rng_devices

    if method not in CAPTURE_METHODS:
        raise InputError(f"unknown capture method {method!r}; valid: {', '.join(CAPTURE_METHODS)}")
    args = check_model_and_inputs(model, example_inputs)
    input_names = _input_names(model, args)
    training = model.training if training is None else bool(training)
    mode = "train" if training else "eval"
    diagnostics: list = []
    snapshot = ModuleState(model)
    with torch.random.fork_rng(devices=rng_devices(args, list(model.parameters()))):
        try:
            refs = _model_references(model, args, training, snapshot)
            signature = _grad_signature(model, model, args, training, snapshot)
            methods = ("symbolic_trace", "dynamo") if method == "auto" else (method,)
            for m in methods:
                try:
                    model.train(training)
                    if m == "symbolic_trace":
                        gm, guards = _symbolic_trace(model, leaf_modules), []
                    else:
                        gm, guards = _dynamo_capture(model, args, input_names)
                except Exception as e:
                    where = _user_frame(e, model)
                    diagnostics.append(f"{m} failed: {type(e).__name__}: {_first_line(e)}"
                                       + (f" at {where}" if where else ""))
                    continue
                finally:
                    snapshot.restore()  # tracing ran forward's Python once
                gm.train(training)
                why = _graph_differs(model, gm, refs, training, snapshot)
                if why is None:
                    why = _grad_differs(model, gm, args, training, snapshot, signature)
                if why is not None:
                    diagnostics.append(f"{m} produced a graph that differs from the model in {mode} mode: {why}")
                    continue
                try:
                    out, flops = _propagate(gm, args, training)
                finally:
                    snapshot.restore()
                return CapturedModel(gm, m, args, input_names, guards=guards, diagnostics=diagnostics,
                                     source_module=type(model).__name__, example_output=out, flops=flops.total,
                                     flops_incomplete=flops.incomplete,
                                     training=training)
        finally:
            snapshot.restore()
    if method == "symbolic_trace":
        raise CaptureError(
            f"torch.fx symbolic tracing of {type(model).__name__} failed: {diagnostics[-1]}. "
            "Use method='auto' to fall back to Dynamo capture, or mark the offending "
            "submodule as a leaf (leaf_modules=[...])."
        )
    raise CaptureError(
        f"could not capture {type(model).__name__} as one graph in {mode} mode. "
        + " | ".join(diagnostics)
        + ". Fix: remove data-dependent Python control flow at that line (use torch.where), "
        "mark the submodule as a leaf with leaf_modules=[...], or call "
        "recopt.optimize(..., on_untraceable='eager') to run the model unchanged."
    )
