"""recopt.optimize: capture → passes with verify-each → lowering, in one call."""
from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .capture import CapturedModel, capture, check_model_and_inputs, graph_differs_in_mode
from .modes import mode_dependent_modules
from .state import InputsState, ModuleState, rng_devices
from .errors import CaptureError, InputError
from .lower import BACKENDS, check_cuda_graph_device, default_backend, lower, lowering_plan
from .passes.manager import _LEGACY_VERIFY_KEYWORDS, PassManager, verify_config_with_legacy
from .report import OptimizationReport
from .targets import get_target

ON_UNTRACEABLE = ("raise", "eager")
_MAX_SPECIALISATIONS = 8


MODES = ("eval", "train")


def _tensor_bindings(model: nn.Module, graphs) -> list:
    """``(owner module, local name, kind, model's qualified name or None)`` for every
    parameter/buffer slot of the graphs; None marks a tensor the model does not have."""
    names = {}
    for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), n)
    out, seen = [], set()
    for gm in graphs:
        if gm is None or id(gm) in seen:
            continue
        seen.add(id(gm))
        for m in gm.modules():
            for kind, table in (("parameter", m._parameters), ("buffer", m._buffers)):
                for local, t in table.items():
                    if t is not None:
                        out.append((m, local, kind, names.get(id(t))))
    return out


def _model_slots(model: nn.Module) -> list:
    """``(owner's _parameters/_buffers dict, local name, tensor)`` of every parameter and buffer of
    ``model``: a slot whose dict holds another tensor now was rebound since."""
    out = []
    for m in model.modules():
        for table in (m._parameters, m._buffers):
            for local, t in table.items():
                if t is not None:
                    out.append((table, local, t))
    return out


