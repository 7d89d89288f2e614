"""BlockNorm: the parameter-free RMS norm the ``blocknorm`` FP8 mod puts in a graph.

A run-time module of rewritten graphs, so it lives here rather than in the
module that rewrites (:mod:`recopt.fp8.mods`). ``DEFAULT_EPS`` is also the
epsilon of the fused BlockNorm+quantize kernels (:mod:`recopt.fp8.fused_quant`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

DEFAULT_BLOCK = 256
DEFAULT_EPS = 1e-6


class BlockNorm(nn.Module):
    """Parameter-free RMS normalization over fixed blocks of the last dim.

    ``y = x / sqrt(mean_block(x²) + eps)`` per block of ``block`` features
    (identical in training and inference). ``num_features`` must be a
    multiple of ``block``; a row narrower than ``block`` is one block.
    """

    __recopt_leaf__ = True  # one node in recopt.capture's graphs

    def __init__(self, num_features: int, block: int = DEFAULT_BLOCK, eps: float = DEFAULT_EPS):
        super().__init__()
        eff = block if num_features >= block else num_features
        if num_features % eff:
            raise ValueError(f"BlockNorm: num_features={num_features} is not a multiple of block={block}")
        self.num_features, self.block, self.eps = num_features, eff, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No Python branch on x's shape, so torch.fx can trace through it.
        y = x.float().unflatten(-1, (-1, self.block))
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.flatten(-2).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, block={self.block}, eps={self.eps}"
