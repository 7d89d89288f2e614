"""Optimizers for recommendation models.

- :class:`MomentumScaledRowWiseAdagrad`: row-wise AdaGrad with the 2D sparse
  parallelism momentum scale (plain ``torch.optim.Optimizer``).
- :func:`fbgemm_rowwise_adagrad_params`: the TorchRec/FBGEMM fused-optimizer
  parameters that compute the same update on sharded tables.
"""
from .rowwise_adagrad import MomentumScaledRowWiseAdagrad, fbgemm_rowwise_adagrad_params

__all__ = ["MomentumScaledRowWiseAdagrad", "fbgemm_rowwise_adagrad_params"]
