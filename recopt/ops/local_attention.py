"""Sliding-window (band) self-attention that skips out-of-band tiles, in plain PyTorch.

:func:`local_attention` computes, for ``q, k, v [B, H, T, d]``::

    keep_ij = (|i - j| <= window  or  i < n_global  or  j < n_global) and key_keep_j
    softmax:   o_i = softmax_j(pre_scale * q_i·k_j  over kept j) @ v
    pointwise: o_i = sum_j act(pre_scale * q_i·k_j) * post_scale * v_j   over kept j  (GDPA form)

The first ``n_global`` tokens (CLS / global tokens placed at the front) keep a
global view: they attend to every key and every query attends to them.

Cost: queries are cut into tiles of ``block`` rows; a tile attends only to the
``block + 2 * window`` keys around it (plus the global keys), so score and
value matmuls cost ``O(T * (block + 2w + n_global) * d)`` instead of
``O(T^2 * d)``. Out-of-band scores inside a tile are masked exactly, so the
result equals dense attention with the band mask (:func:`band_attention_reference`,
the reference the tests compare against).

Rows with no kept key: ``empty_rows="uniform"`` reproduces a finite additive
mask (``scores + where(keep, 0, -1e9)``), whose softmax over a fully masked row
is the uniform average of *all* values; ``"zero"`` returns 0 there (what GDPA
and a ``-inf``-masked softmax that guards NaN do). Pointwise activations always
give 0 there (masked scores are zeroed and ``act(0) = 0``).

The function is registered with ``torch.fx.wrap`` so a retrace keeps it as one
leaf call.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F

from . import gdpa_ref as R

EMPTY_ROWS = ("uniform", "zero")


def _act(s: torch.Tensor, activation: str) -> torch.Tensor:
    return R.act_fwd(s, R.canonical_activation(activation))


def _key_keep_2d(key_keep: Optional[torch.Tensor], B: int, T: int, device) -> Optional[torch.Tensor]:
    """Normalise a key mask to ``[B, T]`` bool (accepts ``[B, T]`` or ``[B, 1, 1, T]``)."""
    if key_keep is None:
        return None
    kk = key_keep
    if kk.dim() == 4:
        if kk.shape[1] != 1 or kk.shape[2] != 1:
            raise ValueError(f"key_keep must be [B, T] or [B, 1, 1, T], got {tuple(kk.shape)}")
        kk = kk[:, 0, 0, :]
    if kk.dim() != 2 or kk.shape[-1] != T:
        raise ValueError(f"key_keep must be [B, T] with T={T}, got {tuple(key_keep.shape)}")
    return kk.to(torch.bool).expand(B, T).to(device)


def band_keep(T: int, window: int, n_global: int = 0, device=None) -> torch.Tensor:
    """``[T, T]`` bool: ``|i - j| <= window`` or either index is a global token."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    keep = (i - j).abs() <= window
    if n_global:
        keep = keep | (i < n_global) | (j < n_global)
    return keep


def band_attention_reference(q, k, v, window: int, *, activation: str = "softmax", pre_scale: float = 1.0,
                             post_scale: float = 1.0, key_keep: Optional[torch.Tensor] = None,
                             n_global: int = 0, empty_rows: str = "uniform") -> torch.Tensor:
    """Dense O(T^2) reference of :func:`local_attention` (same arguments, same result)."""
    B, H, T, _ = q.shape
    keep = band_keep(T, window, n_global, q.device)[None, None]
    kk = _key_keep_2d(key_keep, B, T, q.device)
    if kk is not None:
        keep = keep & kk[:, None, None, :]
    s = (q @ k.transpose(-2, -1)) * pre_scale
    if activation == "softmax":
        any_key = keep.any(-1, keepdim=True)
        p = torch.softmax(s.masked_fill(~keep, float("-inf")).masked_fill(~any_key, 0.0), dim=-1)
        o = p @ v
        fallback = v.mean(dim=-2, keepdim=True).expand_as(o) if empty_rows == "uniform" else torch.zeros_like(o)
        return torch.where(any_key, o, fallback) * post_scale
    p = _act(torch.where(keep, s, 0.0), activation) * post_scale
    return p @ v


