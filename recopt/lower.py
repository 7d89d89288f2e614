"""Lowering: run the rewritten graph eagerly or compile it with Inductor.

- :func:`lower`: one graph → a callable (``"eager"``: the lean generated
  forward; ``"inductor"``: ``torch.compile``).
- :func:`lowering_plan`: what each mode's graph is compiled with, from
  ``backend``, ``compile_options`` and ``cuda_graphs`` — CUDA graphs
  (``mode="reduce-overhead"``) are for the eval graph only; the train graph
  gets the same lowering without them.
- :func:`compile_backend`: a torch.compile backend running recopt's passes
  (a chosen list, for a chosen target) on Dynamo's graph, then Inductor.
  :func:`recopt_backend` is the default one, registered under the name
  ``"recopt"`` through the package's ``torch_dynamo_backends`` entry point
  and by :func:`register_dynamo_backend`.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from .errors import InputError

BACKENDS = ("inductor", "eager")

# torch.compile modes that make Inductor record CUDA graphs, and the same mode without them.
CUDA_GRAPH_MODES = {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def default_backend(target) -> str:
    """The target's ``default_backend`` if it names one; else Inductor on a GPU, eager otherwise."""
    chosen = getattr(target, "default_backend", None)
    if chosen:
        return chosen
    return "inductor" if getattr(target, "device", "cpu") == "cuda" else "eager"


def lower(gm: fx.GraphModule, backend: str, compile_options: dict = None) -> Callable:
    """Return a callable running ``gm`` with ``backend`` ("inductor" or "eager").

    Eager runs ``gm``'s graph through :class:`recopt.lean.LeanForward`
    (submodules bound once; parameters still read from their modules).
    Inductor is ``torch.compile(gm, backend="inductor", **compile_options)``,
    with Inductor's ``fallback_random=True`` where ``gm`` draws random numbers
    (see :func:`same_random_stream`).
    """
    if backend == "eager":
        if compile_options:
            raise InputError(f"compile_options {sorted(compile_options)} apply to backend='inductor' only; "
                             "drop them or pass backend='inductor'")
        from .lean import lean_forward

        return lean_forward(gm)
    if backend == "inductor":
        return torch.compile(gm, backend="inductor", **same_random_stream(gm, compile_options))
    raise InputError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")


