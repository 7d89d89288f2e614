"""Row-wise and column-wise FP8 copies of one 2-D tensor: launcher and PyTorch reference.

``rowcol_quant(x, dtype, granularity, rows=True, cols=True, pad_cols_to=1)``
returns ``(row, col)``:

- ``row = (q, s)``: ``q`` (R×C, row-major) with ``x ≈ q.float() * s``;
  ``s`` is (R×1) fp32 for ``rowwise`` and a 0-d fp32 tensor for ``tensorwise``;
- ``col = (q, s)``: ``q`` (C×R', row-major, i.e. ``xᵀ`` quantized; R' is R
  rounded up to ``pad_cols_to`` with zero columns) with
  ``xᵀ ≈ q[:, :R].float() * s``; ``s`` (C×1) fp32 (or 0-d);
- either is ``None`` when not asked for.

Every 2-D FP8 GEMM operand is "the rows of a row-major matrix quantized
along the reduction dim": A (P×R) is its own rows, B (R×Q) is the rows of
Bᵀ, so ``col`` gives the B operand of ``x`` (or the A operand of ``xᵀ``)
with no bf16 transpose copy. CUDA tensors run the Triton kernels of
:mod:`recopt.kernels.fp8_dual_quant` (two launches: amax, then one kernel
writing both copies); CPU tensors run :func:`rowcol_quant_reference` unless
``use_triton=True`` (the interpreter, for the differential tests).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import require
from .recipes import E4M3, E5M2, FP8_MAX, _amax_to_scale, saturating_cast

# (mantissa bits, smallest normal, 1 / subnormal step) per FP8 format, for the kernel's grid rounding.
_FORMAT = {E4M3: (3, 2.0 ** -6, 512.0), E5M2: (2, 2.0 ** -14, 65536.0)}
GRANULARITIES = ("tensorwise", "rowwise")


def _check(x: torch.Tensor, dtype, granularity: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"rowcol_quant expects a 2-D tensor, got shape {tuple(x.shape)}")
    if dtype not in _FORMAT:
        raise ValueError(f"rowcol_quant: unsupported FP8 dtype {dtype}; use torch.float8_e4m3fn or float8_e5m2")
    if granularity not in GRANULARITIES:
        raise ValueError(f"rowcol_quant: granularity {granularity!r} is not one of {GRANULARITIES} "
                         f"(blockwise operands are quantized by recopt.fp8.recipes.quantize)")


def _pad(q: torch.Tensor, multiple: int) -> torch.Tensor:
    r = q.shape[1]
    rp = -(-r // multiple) * multiple
    if rp == r:
        return q
    out = torch.zeros(q.shape[0], rp, dtype=q.dtype, device=q.device)
    out[:, :r] = q
    return out


def finite_amax(slice_amax: torch.Tensor) -> torch.Tensor:
    """The tensor-wise amax from per-slice amaxes, over the finite slices only (0 when there are none).

    One sample with an inf or NaN must not set the scale of the others: with
    the plain amax, an inf makes the scale inf and every other row quantizes
    to 0 (or NaN), so one bad sample changed every output of the batch.
    """
    if slice_amax.numel() == 0:
        return slice_amax.new_zeros(())
    return torch.where(torch.isfinite(slice_amax), slice_amax, torch.zeros_like(slice_amax)).amax()


def poisoned(scale: torch.Tensor, slice_amax: torch.Tensor) -> torch.Tensor:
    """Per-slice divisors for a tensor-wise ``scale``: ``scale``, or inf where a slice holds an inf/NaN.

    Dividing by inf sends the slice's finite values to 0 and its inf/NaN
    values to NaN, so that slice's GEMM outputs are NaN (as eager's are
    inf/NaN) instead of silently finite: the saturating cast would clamp an
    inf to the format's max.
    """
    return torch.where(torch.isfinite(slice_amax), scale.expand_as(slice_amax),
                       torch.full_like(slice_amax, float("inf")))


def rowcol_quant_reference(x: torch.Tensor, dtype, granularity: str, rows: bool = True, cols: bool = True,
                           pad_cols_to: int = 1) -> tuple:
    """PyTorch reference of :func:`rowcol_quant` (same values: both round to nearest even)."""
    _check(x, dtype, granularity)
    xf = x.float()
    if granularity == "tensorwise":
        row_amax = xf.abs().amax(1) if x.shape[1] else xf.new_zeros(x.shape[0])
        col_amax = xf.abs().amax(0) if x.shape[0] else xf.new_zeros(x.shape[1])
        s = _amax_to_scale(finite_amax(row_amax), dtype)
        row, col = None, None
        if rows:
            row = (saturating_cast(xf / poisoned(s, row_amax).unsqueeze(1), dtype), s)
        if cols:
            qc = saturating_cast(xf.t() / poisoned(s, col_amax).unsqueeze(1), dtype).contiguous()
            col = (_pad(qc, pad_cols_to), s)
        return row, col
    else:
        s_row = _amax_to_scale(xf.abs().amax(1, keepdim=True) if x.shape[1] else xf.new_zeros(x.shape[0], 1),
                               dtype) if rows else None
        s_col = _amax_to_scale(xf.abs().amax(0).unsqueeze(1) if x.shape[0] else xf.new_zeros(x.shape[1], 1),
                               dtype) if cols else None
    row = (saturating_cast(xf / s_row, dtype), s_row) if rows else None
    col = (_pad(saturating_cast(xf.t() / s_col, dtype).contiguous(), pad_cols_to), s_col) if cols else None
    return row, col


def rowcol_quant(x: torch.Tensor, dtype, granularity: str = "rowwise", rows: bool = True, cols: bool = True,
                 pad_cols_to: int = 1, use_triton: Optional[bool] = None) -> tuple:
    """Row-wise and/or column-wise FP8 copies of ``x``; see the module docstring."""
    _check(x, dtype, granularity)
    use_triton = x.is_cuda if use_triton is None else use_triton
    if not use_triton:
        return rowcol_quant_reference(x, dtype, granularity, rows, cols, pad_cols_to)
    if not (rows or cols):
        return None, None
    require("triton", "gpu", "the FP8 row/column quantization kernel")
    import triton

    from ..kernels.fp8_dual_quant import dual_amax_kernel, dual_quant_kernel

    if x.stride(1) != 1:
        x = x.contiguous()
    r, c = x.shape
    fmax = FP8_MAX[dtype]
    mbits, min_normal, sub_inv = _FORMAT[dtype]
    bm, bc = 64, 64
    grid = (triton.cdiv(max(r, 1), bm), triton.cdiv(max(c, 1), bc))
    row_amax = torch.zeros(r, device=x.device, dtype=torch.float32)
    col_amax = torch.zeros(c, device=x.device, dtype=torch.float32)
    if r and c:
        dual_amax_kernel[grid](x, row_amax, col_amax, r, c, x.stride(0), BM=bm, BC=bc)
    if granularity == "tensorwise":
        s = (finite_amax(row_amax).clamp_min(1e-12) / fmax).float()
        row_s, col_s = poisoned(s, row_amax).contiguous(), poisoned(s, col_amax).contiguous()
        row_out_s, col_out_s = s, s
    else:
        row_s = (row_amax.clamp_min(1e-12) / fmax)
        col_s = (col_amax.clamp_min(1e-12) / fmax)
        row_out_s, col_out_s = row_s.view(r, 1), col_s.view(c, 1)
    q_row = torch.empty(r, c, device=x.device, dtype=dtype) if rows else None
    rp = -(-r // pad_cols_to) * pad_cols_to
    q_col = None
    if cols:
        q_col = torch.empty(c, rp, device=x.device, dtype=dtype)
        if rp != r:
            q_col[:, r:].zero_()
    if r and c:
        dummy = q_row if q_row is not None else q_col
        dual_quant_kernel[grid](
            x, row_s, col_s, q_row if rows else dummy, q_col if cols else dummy, r, c,
            x.stride(0), c, rp, FMAX=fmax, MBITS=mbits, MIN_NORMAL=min_normal, SUB_STEP_INV=sub_inv,
            WRITE_ROW=rows, WRITE_COL=cols, BM=bm, BC=bc)
    return ((q_row, row_out_s) if rows else None), ((q_col, col_out_s) if cols else None)


def quant_rows(t: torch.Tensor, dtype, granularity: str) -> tuple:
    """``(q, s)``: the rows of ``t`` quantized (q row-major, s (R×1) or 0-d), whatever ``t``'s layout.

    A transposed view (``t = u.t()`` with ``u`` row-major) is the column copy of
    ``u`` — no bf16 transpose copy. Row-wise e4m3 rows of a CUDA tensor use the
    one-pass row quantizer of :mod:`recopt.fp8.fused_quant`; the rest use
    :func:`rowcol_quant`.
    """
    if t.dim() == 2 and t.shape[0] > 1 and t.stride(0) == 1 and t.stride(1) != 1:
        _, col = rowcol_quant(t.t(), dtype, granularity, rows=False, cols=True)
        return col
    if t.is_cuda and granularity == "rowwise" and dtype == E4M3 and t.numel():
        from .fused_quant import blocknorm_quant

        q, s, _ = blocknorm_quant(t, block=t.shape[1], norm=False, write_y=False)
        return q, s
    row, _ = rowcol_quant(t, dtype, granularity, rows=True, cols=False)
    return row
