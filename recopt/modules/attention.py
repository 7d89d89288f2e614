"""Plain-PyTorch attention modules that both the reference models and rewritten graphs use.

:class:`MultiHeadAttention` is the models' attention block; :class:`HSP` is
Kunlun's Hierarchical Seed Pooling, built by the bundled Kunlun model and
inserted by the ``hsp`` architecture pass in place of a PMA pooler. They live
here (below ``recopt.models`` and ``recopt.passes``) so that a pass can build
one without importing the bundled models. Written in plain ops, no recopt ops:
every module traces with ``torch.fx.symbolic_trace`` and the attention passes
find the patterns in it.

Conventions: B batch, T tokens, H heads, d model width, d_h = d / H.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

# A finite "minus infinity" for additive softmax masks: a row whose keys are all
# masked (an empty sequence) then softmaxes to a uniform row instead of NaN.
MASK_VALUE = -1e9


def additive_mask(keep: torch.Tensor) -> torch.Tensor:
    """``bool keep -> float`` mask with 0 where kept and :data:`MASK_VALUE` elsewhere."""
    return torch.where(keep, 0.0, MASK_VALUE)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Pointwise activations by name. All satisfy ``act(0) == 0``."""
    table = {
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "silu": F.silu,
        "relu": F.relu,
        "identity": lambda x: x,
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(table)}")
    return table[name]



def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, T, d_h]`` by the angles behind ``cos``/``sin`` ``[B, 1, T, d_h]``."""
    return x * cos + _rotate_half(x) * sin



# ----------------------------------------------------------------------------- attention

class MultiHeadAttention(nn.Module):
    """Multi-head attention written out in plain ops.

    ``forward(x_q [B, Tq, d], x_kv [B, Tk, d], keep, rope_q=None, rope_k=None) -> [B, Tq, d]``

    * ``keep``: bool mask broadcastable to ``[B, H, Tq, Tk]`` (True = attend),
      typically ``key_keep[:, None, None, :]`` possibly and-ed with a band;
    * ``activation="softmax"`` (default) computes
      ``softmax(q @ k.transpose(-2, -1) * scale + additive_mask) @ v``;
      any other name from :func:`activation` computes the GDPA form
      ``act(where(keep, q @ kᵀ * scale, 0)) * post_scale @ v`` (zero-masking is
      exact because ``act(0) = 0``; ``post_scale`` is typically 1 / max length).
    * ``rope_q`` / ``rope_k``: ``(cos, sin)`` pairs from :class:`Rotary`.
    """

    def __init__(self, d: int, n_heads: int, activation_name: str = "softmax", post_scale: float = 1.0,
                 bias: bool = True):
        super().__init__()
        if d % n_heads:
            raise ValueError(f"d_model={d} is not divisible by n_heads={n_heads}")
        self.d, self.h, self.dh = d, n_heads, d // n_heads
        self.scale = 1.0 / math.sqrt(self.dh)
        self.activation_name = activation_name
        self.post_scale = post_scale
        self._act = None if activation_name == "softmax" else activation(activation_name)
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.out_proj = nn.Linear(d, d, bias=bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d] -> [B, H, T, d_h]
        return x.unflatten(-1, (self.h, self.dh)).transpose(1, 2)

    def forward(self, x_q, x_kv, keep, rope_q=None, rope_k=None):
        q = self._heads(self.q_proj(x_q))
        k = self._heads(self.k_proj(x_kv))
        v = self._heads(self.v_proj(x_kv))
        if rope_q is not None:
            q = apply_rotary(q, *rope_q)
        if rope_k is not None:
            k = apply_rotary(k, *rope_k)
        if self._act is None:
            scores = q @ k.transpose(-2, -1) * self.scale + additive_mask(keep)
            o = torch.softmax(scores, dim=-1) @ v
        else:
            scores = torch.where(keep, q @ k.transpose(-2, -1) * self.scale, 0.0)
            o = self._act(scores) * self.post_scale @ v
        return self.out_proj(o.transpose(1, 2).flatten(2))


class HSP(nn.Module):
    """Hierarchical Seed Pooling (Kunlun): over-complete seed attention,
    then seed compression with a sum of Kronecker-factored linear maps.

    ``forward(s [B, T, d], key_keep [B, T] bool) -> [B, n_out, d]``::

        H = MHA(LayerNorm(E_seed), s, s)                  # [B, n_seeds, d]
        Y = einsum('isk,bsd,ide->bke', Z, H, W)           # sum_i Z_iᵀ H W_i

    with ``E_seed [n_seeds, d]``, ``Z [rank, n_seeds, n_out]``, ``W [rank, d, d]``.
    Unknown in the sources and chosen here: LayerNorm as the seed norm, softmax
    attention, seeds ~ N(0, 0.02²), ``n_seeds = 4 * n_out`` by default.
    """

    def __init__(self, d: int, n_heads: int, n_out: int, n_seeds: Optional[int] = None, rank: int = 4,
                 activation_name: str = "softmax", post_scale: float = 1.0):
        super().__init__()
        n_seeds = n_seeds or 4 * n_out
        self.seeds = nn.Parameter(torch.randn(n_seeds, d) * 0.02)
        self.norm = nn.LayerNorm(d)
        self.attn = MultiHeadAttention(d, n_heads, activation_name, post_scale)
        self.Z = nn.Parameter(torch.randn(rank, n_seeds, n_out) / math.sqrt(n_seeds * rank))
        self.W = nn.Parameter(torch.randn(rank, d, d) / math.sqrt(d))

    def forward(self, s: torch.Tensor, key_keep: torch.Tensor) -> torch.Tensor:
        q = self.norm(self.seeds).unsqueeze(0).expand(s.shape[0], -1, -1)
        h = self.attn(q, s, key_keep[:, None, None, :])
        return torch.einsum("isk,bsd,ide->bke", self.Z, h, self.W)
