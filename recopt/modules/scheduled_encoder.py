"""``nn.TransformerEncoderLayer`` with a CompSkip schedule and/or a sliding window.

``torch.fx`` keeps torch.nn's encoder layers (and ``nn.TransformerEncoder``) as
leaf modules, so the Kunlun passes cannot rewrite their insides in the graph.
Instead they swap each layer for a :class:`ScheduledEncoderLayer` that owns
the *same* submodules under the same names (state-dict keys unchanged for the
parts that remain) and runs only the kept sub-blocks. A run-time module of rewritten graphs,
so it lives in ``recopt.modules`` rather than beside the passes.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.local_attention import local_attention

POST_NORM_SKIP = ("identity", "norm")


def window_support(layer: nn.TransformerEncoderLayer) -> str:
    """"" if a sliding window can be added to ``layer``'s self-attention, else why not."""
    mha = getattr(layer, "self_attn", None)
    if mha is None:
        return ""
    if not getattr(mha, "_qkv_same_embed_dim", True) or mha.in_proj_weight is None:
        return "the attention has separate q/k/v projection weights (kdim/vdim differ)"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "the attention uses add_bias_kv or add_zero_attn"
    return ""


class ScheduledEncoderLayer(nn.Module):
    """Runs ``layer``'s self-attention block only if ``run_sa`` and its FFN block only
    if ``run_ff``; a skipped residual block is the identity. For a post-norm layer
    (``LN(x + f(x))``) a skipped block gives ``x`` (``post_norm_skip="identity"``)
    or ``LN(x)`` (``"norm"``). ``window`` adds a symmetric band ``|i-j| <= window``
    to the self-attention (the first ``n_global`` tokens stay global), computed by
    :func:`local_attention`; ``src_mask`` must then be None.

    ``forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False)`` as
    ``nn.TransformerEncoderLayer``.
    """

    def __init__(self, layer: nn.Module, run_sa: bool = True, run_ff: bool = True,
                 window: Optional[int] = None, n_global: int = 0, post_norm_skip: str = "identity"):
        super().__init__()
        if isinstance(layer, ScheduledEncoderLayer):
            run_sa, run_ff = run_sa and layer.run_sa, run_ff and layer.run_ff
            window = window if window is not None else layer.window
            n_global = n_global or layer.n_global
            post_norm_skip = layer.post_norm_skip
        if post_norm_skip not in POST_NORM_SKIP:
            raise ValueError(f"post_norm_skip={post_norm_skip!r}; expected one of {POST_NORM_SKIP}")
        self.norm_first = layer.norm_first
        self.run_sa, self.run_ff = run_sa, run_ff
        self.window, self.n_global, self.post_norm_skip = window, n_global, post_norm_skip
        attn = getattr(layer, "self_attn", None)
        self.batch_first = getattr(layer, "batch_first", getattr(attn, "batch_first", False))
        keep_norm1 = run_sa or (not self.norm_first and post_norm_skip == "norm")
        keep_norm2 = run_ff or (not self.norm_first and post_norm_skip == "norm")
        names = []
        if run_sa:
            names += ["self_attn", "dropout1"]
        if keep_norm1:
            names.append("norm1")
        if run_ff:
            names += ["linear1", "dropout", "linear2", "dropout2", "activation"]
        if keep_norm2:
            names.append("norm2")
        for name in names:
            setattr(self, name, getattr(layer, name))
        if window is not None and run_sa:
            why = window_support(layer)
            if why:
                raise ValueError(f"cannot add a sliding window: {why}")

    # -- blocks ---------------------------------------------------------------------------
    def _sa(self, x, src_mask, key_padding_mask, is_causal):
        if self.window is None:
            out = self.self_attn(x, x, x, attn_mask=src_mask, key_padding_mask=key_padding_mask,
                                 need_weights=False, is_causal=is_causal)[0]
            return self.dropout1(out)
        if src_mask is not None or is_causal:
            raise ValueError("a sliding-window layer takes no src_mask / is_causal (the band is the mask)")
        mha = self.self_attn
        xb = x if self.batch_first else x.transpose(0, 1)                  # [B, T, E]
        h = mha.num_heads
        q, k, v = F.linear(xb, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in (q, k, v))
        keep = None
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool:
                raise ValueError("a sliding-window layer needs a bool src_key_padding_mask")
            keep = ~key_padding_mask
        o = local_attention(q, k, v, self.window, pre_scale=q.shape[-1] ** -0.5, key_keep=keep,
                            n_global=self.n_global, empty_rows="zero",
                            dropout_p=mha.dropout if self.training else 0.0)
        o = mha.out_proj(o.transpose(1, 2).flatten(2))
        o = o if self.batch_first else o.transpose(0, 1)
        return self.dropout1(o)

    def _ff(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = src
        if self.norm_first:
            if self.run_sa:
                x = x + self._sa(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            if self.run_ff:
                x = x + self._ff(self.norm2(x))
            return x
        if self.run_sa:
            x = self.norm1(x + self._sa(x, src_mask, src_key_padding_mask, is_causal))
        elif self.post_norm_skip == "norm":
            x = self.norm1(x)
        if self.run_ff:
            x = self.norm2(x + self._ff(x))
        elif self.post_norm_skip == "norm":
            x = self.norm2(x)
        return x

    def extra_repr(self) -> str:
        return (f"run_sa={self.run_sa}, run_ff={self.run_ff}, window={self.window}, "
                f"n_global={self.n_global}, norm_first={self.norm_first}")


class ScheduledEncoder(nn.Module):
    """``nn.TransformerEncoder`` whose layers were swapped (slow path only, same
    ``layers`` / ``norm`` submodule names). ``forward(src, mask=None,
    src_key_padding_mask=None, is_causal=None)``."""

    def __init__(self, encoder: nn.Module, layers: list):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = getattr(encoder, "norm", None)

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
        return self.norm(x) if self.norm is not None else x
