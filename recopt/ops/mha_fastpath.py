"""What torch's ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` fast path does to
a query row whose every key is masked — reproduced at run time for graphs that replaced them.

In eval mode without autograd (``torch.no_grad()``/``inference_mode``, or no
parameter requiring grad) those modules run fused kernels
(``torch._native_multi_head_attention``, ``torch._transformer_encoder_layer_fwd``)
that return **NaN** for a fully-masked row, while the documented math they run
otherwise (SDPA with ``need_weights=False``) returns **0** there. A cold-start
user (every key padded) therefore gets NaN from the module under
``no_grad`` and finite numbers with grad. The optimized graph computes the
documented math and then calls :func:`fastpath_nan_rows`, which sets those rows
to NaN exactly when the module would have taken its fast path, so outputs
match the module in every mode.

Static conditions (the module's configuration) are decided by the pass and
passed as ``static_ok``; the run-time ones are checked here, as the module
checks them: not training, fast path enabled, no autocast, not under
``make_fx`` (``torch.export`` sees the slow path, as the modules do), and not
(grad enabled and a tensor requiring grad). The nested-tensor path of
``nn.TransformerEncoder`` is also skipped while compiling with ``mask_check``,
as the module skips it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def _tracing() -> bool:
    """``make_fx`` tracing (``torch.export``): where the modules themselves skip the fast path.
    ``torch.compile`` does not skip it (Dynamo traces their fused call), so neither do we."""
    try:
        from torch.nn.modules.activation import _is_make_fx_tracing
    except ImportError:  # pragma: no cover - a torch without the helper: no make_fx check there
        return False
    return bool(_is_make_fx_tracing())


def fastpath_taken(training: bool, static_ok: bool, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the module's fused eval path would run now (run-time conditions)."""
    if not static_ok or training:
        return False
    if not torch.backends.mha.get_fastpath_enabled() or torch.is_autocast_enabled() or _tracing():
        return False
    if torch.overrides.has_torch_function(tuple(tensors)):
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _keep(mask: torch.Tensor) -> torch.Tensor:
    """Keep-mask of an MHA mask: bool True = masked; float -inf = masked."""
    return ~mask if mask.dtype == torch.bool else mask != float("-inf")


def fully_masked_rows(key_padding_mask: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor],
                      batch: int, length: int, heads: int) -> torch.Tensor:
    """``[batch, length]`` bool: query rows with no key left in some head."""
    keep = None
    if key_padding_mask is not None:
        keep = _keep(key_padding_mask)[:, None, None, :]                     # [B, 1, 1, S]
    if attn_mask is not None:
        a = _keep(attn_mask)
        a = a[None, None] if a.dim() == 2 else a.unflatten(0, (-1, heads))  # [1|B, 1|H, L, S]
        keep = a if keep is None else keep & a
    if keep is None:
        return torch.zeros(batch, length, dtype=torch.bool)
    dead = (~keep.any(-1)).any(1)                                            # [1|B, L|1]
    return dead.expand(batch, length)


def fastpath_nan_rows(out: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                      attn_mask: Optional[torch.Tensor], heads: int, batch_first: bool,
                      training: bool, static_ok: bool, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``out`` (the attention block's output, ``[B, L, E]`` or ``[L, B, E]``) with fully-masked
    query rows set to NaN when the module's fast path would have run; ``out`` itself otherwise."""
    if key_padding_mask is None and attn_mask is None or out.dim() != 3:
        return out
    if not fastpath_taken(training, static_ok, tensors):
        return out
    B, L = (out.shape[0], out.shape[1]) if batch_first else (out.shape[1], out.shape[0])
    dead = fully_masked_rows(key_padding_mask, attn_mask, B, L, heads).to(out.device)
    if not batch_first:
        dead = dead.transpose(0, 1)
    return out.masked_fill(dead[..., None], float("nan"))


def nested_fastpath_zero_pad(out: torch.Tensor, src: torch.Tensor, key_padding_mask: torch.Tensor,
                             training: bool, mask_check: bool,
                             tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``nn.TransformerEncoder(enable_nested_tensor=True)`` in eval without grad packs the
    sequences into a nested tensor and pads the result with **0**: ``out`` with the padded
    positions zeroed when that path would run (its run-time conditions, as the module checks
    them: not training, fast path enabled, 3-D input, no autocast/tracing, no grad needed,
    right-padded masks when ``mask_check``); ``out`` itself otherwise. The caller checked the
    static ones (``use_nested_tensor``, a bool padding mask, no ``mask``)."""
    if training or src.dim() != 3 or not fastpath_taken(False, True, tensors):
        return out
    if mask_check and (torch.compiler.is_compiling()
                       or not torch._nested_tensor_from_mask_left_aligned(src, key_padding_mask.logical_not())):
        return out
    return out.masked_fill(key_padding_mask[..., None], 0.0)
