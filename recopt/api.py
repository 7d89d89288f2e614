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
from .passes.manager import PassManager
from .passes.registry import default_pipeline
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


def _resolve_pipeline(passes: Optional[Sequence], target_name: str) -> list:
    if passes is None:
        return default_pipeline(target_name)
    if isinstance(passes, (str, bytes)):
        raise InputError(f"passes must be a list of pass names, got the string {passes!r}; use passes=[{passes!r}]")
    out: list = []
    for p in passes:
        if p == "default":
            out.extend(n for n in default_pipeline(target_name) if n not in out)
        else:
            out.append(p)
    return out


def optimize(
    model: nn.Module,
    example_inputs: Any,
    target: Any = "auto",
    *,
    passes: Optional[Sequence] = None,
    configs: Optional[dict] = None,
    backend: Optional[str] = None,
    on_untraceable: str = "raise",
    strict: bool = False,
    verify: bool = True,
    capture_method: str = "auto",
    leaf_modules: Sequence[type] = (),
    n_random_inputs: int = 1,
    verify_inputs: Sequence = (),
    verify_gradients: bool = True,
    compile_options: Optional[dict] = None,
    progress: bool = False,
    **options: Any,
) -> OptimizedModel:
    """Optimize a plain PyTorch model for ``target``.

    - ``example_inputs``: a tuple of inputs (one per positional argument of
      ``forward``) shaped like a real batch; used for capture, shape
      propagation and verification.
    - ``target``: ``"b200"``, ``"h100"``, ``"h200"``, ``"a100"``, ``"cpu"``,
      ``"auto"`` (this machine) or a :class:`recopt.Target`.
    - ``passes``: pass names / classes / instances in order; ``None`` is the
      target's default pipeline (exact passes only); the name ``"default"``
      inside the list stands for that pipeline, so
      ``passes=["default", "compskip"]`` adds an architecture pass.
    - ``configs``: ``{pass name: config dict}``.
    - ``backend``: ``"inductor"`` (default for GPU targets) or ``"eager"``.
    - ``on_untraceable``: ``"raise"`` (a :class:`~recopt.errors.CaptureError`
      naming the failing line) or ``"eager"`` (return the model unchanged,
      with the reason in the report).
    - ``strict``: raise when a pass fails or is rolled back instead of
      skipping it.
    - ``verify_gradients``: also check that exact passes keep the gradients
      of the model's parameters (on by default; one backward per rewrite).
    - ``**options``: data for passes (e.g. ``calibration_data=``), visible
      to them as ``ctx.options``.
    """
    t_start = time.perf_counter()
    tgt = get_target(target)
    if on_untraceable not in ON_UNTRACEABLE:
        raise InputError(f"on_untraceable must be one of {ON_UNTRACEABLE}, got {on_untraceable!r}")
    backend = backend or default_backend(tgt)
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    pipeline = _resolve_pipeline(passes, tgt.name)
    args = check_model_and_inputs(model, example_inputs)
    settings = dict(
        target=tgt, passes=passes, configs=configs, backend=backend, on_untraceable=on_untraceable,
        strict=strict, verify=verify, capture_method=capture_method, leaf_modules=leaf_modules,
        n_random_inputs=n_random_inputs, verify_inputs=verify_inputs, verify_gradients=verify_gradients,
        compile_options=compile_options, progress=progress, **options,
    )
    # Build the manager before capture, so bad pass names or configs fail fast.
    manager = PassManager(
        pipeline, tgt, configs=configs, verify=verify, strict=strict, n_random_inputs=n_random_inputs,
        verify_inputs=verify_inputs, options=options, progress=progress, verify_gradients=verify_gradients,
    )
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
                             reference=(captured.example_output, captured.flops))
    runner = lower(gm, backend, compile_options)
    report.total_s = time.perf_counter() - t_start
    return OptimizedModel(gm, report, captured, runner, model, settings)