class OptimizedModel(nn.Module):
    """The result of :func:`optimize`: callable like the model it came from.

    **Modes.** recopt captures and optimizes one graph per mode where the
    model behaves differently in train and eval mode (dropout, BatchNorm,
    code reading ``self.training``), and one graph for both otherwise. The
    optimized model starts in the mode the model was handed over in;
    ``opt.train()`` / ``opt.eval()`` switch, and each call runs the graph of
    the current mode. ``report.modes_note`` says which graphs exist.

    **State.** The graphs hold the user's own parameters and buffers (as
    torch.compile does): training the optimized model trains the model.
    :meth:`state_dict` / :meth:`load_state_dict` use the model's keys, so a
    checkpoint of either loads into the other.

    Attributes: ``graph_module`` (the rewritten torch.fx GraphModule of the
    current mode), ``report`` (:class:`~recopt.report.OptimizationReport`;
    its passes and sites are the eval graph's, ``train_report`` the train
    graph's when it is a separate graph), ``captured``
    (:class:`~recopt.capture.CapturedModel` of the current mode, None if the
    model runs eagerly because it could not be captured).

    A graph captured by Dynamo is specialised on the example inputs' shapes
    where the model branches on them; a call whose inputs break those guards
    is optimized again for the new shapes (up to 8 specialisations, then the
    original model runs eagerly, with a warning).
    """

    def __init__(self, graphs: dict, report, captured: dict, runners: dict, original, settings,
                 training: bool = False, train_report=None):
        super().__init__()
        seen: dict = {}
        for mode in MODES:
            gm = graphs.get(mode)
            if gm is not None and id(gm) not in seen:
                seen[id(gm)] = mode
                self.add_module(f"{mode}_graph", gm)
        self.report: OptimizationReport = report
        self.train_report: Optional[OptimizationReport] = train_report
        # Not registered as submodules: the graph modules own the parameters.
        object.__setattr__(self, "_graphs", dict(graphs))
        object.__setattr__(self, "_captured", dict(captured))
        object.__setattr__(self, "_runners", dict(runners))
        object.__setattr__(self, "_original", original)
        object.__setattr__(self, "_settings", settings)
        object.__setattr__(self, "_specialisations", [])
        object.__setattr__(self, "_warned_eager", set())
        object.__setattr__(self, "_bindings", _tensor_bindings(original, graphs.values()))
        object.__setattr__(self, "_model_slots", _model_slots(original))
        self.train(training)

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.half()``...: convert the model's tensors once and rebind every
        graph to them, so the graphs (one per mode) and the model keep sharing one set of
        parameters and buffers (BatchNorm statistics updated in train mode are those eval reads)."""
        self._original._apply(fn, recurse)
        self._rebind(fn)
        object.__setattr__(self, "_model_slots", _model_slots(self._original))
        for spec in self._specialisations:
            spec._rebind(fn)
        return self

    def apply(self, fn) -> "OptimizedModel":
        """``fn`` on every module of the model (as ``model.apply(fn)``), then the graphs follow:
        an initialiser that assigns new tensors (``m.weight = nn.Parameter(...)``) is seen by
        every mode's graph, not only by one graph's copy of the module."""
        self._original.apply(fn)
        self._resync()
        return self

    def _resync(self) -> None:
        """Rebind the graphs to the model's tensors where the model's modules hold new ones
        (``model.apply(init)`` assigning new parameters, ``model.lin.weight = ...``)."""
        if any(table.get(local) is not t for table, local, t in self._model_slots):
            self._rebind(None)   # the model's tensors only; those passes made stay as they are
            object.__setattr__(self, "_model_slots", _model_slots(self._original))
        for spec in self._specialisations:
            spec._resync()

    def _rebind(self, fn) -> None:
        model_tensors = dict(self._original.named_parameters(remove_duplicate=False))
        model_tensors.update(self._original.named_buffers(remove_duplicate=False))
        converted: dict = {}
        for owner, local, kind, model_name in self._bindings:
            table = owner._parameters if kind == "parameter" else owner._buffers
            t = table.get(local)
            if t is None:
                continue
            if model_name is not None:
                table[local] = model_tensors[model_name]
            elif fn is not None:  # made by a pass or by tracing: convert it once, even if two graphs hold it
                if id(t) not in converted:
                    with torch.no_grad():
                        new = fn(t)
                    converted[id(t)] = nn.Parameter(new, t.requires_grad) if kind == "parameter" else new
                table[local] = converted[id(t)]

    def _run_original(self, *args, **kwargs):
        """Run the original model in this model's mode, leaving its own mode as it was."""
        was = self._original.training
        self._original.train(self.training)
        try:
            return self._original(*args, **kwargs)
        finally:
            self._original.train(was)

    # -- modes ----------------------------------------------------------
    def _mode(self) -> str:
        return "train" if self.training else "eval"

    def graph_for(self, training: bool) -> Optional[fx.GraphModule]:
        """The graph that runs in train (``True``) or eval (``False``) mode; None if that mode runs eagerly."""
        return self._graphs.get("train" if training else "eval")

    def captured_for(self, training: bool):
        """The :class:`~recopt.capture.CapturedModel` of train (``True``) or eval (``False``) mode, or None."""
        return self._captured.get("train" if training else "eval")

    @property
    def graph_module(self) -> Optional[fx.GraphModule]:
        return self._graphs.get(self._mode())

    @property
    def captured(self):
        return self._captured.get(self._mode())

    def train(self, mode: bool = True) -> "OptimizedModel":
        """Switch mode: the next calls run the graph captured in that mode.

        A graph made for one mode is kept in that mode (its dropout and
        BatchNorm modules follow it); a graph serving both modes follows
        ``mode``.
        """
        if not isinstance(mode, bool):
            raise InputError(f"train(mode) expects a bool, got {type(mode).__name__}")
        self.training = mode
        shared = self._graphs.get("train") is self._graphs.get("eval")
        for m in MODES:
            gm = self._graphs.get(m)
            if gm is not None:
                gm.train(mode if shared else m == "train")
        for spec in self._specialisations:
            spec.train(mode)
        return self

    # -- calls ----------------------------------------------------------
    def forward(self, *args, **kwargs):
        for table, local, t in self._model_slots:   # one identity test per tensor: the model's
            if table.get(local) is not t:             # modules were given new tensors since
                self._resync()
                break
        mode = self._mode()
        runner = self._runners.get(mode)
        cap = self._captured.get(mode)
        if runner is None:
            if mode not in self._warned_eager and cap is None and self._graphs.get(mode) is None \
                    and any(self._graphs.values()):
                self._warned_eager.add(mode)
                warnings.warn(f"recopt: {mode} mode was not captured ({self.report.modes_note}); "
                              "running the original model eagerly", stacklevel=2)
            return self._run_original(*args, **kwargs)
        if cap is None or cap.guards_hold(args):
            return runner(*args, **kwargs)
        for spec in self._specialisations:
            spec_cap = spec._captured.get(mode)
            if spec_cap is not None and spec_cap.guards_hold(args):
                return spec(*args, **kwargs)
        if len(self._specialisations) >= _MAX_SPECIALISATIONS:
            warnings.warn(
                f"recopt: inputs break the captured graph's shape guards and {_MAX_SPECIALISATIONS} "
                "specialisations exist already; running the original model eagerly",
                stacklevel=2,
            )
            return self._run_original(*args, **kwargs)
        spec = optimize(self._original, args, **self._settings)
        spec.train(self.training)
        self._specialisations.append(spec)
        return spec(*args, **kwargs)

    # -- checkpoints ----------------------------------------------------
    def _created_parameters(self) -> list:
        """Graph parameters that are not the model's (made by passes), by graph name."""
        own = {id(t) for t in self._original.parameters()}
        out = []
        for gm in {id(g): g for g in self._graphs.values() if g is not None}.values():
            out += [n for n, p in gm.named_parameters() if id(p) not in own]
        return out

    def _check_checkpointable(self, what: str) -> None:
        created = self._created_parameters()
        if created:
            raise InputError(
                f"{what}: the optimized graph trains parameters that passes created ({created[:3]}), "
                "which the model's checkpoint does not hold. Use opt.graph_module.state_dict() for the "
                "graph's own checkpoint, or optimize without the pass that made them (see the report)."
            )

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The model's state dict: same keys as ``model.state_dict()`` (for Dynamo captures too).

        The graphs share the model's parameters and buffers, so the values
        are the optimized model's.
        """
        self._check_checkpointable("state_dict")
        return self._original.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a checkpoint of the model (or of this optimized model) in place."""
        if assign:
            raise InputError("load_state_dict(assign=True) would replace the tensors the optimized graphs "
                             "share with the model; load with assign=False (values are copied in place)")
        self._check_checkpointable("load_state_dict")
        return self._original.load_state_dict(state_dict, strict=strict)

    @property
    def original(self) -> nn.Module:
        return self._original

    def __repr__(self) -> str:
        cap = self.captured.method if self.captured else "none (eager)"
        return f"OptimizedModel(capture={cap}, mode={self._mode()}, passes={[p.name for p in self.report.passes]})"


