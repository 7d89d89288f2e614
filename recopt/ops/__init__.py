"""Custom ops of recopt (``torch.ops.recopt.*``): reference + fake + autograd + FLOPs,
with Triton kernels where triton and a GPU are available, and the plain functions
rewritten graphs call at run time (local_attention, kjt, masks).

Importing this package registers every ``torch.ops.recopt`` op a rewritten graph
of the run-time layer may hold (gdpa, gdpa_jagged, grad_scale), so a loaded
program that calls one deserializes; FP8's ops live in ``recopt.fp8.linear``."""
from . import grad_scale as _grad_scale  # noqa: F401  registers torch.ops.recopt.grad_scale
from .gdpa import HAS_TRITON, backend_for, gdpa, gdpa_flops, gdpa_jagged
from .gdpa_ref import ACTIVATIONS, POSITIVELY_HOMOGENEOUS, SOFTMAX, canonical_activation

__all__ = [
    "gdpa", "gdpa_jagged", "gdpa_flops", "backend_for", "HAS_TRITON",
    "ACTIVATIONS", "SOFTMAX", "POSITIVELY_HOMOGENEOUS", "canonical_activation",
]