def default_block(window: int, T: int) -> int:
    """Query tile size: about half the window (>= 8), never above T."""
    return max(1, min(T, max(8, (window + 1) // 2)))


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, *,
                    activation: str = "softmax", pre_scale: float = 1.0, post_scale: float = 1.0,
                    key_keep: Optional[torch.Tensor] = None, n_global: int = 0,
                    empty_rows: str = "uniform", block: Optional[int] = None,
                    dropout_p: float = 0.0) -> torch.Tensor:
    """Band self-attention with tile skipping. ``q, k, v [B, H, T, d|dv] -> [B, H, T, dv]``.

    ``window`` >= 0 is the half width; ``key_keep`` ``[B, T]`` or ``[B, 1, 1, T]``
    bool (True = attend); ``n_global`` leading tokens stay global; ``block``
    is the query tile size (default :func:`default_block`); ``dropout_p``
    drops attention probabilities (softmax only; pass 0 in eval).
    """
    if q.dim() != 4 or k.shape != q.shape[:3] + (k.shape[-1],) or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"local_attention is self-attention: q, k, v must be [B, H, T, d] with one T; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if empty_rows not in EMPTY_ROWS:
        raise ValueError(f"empty_rows={empty_rows!r}; expected one of {EMPTY_ROWS}")
    softmax = activation == "softmax"
    B, H, T, d = q.shape
    g = max(0, min(int(n_global), T))
    kk = _key_keep_2d(key_keep, B, T, q.device)
    out_parts = []

    # Global query rows: dense over all keys.
    if g:
        keep_g = kk[:, None, None, :] if kk is not None else None
        out_parts.append(_dense_rows(q[:, :, :g], k, v, keep_g, activation, pre_scale, post_scale,
                                     empty_rows, dropout_p))
    Tl = T - g
    if Tl == 0:
        return torch.cat(out_parts, dim=2)
    ql, kl, vl = q[:, :, g:], k[:, :, g:], v[:, :, g:]
    b = block or default_block(window, Tl)
    w = min(window, Tl)
    nb = -(-Tl // b)
    span = b + 2 * w
    pad_q = nb * b - Tl
    qt = F.pad(ql, (0, 0, 0, pad_q)).unflatten(2, (nb, b))                          # [B,H,nb,b,d]
    kt = F.pad(kl, (0, 0, w, pad_q + w)).unfold(2, span, b).transpose(-1, -2)        # [B,H,nb,span,d]
    vt = F.pad(vl, (0, 0, w, pad_q + w)).unfold(2, span, b).transpose(-1, -2)        # [B,H,nb,span,dv]
    qi = torch.arange(nb * b, device=q.device).view(nb, b, 1)
    kj = (torch.arange(nb, device=q.device).view(nb, 1, 1) * b - w
          + torch.arange(span, device=q.device).view(1, 1, span))                     # [nb,1,span]
    keep = ((qi - kj).abs() <= w) & (kj >= 0) & (kj < Tl)                              # [nb,b,span]
    keep = keep[None, None]
    if kk is not None:
        kkl = F.pad(kk[:, g:], (w, pad_q + w), value=False).unfold(1, span, b)        # [B,nb,span]
        keep = keep & kkl[:, None, :, None, :]
    s = (qt @ kt.transpose(-1, -2)) * pre_scale                                       # [B,H,nb,b,span]
    if g:
        kg, vg = k[:, :, :g], v[:, :, :g]
        sg = (qt.flatten(2, 3) @ kg.transpose(-1, -2)).unflatten(2, (nb, b)) * pre_scale  # [B,H,nb,b,g]
        keep_g = torch.ones(1, 1, 1, 1, g, dtype=torch.bool, device=q.device)
        if kk is not None:
            keep_g = kk[:, None, None, None, :g]
        s = torch.cat([s, sg], dim=-1)
        keep = torch.cat([keep.expand(*keep.shape[:4], span), keep_g.expand(*keep.shape[:4], g)], dim=-1)
        vt = torch.cat([vt, vg[:, :, None].expand(-1, -1, nb, -1, -1)], dim=-2)
    if softmax:
        any_key = keep.any(-1, keepdim=True)
        p = torch.softmax(s.masked_fill(~keep, float("-inf")).masked_fill(~any_key, 0.0), dim=-1)
        if dropout_p > 0:
            p = F.dropout(p, dropout_p)
        o = p @ vt                                                                     # [B,H,nb,b,dv]
        if empty_rows == "uniform":
            fallback = v.mean(dim=-2, keepdim=True)[:, :, None]                         # [B,H,1,1,dv]
            o = torch.where(any_key, o, fallback)
        else:
            o = torch.where(any_key, o, 0.0)
        o = o * post_scale
    else:
        p = _act(torch.where(keep, s, 0.0), activation) * post_scale
        o = p @ vt
    out_parts.append(o.flatten(2, 3)[:, :, :Tl])
    return torch.cat(out_parts, dim=2) if len(out_parts) > 1 else out_parts[0]


def _dense_rows(q, k, v, keep, activation, pre_scale, post_scale, empty_rows, dropout_p):
    s = (q @ k.transpose(-2, -1)) * pre_scale
    if activation != "softmax":
        if keep is not None:
            s = torch.where(keep, s, 0.0)
        return _act(s, activation) * post_scale @ v
    if keep is None:
        p = torch.softmax(s, dim=-1)
        if dropout_p > 0:
            p = F.dropout(p, dropout_p)
        return (p @ v) * post_scale
    any_key = keep.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~keep, float("-inf")).masked_fill(~any_key, 0.0), dim=-1)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    o = p @ v
    fallback = v.mean(dim=-2, keepdim=True) if empty_rows == "uniform" else torch.zeros_like(o[..., :1, :])
    return torch.where(any_key, o, fallback) * post_scale


def local_attention_flops(B: int, H: int, T: int, d: int, dv: int, window: int, n_global: int = 0,
                          block: Optional[int] = None) -> int:
    """Forward matmul FLOPs :func:`local_attention` spends (2 per multiply-add)."""
    g = max(0, min(n_global, T))
    Tl = T - g
    flops = 2 * B * H * g * T * (d + dv)
    if Tl:
        b = block or default_block(window, Tl)
        w = min(window, Tl)
        nb = -(-Tl // b)
        flops += 2 * B * H * nb * b * (b + 2 * w + g) * (d + dv)
    return flops


torch.fx.wrap("local_attention")