def optimize(
    model: nn.Module,
    example_inputs: Any,
    target: Any = "auto",
    *,
    passes: Optional[Sequence] = None,
    configs: Optional[dict] = None,
    backend: Optional[str] = None,
    verify: Any = True,
    strict: bool = False,
    on_untraceable: str = "raise",
    capture_method: str = "auto",
    leaf_modules: Sequence[type] = (),
    compile_options: Optional[dict] = None,
    cuda_graphs: bool = False,
    progress: bool = False,
    measure: Any = False,
    **options: Any,
) -> OptimizedModel:
    """Optimize a plain PyTorch model for ``target``.

    - ``example_inputs``: a tuple of inputs (one per positional argument of
      ``forward``) shaped like a real batch; used for capture, shape
      propagation and verification (the edge-case input sets are derived
      from it).
    - ``target``: ``"b200"``, ``"h100"``, ``"h200"``, ``"a100"``, ``"cpu"``,
      ``"auto"`` (this machine) or a :class:`recopt.Target`.
    - ``passes``: ``None`` (the target's default pipeline, exact passes
      only) or a list of pass names, ``"default"`` (stands for that pipeline,
      so ``passes=["default", "compskip"]`` adds an architecture pass), Pass
      classes, Pass instances, or pass config instances (the pass taking that
      config, configured with it).
    - ``configs``: ``{pass name: config dict or PassConfig}``.
    - ``backend``: ``"inductor"`` (default for GPU targets) or ``"eager"``.
    - ``verify``: ``True`` (default: every rewrite is checked on the example,
      on edge-case sets and, for exact passes, on gradients, in eval and
      train mode), ``False``, or a :class:`recopt.VerifyConfig` to choose
      input sets, gradients and modes.
    - ``strict``: raise when a pass fails or is rolled back instead of
      skipping it.
    - ``on_untraceable``: ``"raise"`` (a :class:`~recopt.errors.CaptureError`
      naming the failing line) or ``"eager"`` (return the model unchanged,
      with the reason in the report).
    - ``capture_method``: ``"auto"``, ``"symbolic_trace"`` or ``"dynamo"``.
    - ``leaf_modules``: module types kept whole (not traced through).
    - ``compile_options``: keyword arguments for ``torch.compile`` (inductor
      only: with ``backend="eager"`` they are an error, not ignored).
    - ``cuda_graphs``: ``True`` lowers the **eval** graph with Inductor's CUDA
      graphs (``torch.compile(mode="reduce-overhead", dynamic=False)``: static
      shapes, one recorded graph per input shape; torch copies inputs into
      static buffers and the next call overwrites an output, so clone one
      you keep). Train mode runs the same Inductor lowering without CUDA
      graphs; the report's ``backend`` and notes say so. Needs
      ``backend="inductor"`` and the model and inputs on a CUDA device (an
      :class:`~recopt.errors.InputError` otherwise). ``compile_options``
      with ``mode="reduce-overhead"`` (or ``"max-autotune"``) is treated the
      same way: CUDA graphs for the eval graph only.
    - ``progress``: show a progress bar over the passes.
    - ``measure``: time the original and the optimized model on the example
      inputs here, interleaved, and record the measured speed-up in
      ``report.measured_speedup`` (:func:`recopt.measure.measure_speedup`).
      ``measure="guard"``: also at batch 1, and where the result is slower
      than the model beyond the noise band, drop the pass that made it so
      (reported ``not_faster_on_target``; :func:`recopt.measure.speed_guard`).
    - ``**options``: data for passes (e.g. ``calibration_data=``), visible
      to them as ``ctx.options``. The legacy keywords ``n_random_inputs=``,
      ``verify_inputs=`` and ``verify_gradients=`` set the matching
      :class:`~recopt.VerifyConfig` field.
    """
    t_start = time.perf_counter()
    tgt = get_target(target)
    if on_untraceable not in ON_UNTRACEABLE:
        raise InputError(f"on_untraceable must be one of {ON_UNTRACEABLE}, got {on_untraceable!r}")
    if measure not in (True, False, "guard"):
        raise InputError(f"measure must be True, False or 'guard', got {measure!r}")
    backend = backend or default_backend(tgt)
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    legacy = {k: options.pop(k) for k in _LEGACY_VERIFY_KEYWORDS if k in options}
    verify = verify_config_with_legacy(verify, legacy)
    args = check_model_and_inputs(model, example_inputs)
    plan = lowering_plan(backend, compile_options, cuda_graphs)
    if plan.cuda_graphs:
        check_cuda_graph_device(args, model)
    settings = dict(
        target=tgt, passes=passes, configs=configs, backend=backend, on_untraceable=on_untraceable,
        strict=strict, verify=verify, capture_method=capture_method, leaf_modules=leaf_modules,
        compile_options=compile_options, cuda_graphs=cuda_graphs, progress=progress, **options,
    )
    # Build the manager before capture, so bad pass names or configs fail fast.
    manager = PassManager(passes, tgt, configs=configs, verify=verify, strict=strict, options=options,
                          progress=progress)
    report = OptimizationReport(target=tgt.to_dict(), backend=plan.describe())
    # The caller's model, inputs and RNG come back bit-identical whatever
    # capture, FLOP counting, verification or a misbehaving pass did.
    model_state = ModuleState(model)
    inputs_state = InputsState(args)
    try:
        with torch.random.fork_rng(devices=rng_devices(args, list(model.parameters()))):
            result = _optimize_modes(model, args, manager, report, settings, t_start)
    finally:
        model_state.restore()
        inputs_state.restore()
    if measure == "guard":
        from .measure import speed_guard

        by_name = {p.name: p for p in manager.passes}

        def reoptimize(pass_names):
            return optimize(model, args, tgt, passes=[by_name[n] for n in pass_names], backend=backend,
                            verify=verify, strict=strict, on_untraceable=on_untraceable,
                            capture_method=capture_method, leaf_modules=leaf_modules,
                            compile_options=compile_options, progress=progress, **options)

        return speed_guard(result, args, reoptimize)
    if measure:
        from .measure import measure_speedup

        measure_speedup(result, args)
    return result


