"""Graph matching helpers shared by passes: canonical views of fx nodes across
spellings (matmul/bmm/@/einsum, transpose/permute/mT, view/reshape, module vs
functional activations) and node metadata (shapes, dtypes, constants)."""
from .canon import (
    ActivationView, LinearView, MatmulView, arg, as_activation, as_linear, as_matmul,
    as_permute, compose, inverse, is_identity, op_kind, scalar, strip_permutes, swap_last,
)
from .nodes import (
    const_value, depends_on_inputs, get_attr_value, get_module, is_getitem, is_parameter,
    is_shape_scalar,
    node_dtype, node_rank, node_shape, single_user,
)

__all__ = [
    "ActivationView", "LinearView", "MatmulView", "arg", "as_activation", "as_linear",
    "as_matmul", "as_permute", "compose", "inverse", "is_identity", "op_kind", "scalar",
    "strip_permutes", "swap_last", "const_value", "depends_on_inputs", "get_attr_value",
    "get_module", "is_getitem", "is_parameter", "is_shape_scalar", "node_dtype", "node_rank",
    "node_shape",
    "single_user",
]
