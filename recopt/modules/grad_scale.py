"""GS_β as a module: :class:`GradScale` applies :func:`recopt.ops.grad_scale.grad_scale`
with a fixed ``beta`` (identity forward, gradient × β backward)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops.grad_scale import grad_scale


class GradScale(torch.nn.Module):
    """Module form of :func:`grad_scale` with a fixed ``beta``."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = float(beta)

    def forward(self, x: Tensor) -> Tensor:
        return grad_scale(x, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"
