"""recopt: a graph optimizer for recommendation models.

The public surface (everything else is internal):

- :func:`optimize` — capture, run passes with verify-each, lower.
- :func:`capture` — torch.fx capture with shape metadata.
- :class:`Pass`, :class:`PassConfig`, :class:`Semantics`, :func:`register_pass`,
  :class:`PassManager`, :class:`PassResult`, :class:`PassContext`, :class:`Site` — writing and
  running passes.
- :class:`Target`, :func:`get_target` — hardware profiles.
- :class:`OptimizationReport` — what was done and why.
"""
from .api import OptimizedModel, optimize
from .capture import CapturedModel, capture
from .errors import CaptureError, InputError, MissingDependencyError, PassError, RecoptError, VerificationError
from .passes.base import Pass, PassConfig, PassContext, PassResult, Semantics, Site
from .passes.manager import PassManager
from .passes.registry import available_passes, default_pipeline, register_pass
from .report import OptimizationReport
from .targets import Target, available_targets, get_target

__version__ = "0.1.0"

__all__ = [
    "optimize", "OptimizedModel", "capture", "CapturedModel",
    "Pass", "PassConfig", "PassContext", "PassResult", "Semantics", "Site",
    "PassManager", "register_pass", "available_passes", "default_pipeline",
    "Target", "get_target", "available_targets", "OptimizationReport",
    "RecoptError", "InputError", "CaptureError", "PassError", "VerificationError",
    "MissingDependencyError", "__version__",
]