def _shared_copy(gm: fx.GraphModule, training: bool) -> fx.GraphModule:
    """A copy of ``gm`` in mode ``training``, with its own modules but the same
    parameter and buffer tensors.

    Switching the optimized model's mode then never flips the caller's
    modules, while training it still trains the caller's weights. Passes see
    the graph's modules in the graph's mode (``mha.training``).
    """
    memo = {id(t): t for t in list(gm.parameters()) + list(gm.buffers())}
    return copy.deepcopy(gm, memo).train(training)


def _with_pass_guards(cap: CapturedModel, guards: list, report: OptimizationReport) -> CapturedModel:
    """``cap`` with the shape guards that applied passes recorded added to its own."""
    if not guards:
        return cap
    report.guards = list(report.guards) + [g.describe() for g in guards]
    return dataclasses.replace(cap, guards=list(cap.guards) + [g.code for g in guards])


def _lowering_sets(manager: PassManager, args: tuple, verify, cap: CapturedModel) -> list:
    """The ``(name, args)`` sets the lowering is checked on: the example, then up to
    ``verify.lowering_inputs`` verification sets of other shapes that satisfy the optimized
    graph's shape guards (``cap``'s, passes' included; see :mod:`recopt.lowering_check`)."""
    from .lowering_check import differently_shaped_sets

    verifier = manager.verifier
    if verifier is None or not verifier.sets:
        return [("the example inputs", args)]
    pairs = [(n, a) for n, a in zip(verifier.set_names[1:], verifier.sets[1:])
             if not cap.guards or cap.guards_hold(a)]
    names = [verifier.set_names[0]] + [n for n, _ in pairs]
    sets = [verifier.sets[0]] + [a for _, a in pairs]
    return [("the example inputs", args)] + differently_shaped_sets(names, sets, verify.lowering_inputs)


