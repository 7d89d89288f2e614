"""Custom ops of recopt (``torch.ops.recopt.*``): reference + fake + autograd + FLOPs,
with Triton kernels where triton and a GPU are available."""
from .gdpa import HAS_TRITON, backend_for, gdpa, gdpa_flops, gdpa_jagged
from .gdpa_ref import ACTIVATIONS, POSITIVELY_HOMOGENEOUS, SOFTMAX, canonical_activation

__all__ = [
    "gdpa", "gdpa_jagged", "gdpa_flops", "backend_for", "HAS_TRITON",
    "ACTIVATIONS", "SOFTMAX", "POSITIVELY_HOMOGENEOUS", "canonical_activation",
]
