"""recopt: a graph optimizer for recommendation models.

The public surface (everything else is internal):

- :func:`optimize` — capture, run passes with verify-each, lower.
- :func:`compile_backend` — a ``torch.compile`` backend running a chosen pass
  list for a chosen target (``backend="recopt"`` is the default one).
- :func:`capture` — torch.fx capture with shape metadata.
- :class:`Pass`, :class:`PassConfig`, :class:`Semantics`, :func:`register_pass`,
  :class:`PassManager`, :class:`PassResult`, :class:`PassContext`, :class:`Site` — writing and
  running passes.
- :class:`Target`, :func:`get_target` — hardware profiles.
- :class:`OptimizationReport` — what was done and why.
- :class:`VerifyConfig` — how every rewrite is verified (input sets, gradients, modes).
- :func:`export`, :func:`load`, :func:`read_manifest` — ONNX / torch.export
  artifacts with a manifest and a parity check. ``recopt.export`` is the
  package, and calling it runs its :func:`~recopt.export.export` function,
  so ``recopt.export(...)`` and ``recopt.export.export(...)`` both work.
"""
from .api import OptimizedModel, optimize
from .capture import CapturedModel, capture
from .lower import compile_backend
from . import export  # the package, callable as its export() function
from .export import load, read_manifest
from .errors import CaptureError, InputError, MissingDependencyError, PassError, RecoptError, VerificationError
from .passes.base import Pass, PassConfig, PassContext, PassResult, Semantics, Site
from .passes.manager import PassManager
from .passes.registry import available_passes, default_pipeline, register_pass
from .passes.rules import Reason, Rule, RulePass
from .report import OptimizationReport
from .targets import Target, available_targets, get_target
from .verify import VerifyConfig

__version__ = "0.1.0"

__all__ = [
    "optimize", "OptimizedModel", "capture", "CapturedModel", "compile_backend",
    "Pass", "PassConfig", "PassContext", "PassResult", "Semantics", "Site",
    "PassManager", "register_pass", "available_passes", "default_pipeline",
    "Rule", "RulePass", "Reason",
    "Target", "get_target", "available_targets", "OptimizationReport",
    "RecoptError", "InputError", "CaptureError", "PassError", "VerificationError",
    "MissingDependencyError", "export", "load", "read_manifest", "__version__", "VerifyConfig",
]
