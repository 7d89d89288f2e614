"""Per-site GDPA functions for the lean forward (:mod:`recopt.lean`) on the CPU.

:func:`specialize` builds, for one ``gdpa(q, k, v, **kwargs)`` call site, a
thin function with the site's constant options bound that goes straight to
:func:`recopt.ops.gdpa_cpu.gdpa_cpu` on the shapes it serves and calls the
generic :func:`recopt.ops.gdpa.gdpa` otherwise. It sits above both (the
generic op routes to ``gdpa_cpu`` on the CPU), so neither imports the other
back.
"""
from __future__ import annotations

import torch

from . import gdpa_ref as R
from .gdpa import gdpa as generic
from .gdpa_cpu import gdpa_cpu, use_lean

_TENSOR_KWARGS = ("q_lengths", "kv_lengths", "attn_mask")
_CONST_KWARGS = ("activation", "qk_scale", "pre_scale", "window")


def specialize(kwargs: dict, dynamic=()):
    """A thin function for one ``gdpa(q, k, v, **kwargs)`` call site, or ``None``.

    ``kwargs`` are the site's constant keyword arguments; ``dynamic`` names
    the keyword arguments that are graph values (only ``q_lengths``,
    ``kv_lengths`` and ``attn_mask`` are accepted — any other option, constant
    or not, keeps the generic call). The returned
    ``site(q, k, v, **tensors)`` has the site's activation and scales baked
    in, so a call does no name canonicalisation or option parsing. On the
    lean path's common shapes it goes straight to the math; anything else
    (not :func:`use_lean`, GQA layouts it does not handle, lengths or a bool
    mask with softmax, ``broadcast_q``) calls the generic
    :func:`recopt.ops.gdpa.gdpa` with the same arguments, so results never
    depend on which path ran. ``None`` when an option is not a plain constant.
    """
    if set(kwargs) - set(_CONST_KWARGS) or set(dynamic) - set(_TENSOR_KWARGS):
        return None  # broadcast_q and options this function does not know: keep the generic call
    act = R.canonical_activation(kwargs.get("activation", "raw"))
    qk_scale, pre_scale = kwargs.get("qk_scale", 1.0), kwargs.get("pre_scale", 1.0)
    window = kwargs.get("window")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (qk_scale, pre_scale)):
        return None
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 0):
        return None
    qk_scale, pre_scale = float(qk_scale), float(pre_scale)
    w = -1 if window is None else window
    const = dict(activation=act, qk_scale=qk_scale, pre_scale=pre_scale, window=window)

    if act == R.SOFTMAX:
        def gdpa_softmax_site(q, k, v, attn_mask=None, q_lengths=None, kv_lengths=None):
            if (attn_mask is None or q_lengths is not None or kv_lengths is not None or w >= 0
                    or not attn_mask.is_floating_point() or q.dim() != 4 or k.dim() != 4
                    or q.shape[1] != k.shape[1] or not use_lean(q)):
                return generic(q, k, v, attn_mask=attn_mask, q_lengths=q_lengths, kv_lengths=kv_lengths, **const)
            # The float-mask math of recopt.ops.gdpa_ref.softmax_attention (masked_rows
            # "zero", the only mode this site serves): a row whose scores are all -inf
            # gives 0 and no gradient, as the reference and SDPA do, not softmax's NaN.
            s = (q @ k.transpose(-2, -1)) * pre_scale + attn_mask
            dead = torch.isneginf(s).all(dim=-1, keepdim=True)
            p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
            o = p @ v
            return o * qk_scale if qk_scale != 1.0 else o

        return gdpa_softmax_site

    def gdpa_pointwise_site(q, k, v, attn_mask=None, q_lengths=None, kv_lengths=None):
        if (attn_mask is not None or q.dim() != 4 or k.dim() != 4 or v.dim() != 4
                or q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1] or not use_lean(q)):
            return generic(q, k, v, attn_mask=attn_mask, q_lengths=q_lengths, kv_lengths=kv_lengths, **const)
        return gdpa_cpu(q, k, v, q_lengths, kv_lengths, act, qk_scale, pre_scale, w)

    return gdpa_pointwise_site
