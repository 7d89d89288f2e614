"""recopt.optimize: capture → passes with verify-each → lowering, in one call."""
from __future__ import annotations

import time
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from .capture import CapturedModel, capture, check_model_and_inputs
from .errors import CaptureError, InputError
from .lower import BACKENDS, default_backend, lower
from .passes.manager import _LEGACY_VERIFY_KEYWORDS, PassManager, verify_config_with_legacy
from .report import OptimizationReport
from .targets import get_target

ON_UNTRACEABLE = ("raise", "eager")
_MAX_SPECIALISATIONS = 8


class OptimizedModel(nn.Module):
    """The result of :func:`optimize`: callable like the model it came from.

    Attributes: ``graph_module`` (the rewritten torch.fx GraphModule),
    ``report`` (:class:`~recopt.report.OptimizationReport`), ``captured``
    (:class:`~recopt.capture.CapturedModel`, None if the model runs eagerly
    because it could not be captured).

    A graph captured by Dynamo is specialised on the example inputs' shapes
    where the model branches on them; a call whose inputs break those guards
    is optimized again for the new shapes (up to 8 specialisations, then the
    original model runs eagerly, with a warning).
    """

    def __init__(self, graph_module, report, captured, runner, original, settings):
        super().__init__()
        self.graph_module = graph_module
        self.report: OptimizationReport = report
        # Not registered as submodules: the graph module owns the parameters.
        object.__setattr__(self, "captured", captured)
        object.__setattr__(self, "_runner", runner)
        object.__setattr__(self, "_original", original)
        object.__setattr__(self, "_settings", settings)
        object.__setattr__(self, "_specialisations", [])

    def forward(self, *args, **kwargs):
        cap = self.captured
        if cap is None or cap.guards_hold(args):
            return self._runner(*args, **kwargs)
        for spec in self._specialisations:
            if spec.captured.guards_hold(args):
                return spec(*args, **kwargs)
        if len(self._specialisations) >= _MAX_SPECIALISATIONS:
            warnings.warn(
                f"recopt: inputs break the captured graph's shape guards and {_MAX_SPECIALISATIONS} "
                "specialisations exist already; running the original model eagerly",
                stacklevel=2,
            )
            return self._original(*args, **kwargs)
        spec = optimize(self._original, args, **self._settings)
        self._specialisations.append(spec)
        return spec(*args, **kwargs)

    @property
    def original(self) -> nn.Module:
        return self._original

    def __repr__(self) -> str:
        cap = self.captured.method if self.captured else "none (eager)"
        return f"OptimizedModel(capture={cap}, passes={[p.name for p in self.report.passes]})"


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
    progress: bool = False,
    measure: bool = False,
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
    - ``compile_options``: keyword arguments for ``torch.compile`` (inductor).
    - ``progress``: show a progress bar over the passes.
    - ``measure``: time the original and the optimized model on the example
      inputs here, interleaved, and record the measured speed-up in
      ``report.measured_speedup`` (:func:`recopt.measure.measure_speedup`).
    - ``**options``: data for passes (e.g. ``calibration_data=``), visible
      to them as ``ctx.options``. The legacy keywords ``n_random_inputs=``,
      ``verify_inputs=`` and ``verify_gradients=`` set the matching
      :class:`~recopt.VerifyConfig` field.
    """
    t_start = time.perf_counter()
    tgt = get_target(target)
    if on_untraceable not in ON_UNTRACEABLE:
        raise InputError(f"on_untraceable must be one of {ON_UNTRACEABLE}, got {on_untraceable!r}")
    backend = backend or default_backend(tgt)
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    legacy = {k: options.pop(k) for k in _LEGACY_VERIFY_KEYWORDS if k in options}
    verify = verify_config_with_legacy(verify, legacy)
    args = check_model_and_inputs(model, example_inputs)
    settings = dict(
        target=tgt, passes=passes, configs=configs, backend=backend, on_untraceable=on_untraceable,
        strict=strict, verify=verify, capture_method=capture_method, leaf_modules=leaf_modules,
        compile_options=compile_options, progress=progress, **options,
    )
    # Build the manager before capture, so bad pass names or configs fail fast.
    manager = PassManager(passes, tgt, configs=configs, verify=verify, strict=strict, options=options,
                          progress=progress)
    report = OptimizationReport(target=tgt.to_dict(), backend=backend)

    t0 = time.perf_counter()
    try:
        captured: CapturedModel = capture(model, args, method=capture_method, leaf_modules=leaf_modules)
    except CaptureError as e:
        if on_untraceable == "raise":
            raise
        report.capture_method = "none"
        report.backend = "eager (original model)"
        report.capture_diagnostics = [str(e)]
        report.notes.append("the model could not be captured and runs unchanged (on_untraceable='eager')")
        report.total_s = time.perf_counter() - t_start
        return OptimizedModel(None, report, None, model, model, settings)
    report.capture_s = time.perf_counter() - t0
    report.capture_method = captured.method
    report.capture_diagnostics = list(captured.diagnostics)
    report.guards = list(captured.guards)

    gm, report = manager.run(captured.graph_module, args, report,
                             reference=(captured.example_output, captured.flops),
                             input_filter=captured.guards_hold if captured.guards else None)
    runner = lower(gm, backend, compile_options)
    report.total_s = time.perf_counter() - t_start
    result = OptimizedModel(gm, report, captured, runner, model, settings)
    if measure:
        from .measure import measure_speedup

        measure_speedup(result, args)
    return result