def _check_lowered(gm: fx.GraphModule, runner: Any, sets: list, training: bool, mode: str,
                   report: OptimizationReport, settings: dict) -> Any:
    """``runner`` if the lowered callable computes what the verified graph computes on ``sets``
    (same seed, ``gm`` in ``training`` mode; gradients and buffers too in train mode), else
    ``gm`` itself, with a report note and a ``UserWarning`` (a :class:`VerificationError` under
    ``strict``).

    Verification checks the graph; the lean forward replaces each GDPA call by a per-site
    function (:mod:`recopt.ops.gdpa_site`) and Inductor compiles the graph anew, so a difference
    between them and the graph would otherwise reach the user unseen. The caller's model state
    and RNG are restored by ``optimize``.
    """
    from .errors import VerificationError
    from .lower import draws_random_numbers, keeps_inductor_random
    from .lowering_check import check_lowering

    backend = settings["backend"]
    what = "the lean eager forward" if backend == "eager" else "the Inductor-compiled graph"
    if backend == "inductor" and keeps_inductor_random(settings["compile_options"]) and draws_random_numbers(gm):
        report.notes.append(f"{mode} graph: {what} was not checked against the verified graph: it draws random "
                            "numbers and compile_options set fallback_random=False (Inductor's own generator), "
                            "so its outputs differ from the graph's for any seed")
        return runner
    verify = settings["verify"]
    failure = check_lowering(gm, runner, sets, training, gradients=verify.gradients, seed=verify.seed)
    if failure is None:
        return runner
    message = (f"{mode} graph: {what} differed from the verified graph {failure}; the graph's own forward "
               f"runs instead (slower, correct). Please report this as a recopt bug"
               + ("; backend='eager' avoids Inductor" if backend == "inductor" else "") + ".")
    if settings["strict"]:
        raise VerificationError(f"{message} (strict=True raises instead of falling back; "
                                "verify=recopt.VerifyConfig(lowering=False) skips this check)")
    report.notes.append(message)
    warnings.warn(f"recopt: {message}", stacklevel=4)
    return gm