def draws_random_numbers(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` has a node that may draw from torch's random generator:
    a dropout module in train mode with ``p > 0`` (a graph made for one mode keeps its
    modules in that mode; a graph serving both has no dropout module), or a random function/method/op (``rand_like``,
    ``bernoulli``, ``F.dropout`` with a ``training`` that is not the constant False...)."""
    from .graph.nodes import _RANDOM_NAMES, _inactive_dropout

    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, torch.nn.modules.dropout._DropoutNd) and mod.training and mod.p != 0:
                return True
        elif node.op in ("call_function", "call_method"):
            target = node.target
            if isinstance(target, torch._ops.OpOverload):
                name = target._schema.name.split("::")[-1]
            elif isinstance(target, torch._ops.OpOverloadPacket):
                name = target._qualified_op_name.split("::")[-1]
            else:
                name = target if isinstance(target, str) else getattr(target, "__name__", "")
            if name in _RANDOM_NAMES and not _inactive_dropout(node, name):
                return True
    return False


def same_random_stream(gm: fx.GraphModule, compile_options: Optional[dict]) -> dict:
    """``compile_options`` for ``torch.compile(gm)``, with Inductor's ``fallback_random=True``
    added where ``gm`` draws random numbers and the options do not set it.

    Inductor generates random numbers with its own generator by default, so
    a compiled dropout draws other masks than the model for the same seed:
    with ``fallback_random`` the compiled graph draws through torch's
    generator like the model does (same seed, same masks), which the
    lowering check (:mod:`recopt.lowering_check`) and users' seeded runs rely
    on. ``compile_options={"options": {"fallback_random": False}}`` keeps
    Inductor's own generator (faster fused dropout; train-mode outputs then
    differ from the model's for a seed, and the lowering check skips the
    modes that draw). torch.compile takes ``mode`` or ``options``, not both:
    a ``mode`` is turned into its options (``torch._inductor.list_mode_options``).
    """
    opts = dict(compile_options or {})
    inductor_options = dict(opts.get("options") or {})
    if "fallback_random" in inductor_options or not draws_random_numbers(gm):
        return opts
    mode = opts.pop("mode", None)
    if mode is not None and mode != "default":
        from torch._inductor import list_mode_options

        inductor_options = dict(list_mode_options(mode), **inductor_options)
    inductor_options["fallback_random"] = True
    opts["options"] = inductor_options
    return opts


def keeps_inductor_random(compile_options: Optional[dict]) -> bool:
    """Whether the user chose Inductor's own random generator (``fallback_random=False``)."""
    return (dict((compile_options or {}).get("options") or {})).get("fallback_random") is False


# -- the lowering of each mode -------------------------------------------------

@dataclasses.dataclass
class LoweringPlan:
    """What each mode's graph is lowered with (see :func:`lowering_plan`).

    ``eval`` / ``train``: keyword arguments for ``torch.compile`` (None for
    the eager backend). ``cuda_graphs``: whether the eval graph records CUDA
    graphs. ``note`` / ``train_note``: what the report says about the eval
    and the train lowering ("" when there is nothing to say); see
    :meth:`report_note`.
    """

    backend: str
    eval: Optional[dict]
    train: Optional[dict]
    cuda_graphs: bool = False
    note: str = ""
    train_note: str = ""

    def report_note(self, train_compiled: bool) -> str:
        """The report's note; the train sentence only where a train graph is lowered (not where
        train mode runs the original model)."""
        return " ".join(n for n in (self.note, self.train_note if train_compiled else "") if n)

    @property
    def same_for_both(self) -> bool:
        return self.eval == self.train

    def describe(self) -> str:
        """The report's ``backend`` field."""
        return f"{self.backend} + CUDA graphs (eval graph)" if self.cuda_graphs else self.backend


def _cudagraph_option(options: dict) -> Optional[bool]:
    for key in ("triton.cudagraphs", "cudagraphs"):
        if key in options:
            return bool(options[key])
    return None


def lowering_plan(backend: str, compile_options: Optional[dict] = None, cuda_graphs: bool = False) -> LoweringPlan:
    """Decide the ``torch.compile`` arguments of the eval and the train graph.

    ``cuda_graphs=True`` (or ``compile_options`` naming a mode that records
    CUDA graphs: ``mode="reduce-overhead"``, ``"max-autotune"``, or Inductor's
    ``options={"triton.cudagraphs": True}``) lowers the **eval graph** with
    CUDA graphs and static shapes (``dynamic=False``: each input shape is
    compiled and recorded once; recopt's shape guards pick the
    specialisation). The **train graph** gets the same lowering without CUDA
    graphs (``"max-autotune"`` becomes ``"max-autotune-no-cudagraphs"``),
    and :attr:`LoweringPlan.note` says so. Raises :class:`InputError` for a
    combination that cannot be honoured (CUDA graphs with the eager backend,
    ``cuda_graphs=True`` with a mode that turns them off).
    """
    opts = dict(compile_options or {})
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    mode = opts.get("mode")
    if mode is not None and mode not in COMPILE_MODES:
        raise InputError(f"compile_options mode={mode!r} is not a torch.compile mode; valid: {', '.join(COMPILE_MODES)}")
    inductor_options = dict(opts.get("options") or {})
    asked = bool(cuda_graphs) or mode in CUDA_GRAPH_MODES or bool(_cudagraph_option(inductor_options))
    if backend == "eager":
        if asked:
            raise InputError("CUDA graphs are recorded by Inductor: pass backend='inductor' with cuda_graphs=True "
                             "(the eager backend runs the graph op by op)")
        if opts:
            raise InputError(f"compile_options {sorted(opts)} apply to backend='inductor' only; "
                             "drop them or pass backend='inductor'")
        return LoweringPlan("eager", None, None)
    if not asked:
        return LoweringPlan("inductor", opts, opts)
    if cuda_graphs and (mode == "max-autotune-no-cudagraphs" or _cudagraph_option(inductor_options) is False):
        raise InputError(f"cuda_graphs=True contradicts compile_options {opts}: drop one of them")
    eval_opts = dict(opts)
    eval_opts["mode"] = mode if mode in CUDA_GRAPH_MODES else "reduce-overhead"
    for key in ("triton.cudagraphs", "cudagraphs"):
        inductor_options.pop(key, None)
    if inductor_options:
        # torch.compile takes mode or options, not both: carry the mode's CUDA graphs as an option.
        eval_opts.pop("mode")
        eval_opts["options"] = dict(inductor_options, **{"triton.cudagraphs": True})
    eval_opts.setdefault("dynamic", False)
    train_opts = dict(opts)
    train_opts.pop("mode", None)
    if CUDA_GRAPH_MODES.get(mode):
        train_opts["mode"] = CUDA_GRAPH_MODES[mode]
    if inductor_options:
        train_opts["options"] = inductor_options
    else:
        train_opts.pop("options", None)
    shown = ", ".join(f"{k}={v!r}" for k, v in eval_opts.items())
    note = (f"CUDA graphs: the eval graph is compiled with torch.compile({shown}): static shapes, each new "
            "input shape compiles and records its own graph; torch copies the inputs into the graph's static "
            "buffers, and an output is overwritten by the next call (clone it to keep it).")
    train_note = ("Train mode runs the Inductor lowering without CUDA graphs"
                  + (f" (torch.compile({', '.join(f'{k}={v!r}' for k, v in train_opts.items())}))"
                     if train_opts else "") + ".")
    return LoweringPlan("inductor", eval_opts, train_opts, cuda_graphs=True, note=note, train_note=train_note)


def check_cuda_graph_device(args: tuple, model: Optional[torch.nn.Module] = None) -> None:
    """Raise :class:`InputError` unless CUDA graphs can be recorded for these inputs and this model.

    CUDA graphs need a CUDA device, and Inductor records them only for a
    graph whose tensors all live on it (it skips the rest, quietly): the
    example inputs and the model's parameters and buffers must be on CUDA.
    """
    from torch.utils import _pytree as pytree

    if not torch.cuda.is_available():
        raise InputError("cuda_graphs=True needs a CUDA device and this machine has none "
                         f"(torch {torch.__version__}, cuda {torch.version.cuda}); drop cuda_graphs (and "
                         "compile_options mode='reduce-overhead') to compile without CUDA graphs")
    where = {t.device.type for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)}
    if model is not None:
        where |= {t.device.type for t in list(model.parameters()) + list(model.buffers())}
    off = sorted(where - {"cuda"})
    if off:
        raise InputError(f"cuda_graphs=True needs the model and the example inputs on CUDA, found tensors on "
                         f"{', '.join(off)}: move them with .cuda() before optimize, or drop cuda_graphs")


# -- torch.compile backend -----------------------------------------------------

BACKEND_OPTIONS = ("passes", "target", "configs", "verify", "strict")


class RecoptBackend:
    """A torch.compile backend: recopt's passes on each graph Dynamo captures, then Inductor.

    Made by :func:`compile_backend`; ``torch.compile(model, backend=recopt.compile_backend(...))``.
    Per graph:

    - **mode**: a graph compiled while grad mode is on and with an input
      (Dynamo lifts the parameters to inputs) or parameter requiring grad is
      a *training* graph: passes run with ``training=True`` and exact
      rewrites are verified on the parameters' gradients as in
      :func:`recopt.optimize`; any other graph is an inference graph
      (``training=False``: outputs verified).
    - **failure**: if recopt fails on a graph (outside a pass: a pass that
      raises is already reported and skipped by the manager), the graph is
      compiled unchanged, the failure is recorded in :attr:`reports` (a
      report whose ``notes`` name the exception) and :attr:`errors`, and a
      ``UserWarning`` says so. ``strict=True`` raises instead (with the
      traceback), as it also does for a failing or rolled-back pass.

    ``reports`` keeps the last 16 graphs' reports.
    """

    def __init__(self, passes: Any = None, target: Any = "auto", *, configs: Optional[dict] = None,
                 verify: Any = True, strict: bool = False):
        from .passes.manager import PassManager
        from .targets import get_target

        self.target = get_target(target)
        self.passes, self.configs, self.verify, self.strict = passes, configs, verify, strict
        # Built once here so a bad pass name or config fails at compile_backend(), not mid-compile.
        refuse_output_changing_passes(PassManager(passes, self.target, configs=configs, verify=verify,
                                                  strict=strict))
        self.reports: list = []
        self.errors: list = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence, **kwargs: Any) -> Callable:
        """Dynamo's entry point; ``kwargs`` are torch.compile's ``mode=`` and ``options=``."""
        settings = dict(passes=self.passes, target=self.target, configs=self.configs, verify=self.verify,
                        strict=self.strict)
        options = dict(kwargs.get("options") or {})
        unknown = sorted(set(options) - set(BACKEND_OPTIONS))
        if unknown:
            raise InputError(f"torch.compile(backend='recopt', options=...) got unknown key(s) {unknown}; "
                             f"valid: {', '.join(BACKEND_OPTIONS)}")
        if options:
            from .targets import get_target

            settings.update(options)
            settings["target"] = get_target(settings["target"])
        config_patches = _inductor_mode_patches(kwargs.get("mode"))
        return self._compile(gm, list(example_inputs), settings, config_patches)

    def _compile(self, gm: fx.GraphModule, example_inputs: list, settings: dict, config_patches: dict) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        from .passes.manager import PassManager
        from .report import OptimizationReport
        from .verify import VerifyConfig

        t0 = time.perf_counter()
        training = is_training_graph(gm, example_inputs)
        verify = VerifyConfig.coerce(settings["verify"])
        if not training:  # no gradient can flow through an inference graph: checking them means nothing
            verify = dataclasses.replace(verify, gradients=False)
        report = OptimizationReport(target=settings["target"].to_dict(), backend="inductor",
                                    capture_method="dynamo (torch.compile backend)",
                                    modes=["train" if training else "eval"])
        report.modes_note = (
            "training graph (grad mode on and parameters or inputs require grad): exact rewrites verified on "
            "gradients too" if training else
            "inference graph (grad mode off or nothing requires grad): outputs verified, not gradients")
        # Outside the try: a bad pass name or config is the caller's error, raised, never skipped.
        manager = PassManager(settings["passes"], settings["target"], configs=settings["configs"],
                              verify=verify, strict=settings["strict"])
        refuse_output_changing_passes(manager)
        try:
            new_gm = _run_passes(manager, gm, example_inputs, report, training)
        except Exception as e:
            if settings["strict"]:
                raise
            message = (f"recopt backend: {type(e).__name__}: {e}; this graph is compiled unchanged by Inductor. "
                       "compile_backend(strict=True) (or torch.compile(..., options={'strict': True})) raises "
                       "with the traceback")
            report.notes.append(message)
            report.backend = "inductor (graph unchanged: recopt failed)"
            self.errors.append(e)
            del self.errors[:-16]
            report.total_s = time.perf_counter() - t0
            self._keep(report)
            warnings.warn(message, stacklevel=2)
            return compile_fx(gm, example_inputs, config_patches=config_patches or None)
        report.total_s = time.perf_counter() - t0
        self._keep(report)
        check_same_outputs(gm, new_gm, report)
        return compile_fx(new_gm, example_inputs, config_patches=config_patches or None)

    def _keep(self, report) -> None:
        self.reports.append(report)
        del self.reports[:-16]


def refuse_output_changing_passes(manager) -> None:
    """Raise :class:`InputError` for a pass that changes the graph's outputs (``output_contract``
    other than ``"same"``, such as ExFM's ``aux_head``, which appends distillation outputs).

    A torch.compile backend must return exactly the outputs Dynamo captured: Dynamo's own code
    (and the caller's) unpacks them, so an appended output would be dropped or misplaced.
    """
    bad = [p for p in manager.passes if getattr(p, "output_contract", "same") != "same"]
    if bad:
        p = bad[0]
        raise InputError(
            f"pass {p.name!r} changes the graph's outputs (output_contract={p.output_contract!r}: it appends "
            "outputs), and a torch.compile backend must return exactly the outputs Dynamo captured. Drop "
            f"{p.name!r} from the backend's passes, and run it with recopt.optimize(model, example_inputs, "
            f"passes=['default', {p.name!r}]) (or recopt.passes.exfm.apply_aux_head for aux_head), which "
            "returns the model's outputs first and the added ones after them")


def _output_arity(gm: fx.GraphModule) -> tuple:
    """How the graph's output node returns: (kind, number of values)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    return (type(value).__name__, len(value)) if isinstance(value, (tuple, list)) else ("value", 1)


def check_same_outputs(before: fx.GraphModule, after: fx.GraphModule, report) -> None:
    """Raise :class:`InputError` if the passes changed how many values Dynamo's graph returns
    (a pass that appends outputs without declaring it; verification with ``verify=False`` would
    not see it), naming the applied passes."""
    if _output_arity(before) != _output_arity(after):
        applied = [p.name for p in report.passes if p.status == "applied"]
        raise InputError(
            f"the passes {applied} changed the outputs of Dynamo's graph ({_output_arity(before)[1]} -> "
            f"{_output_arity(after)[1]} values); a torch.compile backend must return exactly the outputs "
            "Dynamo captured: drop the pass that adds outputs from the backend's passes and run it with "
            "recopt.optimize instead")


def is_training_graph(gm: fx.GraphModule, example_inputs: Sequence) -> bool:
    """Whether Dynamo captured ``gm`` for training: grad mode on (Dynamo guards on it, so the
    graph is compiled in the mode it runs in) and some input or parameter requires grad."""
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs) or \
        any(p.requires_grad for p in gm.parameters())


def _inductor_mode_patches(mode: Optional[str]) -> dict:
    """Inductor config patches for torch.compile's ``mode=`` ("reduce-overhead": CUDA graphs)."""
    if mode is None or mode == "default":
        return {}
    if mode not in COMPILE_MODES:
        raise InputError(f"torch.compile mode={mode!r} is not known to recopt's backend; valid: {', '.join(COMPILE_MODES)}")
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))


_LIFTED = "_recopt_lifted_"


def _run_passes(manager, gm: fx.GraphModule, example_inputs: list, report, training: bool) -> fx.GraphModule:
    """Run ``manager`` on Dynamo's graph; return a graph with Dynamo's calling convention.

    Dynamo passes the model's parameters as graph inputs. For the passes
    and the verifier they become the graph's own parameters again (the same
    tensors), so edge-case input sets leave them alone and gradients are
    verified against them; afterwards they are placeholders again, in
    Dynamo's order, so the compiled graph reads the parameters Dynamo hands
    it on every call (never values baked in at compile time).
    """
    import copy

    from .capture import propagate_shapes
    from .state import rng_devices
    from .verify import run_deterministic

    # Dynamo's own graph stays as it was (it is compiled unchanged if recopt fails); any tensor it
    # holds is shared with the copy, not duplicated.
    gm = copy.deepcopy(gm, {id(t): t for t in list(gm.parameters()) + list(gm.buffers())})
    lifted, user_args = _unlift_parameters(gm, example_inputs)
    user_args = tuple(user_args)
    # The model's buffers are graph inputs too (BatchNorm's running statistics): every run here is
    # on copies of the inputs, and the caller's RNG stream is left as it was (as optimize does).
    with torch.random.fork_rng(devices=rng_devices(user_args)):
        run_deterministic(lambda *a: propagate_shapes(gm, a), user_args, 0, module=gm, training=training)
        gm, _ = manager.run(gm, user_args, report, training=training)
    return _relift_parameters(gm, lifted, len(example_inputs))


def _unlift_parameters(gm: fx.GraphModule, example_inputs: list) -> tuple:
    """Turn placeholders whose example is an ``nn.Parameter`` into parameters of ``gm``
    (in place). Returns ``([(position, placeholder name, attribute)], the other inputs)``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise InputError(f"Dynamo's graph has {len(placeholders)} placeholders for {len(example_inputs)} inputs")
    first = next((n for n in gm.graph.nodes if n.op != "placeholder"), None)
    lifted, user_args = [], []
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(value, torch.nn.Parameter):
            user_args.append(value)
            continue
        attr = f"{_LIFTED}{i}"
        gm.register_parameter(attr, value)
        with gm.graph.inserting_before(first):
            get = gm.graph.get_attr(attr)
        get.meta = dict(node.meta)
        node.replace_all_uses_with(get)
        lifted.append((i, node.name, attr))
        gm.graph.erase_node(node)
    gm.recompile()
    return lifted, user_args


def _relift_parameters(gm: fx.GraphModule, lifted: list, n_inputs: int) -> fx.GraphModule:
    """Undo :func:`_unlift_parameters` on the rewritten graph: placeholders back in Dynamo's order."""
    if not lifted:
        return gm
    graph = gm.graph
    users = [n for n in graph.nodes if n.op == "placeholder"]
    if len(users) + len(lifted) != n_inputs:
        raise InputError(f"the passes changed the graph's inputs ({len(users)} of {n_inputs - len(lifted)} "
                         "non-parameter inputs left); Dynamo's calling convention cannot be restored")
    by_position = dict.fromkeys(range(n_inputs))
    first = next(iter(graph.nodes))
    for i, name, attr in lifted:
        with graph.inserting_before(first):
            ph = graph.placeholder(name)
        for get in [n for n in graph.nodes if n.op == "get_attr" and n.target == attr]:
            ph.meta = dict(get.meta)
            get.replace_all_uses_with(ph)
            graph.erase_node(get)
        delattr(gm, attr)
        by_position[i] = ph
    rest = iter(users)
    order = [by_position[i] if by_position[i] is not None else next(rest) for i in range(n_inputs)]
    anchor = next((n for n in graph.nodes if n.op != "placeholder"), None)
    for ph in order:
        if anchor is not None:
            anchor.prepend(ph)
    graph.lint()
    gm.recompile()
    return gm


def compile_backend(passes: Any = None, target: Any = "auto", *, configs: Optional[dict] = None,
                    verify: Any = True, strict: bool = False) -> RecoptBackend:
    """A torch.compile backend running ``passes`` for ``target`` on each graph, then Inductor.

    ``torch.compile(model, backend=recopt.compile_backend(passes=["default", "compskip"],
    target="h100"))``. Arguments as in :func:`recopt.optimize` (``passes=None``:
    the target's default pipeline). The backend's ``reports`` list holds a
    report per compiled graph. torch.compile's ``mode=`` is honoured
    (``"reduce-overhead"``: Inductor records CUDA graphs). The registered
    ``backend="recopt"`` takes the same settings as
    ``torch.compile(model, backend="recopt", options={"passes": [...], "target": "h100"})``.
    """
    return RecoptBackend(passes, target, configs=configs, verify=verify, strict=strict)


_default_backend: Optional[RecoptBackend] = None
last_reports: list = []


def recopt_backend(gm: fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
    """torch.compile backend ``"recopt"``: the target's default passes on Dynamo's graph, then Inductor.

    ``options=`` of torch.compile may set ``passes``, ``target``, ``configs``,
    ``verify`` and ``strict`` (see :class:`RecoptBackend`). The reports of
    the last 16 graphs are kept in :data:`last_reports`.
    """
    global _default_backend
    if _default_backend is None:
        _default_backend = RecoptBackend()
        _default_backend.reports = last_reports
    return _default_backend(gm, example_inputs, **kwargs)


def register_dynamo_backend() -> None:
    """Register :func:`recopt_backend` as torch.compile backend ``"recopt"`` (idempotent)."""
    from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS, register_backend

    if "recopt" in _COMPILER_FNS or _BACKENDS.get("recopt") is not None:
        return  # registered already: by an earlier call, or through the package's entry point
    register_backend(name="recopt")(recopt_backend)
