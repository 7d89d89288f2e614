"""The GEMMs of the FP8 linear ops: FP8 in, the input dtype out, bias in the epilogue.

Contract (what :mod:`recopt.fp8.linear` relies on):

- :func:`hp_mm` — a role kept in high precision runs as ``torch.mm`` /
  ``torch.addmm`` **in the input dtype** (bf16 stays bf16; no fp32 copy).
- :func:`fp8_mm` — ``A @ B (+ bias)`` from quantized operands given as
  "rows": ``A`` as (q (P×R), scale) and ``B`` as the quantized rows of ``Bᵀ``
  (q (Q×R), scale), so neither needs a transposed copy. It is one
  ``torch._scaled_mm(qa, qbᵀ, scale_a, scale_b, bias=bias, out_dtype=out)``
  call: the bias add and the cast to the output dtype happen in the GEMM's
  epilogue. One exception, from the CUDA kernels' rules: they write
  row-wise-scaled results only in bf16 and accept a bias only for bf16/fp16
  outputs, so an fp32 model on CUDA gets bf16 out, cast up, plus an fp32 bias
  add — named in :data:`FALLBACKS`.
- :func:`dequant_mm` — recipes without a ``_scaled_mm`` kernel (blockwise) or
  shapes the CUDA kernel refuses: the operands are dequantized **to the
  output dtype** and multiplied there. Every call records its reason in
  :data:`FALLBACKS` and warns once per reason: a fallback is never silent.

Errors from ``torch._scaled_mm`` propagate: a kernel that cannot run is a
failure, not a reason to switch paths quietly.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Optional

import torch
from torch import Tensor

# reason -> number of calls that took this fallback (since the last reset_fallbacks()).
FALLBACKS: Counter = Counter()
_WARNED: set = set()


def note_fallback(reason: str) -> None:
    """Record (and warn once about) a fallback taken at run time."""
    FALLBACKS[reason] += 1
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"recopt FP8 fallback: {reason}", RuntimeWarning, stacklevel=3)


def fallbacks() -> dict:
    """``{reason: calls}`` of the fallbacks taken since :func:`reset_fallbacks`."""
    return dict(FALLBACKS)


def reset_fallbacks() -> None:
    FALLBACKS.clear()
    _WARNED.clear()


def hp_mm(a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``a @ b (+ bias)`` in ``a``'s dtype (``b``/``bias`` are cast to it if they differ)."""
    if b.dtype != a.dtype:
        b = b.to(a.dtype)
    if bias is None:
        return torch.mm(a, b)
    return torch.addmm(bias.to(a.dtype), a, b)


def cuda_dims_ok(p: int, r: int, q: int) -> bool:
    """Whether CUDA's ``_scaled_mm`` takes ``A (p×r) @ B (r×q)``: r and q multiples of 16."""
    return r % 16 == 0 and q % 16 == 0


def fp8_mm(qa: Tensor, sa: Tensor, qb_rows: Tensor, sb_rows: Tensor, out_dtype: torch.dtype,
           bias: Optional[Tensor] = None) -> Tensor:
    """``A @ B (+ bias)`` with ``A = qa·sa`` (P×R) and ``B = (qb_rows·sb_rows)ᵀ`` (R×Q); see the module doc.

    ``sa`` is (P×1) or 0-d, ``sb_rows`` (Q×1) or 0-d. ``qb_rows`` may have
    zero-padded reduction columns only if ``qa`` has the same padding (as
    :func:`recopt.fp8.dual_quant.rowcol_quant` with ``pad_cols_to`` gives both).
    """
    if qa.shape[1] != qb_rows.shape[1]:
        raise ValueError(f"fp8_mm: reduction dims differ: A has {qa.shape[1]}, B has {qb_rows.shape[1]}")
    # _scaled_mm wants A row-major and B column-major (= its rows form row-major); both are
    # produced that way by the quantizers, so these are no-ops on the op's own paths.
    if qa.shape[0] == 0 or qb_rows.shape[0] == 0 or qa.shape[1] == 0:
        # An empty batch (M = 0), or an empty reduction: _scaled_mm refuses the empty scale tensors
        # (CPU and CUDA), while the product is well defined: zeros, plus the bias.
        y = torch.zeros(qa.shape[0], qb_rows.shape[0], dtype=out_dtype, device=qa.device)
        return y if bias is None else y + bias.to(out_dtype)
    qa, qb_rows = qa.contiguous(), qb_rows.contiguous()
    scale_b = sb_rows if sb_rows.dim() == 0 else sb_rows.reshape(1, -1)
    if qa.is_cuda:
        kernel_out = out_dtype if out_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        if sa.dim() != 0 and kernel_out != torch.bfloat16:
            kernel_out = torch.bfloat16  # the row-wise CUTLASS kernel writes bf16 only
        if kernel_out != out_dtype:
            note_fallback(f"CUDA _scaled_mm cannot write {out_dtype} for this recipe: bf16 output cast to "
                          f"{out_dtype} with a separate bias add (use a bf16 model to avoid it)")
            y = torch._scaled_mm(qa, qb_rows.t(), scale_a=sa, scale_b=scale_b, out_dtype=kernel_out)
            y = y.to(out_dtype)
            return y if bias is None else y + bias.to(out_dtype)
    b = None if bias is None else bias.to(out_dtype)
    return torch._scaled_mm(qa, qb_rows.t(), scale_a=sa, scale_b=scale_b, bias=b, out_dtype=out_dtype)


def dequant_mm(a: Tensor, b: Tensor, recipe, role: str, out_dtype: torch.dtype, reason: str,
               bias: Optional[Tensor] = None) -> Tensor:
    """``A @ B (+ bias)`` with both operands quantize-dequantized per ``recipe``, multiplied in ``out_dtype``.

    The slow path for recipes/shapes without an FP8 kernel; records ``reason`` in :data:`FALLBACKS`.
    """
    from .recipes import fake_quantize, get_recipe

    rec = get_recipe(recipe)
    note_fallback(reason)
    fa, fb = rec.formats(role)
    a_dq = fake_quantize(a, fa, rec.granularity, reduce_dim=1, operand="a").to(out_dtype)
    b_dq = fake_quantize(b, fb, rec.granularity, reduce_dim=0, operand="b").to(out_dtype)
    return hp_mm(a_dq, b_dq, bias)