def _optimize_modes(model: nn.Module, args: tuple, manager: PassManager, report: OptimizationReport,
                    settings: dict, t_start: float) -> OptimizedModel:
    """Capture and optimize the eval graph and, where the model depends on the mode, the train graph."""
    plan = lowering_plan(settings["backend"], settings["compile_options"], settings["cuda_graphs"])
    backend = settings["backend"]
    t0 = time.perf_counter()
    try:
        cap_eval: CapturedModel = capture(model, args, method=settings["capture_method"],
                                          leaf_modules=settings["leaf_modules"], training=False)
    except CaptureError as e:
        if settings["on_untraceable"] == "raise":
            raise
        report.capture_method = "none"
        report.backend = "eager (original model)"
        report.capture_diagnostics = [str(e)]
        report.notes.append("the model could not be captured and runs unchanged (on_untraceable='eager')")
        report.modes_note = "none captured: the original model runs in both modes"
        report.total_s = time.perf_counter() - t_start
        return OptimizedModel({}, report, {}, {}, model, settings, training=model.training)
    dependent = mode_dependent_modules(model)
    if not dependent:
        # The scan found nothing; still check that the eval graph does what
        # the model does in train mode before it serves both modes.
        why = graph_differs_in_mode(model, cap_eval.graph_module, args, training=True)
        if why is not None:
            dependent = [f"(the model in train mode differs from the eval graph: {why})"]
    cap_train, train_failure = None, None
    if dependent:
        try:
            cap_train = capture(model, args, method=settings["capture_method"],
                                leaf_modules=settings["leaf_modules"], training=True)
        except (CaptureError, InputError) as e:
            train_failure = str(e)
    report.capture_s = time.perf_counter() - t0
    report.capture_method = cap_eval.method
    report.capture_diagnostics = list(cap_eval.diagnostics)
    report.guards = list(cap_eval.guards)

    graphs, captured, runners = {}, {}, {}
    # A graph that serves both modes is optimized in the mode the model came
    # in (an FP8 pass then plans the backward of a model handed over for
    # training) and verified in both; a separate eval graph in eval mode.
    first_mode = model.training if not dependent else False
    gm, report = manager.run(_shared_copy(cap_eval.graph_module, first_mode), args, report,
                             reference=(cap_eval.example_output, cap_eval.flops, cap_eval.flops_incomplete),
                             training=None if not dependent else False,
                             input_filter=cap_eval.guards_hold if cap_eval.guards else None)
    cap_eval = _with_pass_guards(cap_eval, manager.guards, report)
    sets = {"eval": _lowering_sets(manager, args, settings["verify"], cap_eval)}
    sets["train"] = sets["eval"]
    graphs["eval"], captured["eval"], runners["eval"] = gm, cap_eval, lower(gm, backend, plan.eval)
    train_report = None
    shown = ", ".join(dependent[:3]) + (" ..." if len(dependent) > 3 else "")
    if not dependent:
        graphs["train"], captured["train"] = gm, cap_eval
        runners["train"] = runners["eval"] if plan.same_for_both else lower(gm, backend, plan.train)
        report.modes = ["eval", "train"]
        report.modes_note = "one graph serves train and eval (no layer depends on the mode)"
    elif cap_train is not None:
        train_report = OptimizationReport(target=report.target, backend=backend,
                                          capture_method=cap_train.method,
                                          capture_diagnostics=list(cap_train.diagnostics),
                                          guards=list(cap_train.guards), modes=["train"])
        gm_t, train_report = manager.run(_shared_copy(cap_train.graph_module, True), args, train_report,
                                         reference=(cap_train.example_output, cap_train.flops,
                                                    cap_train.flops_incomplete), training=True,
                                         input_filter=cap_train.guards_hold if cap_train.guards else None)
        graphs["train"], captured["train"] = gm_t, _with_pass_guards(cap_train, manager.guards, train_report)
        sets["train"] = _lowering_sets(manager, args, settings["verify"], captured["train"])
        runners["train"] = lower(gm_t, backend, plan.train)
        applied = [p.name for p in train_report.passes if p.status == "applied"]
        report.modes = ["eval", "train"]
        report.modes_note = (f"eval and train captured as separate graphs (mode-dependent: {shown}); "
                             f"passes applied to the train graph: {', '.join(applied) or 'none'}")
    else:
        report.modes = ["eval"]
        report.modes_note = (f"eval only; train mode runs the original model eagerly (mode-dependent: {shown}), "
                             f"because the train-mode capture failed: {train_failure}")
        report.notes.append(report.modes_note)
    verify = settings["verify"]
    if verify.enabled and verify.lowering:
        # Each mode that runs is checked in that mode (a shared graph twice: the eval check
        # compiles the inference call, the train check the training call with its backward).
        lowered = dict(runners)
        for mode in ("eval", "train"):
            if mode in runners and mode not in verify.modes:
                (report if mode == "eval" or train_report is None else train_report).notes.append(
                    f"{mode} graph: the lowering was not checked in {mode} mode (VerifyConfig.modes={verify.modes})")
            elif mode in runners:
                runners[mode] = _check_lowered(graphs[mode], lowered[mode], sets[mode], mode == "train", mode,
                                               report if mode == "eval" or train_report is None else train_report,
                                               settings)
    elif verify.enabled:
        report.notes.append("the lowering was not checked against the verified graph (VerifyConfig(lowering=False))")
    if plan.note:
        report.notes.append(plan.report_note(train_compiled="train" in runners))
    report.total_s = time.perf_counter() - t_start
    return OptimizedModel(graphs, report, captured, runners, model, settings, training=model.training,
                          train_report=train_report)
