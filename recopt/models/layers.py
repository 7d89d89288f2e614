"""Plain-PyTorch building blocks shared by the recopt reference models.

Everything here is written the way a researcher would write it (matmul,
softmax, einsum, ``F.gelu``) so that recopt's graph passes find the patterns
they look for. No recopt ops, no fused kernels, no Python branches on tensor
values: every module traces with ``torch.fx.symbolic_trace``.

Conventions: B batch, T tokens, H heads, d model width, d_h = d / H.
The attention blocks (:class:`MultiHeadAttention`, :class:`HSP`) live in
:mod:`recopt.modules.attention`, because the ``hsp`` pass builds HSPs too;
they are re-exported here.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..modules.attention import (HSP, MASK_VALUE, MultiHeadAttention, activation, additive_mask,  # noqa: F401
                                 apply_rotary)


def lengths_to_mask(lengths: torch.Tensor, max_len: int | torch.Tensor) -> torch.Tensor:
    """``[B] lengths -> [B, max_len] bool``, True at valid positions ``t < length``."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def band_mask(n_q: int | torch.Tensor, n_k: int | torch.Tensor, window: int,
              device: torch.device | None = None) -> torch.Tensor:
    """``[n_q, n_k] bool`` symmetric band ``|i - j| <= window`` built from ``arange``
    differences (the form the sliding-window pass recognizes as already banded)."""
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    return (i - j).abs() <= window


class MLP(nn.Module):
    """``Linear -> act -> ... -> Linear``; no activation after the last layer."""

    def __init__(self, d_in: int, hidden: Sequence[int], d_out: int, act: type[nn.Module] = nn.SiLU,
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for h in hidden:
            layers += [nn.Linear(d, h), act()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        layers.append(nn.Linear(d, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TokenLinear(nn.Module):
    """Linear compression along the token axis (LCE): ``[B, n_in, d] -> [B, n_out, d]``."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.proj = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.transpose(1, 2)).transpose(1, 2)


class Gating(nn.Module):
    """Self-gating ``x * sigmoid(Linear(x))`` over the last axis."""

    def __init__(self, d: int):
        super().__init__()
        self.gate = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.gate(x))


# ----------------------------------------------------------------------------- rotary encodings

class Rotary(nn.Module):
    """RoPE tables for real-valued positions (integers for RoPE, log-time for ROTE).

    ``forward(positions [B, T] float) -> (cos, sin)`` each ``[B, 1, T, d_h]``,
    ready to broadcast over heads in :func:`apply_rotary`.
    """

    def __init__(self, d_head: int, base: float = 10000.0):
        super().__init__()
        if d_head % 2:
            raise ValueError(f"rotary encodings need an even head dim, got {d_head}")
        inv_freq = base ** (-torch.arange(0, d_head, 2, dtype=torch.float32) / d_head)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor):
        angles = positions.float()[..., None] * self.inv_freq  # [B, T, d_h/2]
        angles = torch.cat([angles, angles], dim=-1)[:, None]    # [B, 1, T, d_h]
        return angles.cos(), angles.sin()


# ----------------------------------------------------------------------------- attention

class PMA(nn.Module):
    """Pooling by multi-head attention: ``k`` learned seed queries attend over a sequence.

    ``forward(s [B, T, d], key_keep [B, T] bool) -> [B, k, d]``.
    """

    def __init__(self, d: int, n_heads: int, n_seeds: int, activation_name: str = "softmax",
                 post_scale: float = 1.0):
        super().__init__()
        self.seeds = nn.Parameter(torch.randn(n_seeds, d) * 0.02)
        self.attn = MultiHeadAttention(d, n_heads, activation_name, post_scale)

    def forward(self, s: torch.Tensor, key_keep: torch.Tensor) -> torch.Tensor:
        q = self.seeds.unsqueeze(0).expand(s.shape[0], -1, -1)
        return self.attn(q, s, key_keep[:, None, None, :])


def init_embeddings(module: nn.Module) -> None:
    """Initialize every ``nn.Embedding``/``nn.EmbeddingBag`` in ``module`` uniformly in
    ``±sqrt(1 / num_embeddings)`` (the DLRM reference and TorchRec default). Small
    initial rows keep ids never seen in training (new users in a time split) from
    injecting unit-variance noise."""
    for m in module.modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            bound = (1.0 / m.num_embeddings) ** 0.5
            nn.init.uniform_(m.weight, -bound, bound)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
