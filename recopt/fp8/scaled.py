"""FP8 GEMMs per recipe: quantize the operands (Triton kernels on CUDA, the
reference quantizer elsewhere), one ``torch._scaled_mm``, or the named slow
path where no kernel serves the recipe/shape.

Above :mod:`recopt.fp8.recipes` (formats, scales, the reference quantizer),
:mod:`recopt.fp8.gemm` (the matmul calls) and :mod:`recopt.fp8.dual_quant`
(the CUDA quantizers), so none of them imports another back.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from .dual_quant import quant_rows
from .gemm import dequant_mm, fp8_mm, hp_mm
from .recipes import fp8_dtype, get_recipe, no_kernel_reason, quantize


def scaled_gemm(a: torch.Tensor, b: torch.Tensor, recipe, role: str,
                out_dtype: Optional[torch.dtype] = None, cache_b: bool = False,
                bias: Optional[torch.Tensor] = None) -> tuple:
    """``A @ B (+ bias)`` in FP8 per ``recipe``/``role``, written in ``out_dtype`` (default: A's); ``(out, kernel)``.

    ``kernel`` is ``"scaled_mm"`` (one ``torch._scaled_mm`` with the bias and
    the output cast in its epilogue, :func:`recopt.fp8.gemm.fp8_mm`),
    ``"hp_matmul"`` (the role stays in high precision: a matmul in
    ``out_dtype``) or ``"dequant_matmul"`` (no kernel for this recipe/shape:
    :func:`recopt.fp8.gemm.dequant_mm`, recorded in
    :data:`recopt.fp8.gemm.FALLBACKS`). ``cache_b``: B is a weight (or its
    transpose); reuse its quantized copy while the weight is unchanged (same
    storage and version counter), so inference quantizes each weight once.
    Errors of ``torch._scaled_mm`` propagate.
    """
    rec = get_recipe(recipe)
    out_dtype = out_dtype or a.dtype
    fa, fb = rec.formats(role)
    if fa == "hp":
        return hp_mm(a.to(out_dtype), b, bias), "hp_matmul"
    why = no_kernel_reason(rec.granularity, a.device, a.shape[1], b.shape[1])
    if why:
        return dequant_mm(a, b, rec, role, out_dtype, why, bias), "dequant_matmul"
    qa, sa = _quantize_for_mm(a, fp8_dtype(fa), rec.granularity, 1)
    qb, sb = (_cached_weight_quant(b, fp8_dtype(fb), rec.granularity) if cache_b
              else _quantize_for_mm(b, fp8_dtype(fb), rec.granularity, 0))
    return fp8_mm(qa, sa, qb.t(), sb if sb.dim() == 0 else sb.t(), out_dtype, bias), "scaled_mm"


_WEIGHT_CACHE: dict = {}
_WEIGHT_CACHE_SIZE = 256


def _cached_weight_quant(b: torch.Tensor, dtype: torch.dtype, granularity: str) -> tuple:
    """Quantized B (a weight or a view of one), reused while the same tensor is unchanged."""
    base = b._base if b._base is not None else b
    if b.is_cuda and torch.cuda.is_current_stream_capturing():
        # Under CUDA-graph capture a cache hit would bake a stale copy into the graph: quantize in it.
        return _quantize_for_mm(b, dtype, granularity, 0)
    try:
        key = (base.data_ptr(), base._version, tuple(b.shape), tuple(b.stride()), b.dtype, str(b.device),
               dtype, granularity)
    except RuntimeError:  # inference-mode tensors have no version counter
        return _quantize_for_mm(b, dtype, granularity, 0)
    hit = _WEIGHT_CACHE.get(key)
    if hit is not None and hit[0]() is base:  # the same tensor, not a new one at a reused address
        return hit[1]
    q = _quantize_for_mm(b.detach(), dtype, granularity, 0)
    if len(_WEIGHT_CACHE) >= _WEIGHT_CACHE_SIZE:
        _WEIGHT_CACHE.pop(next(iter(_WEIGHT_CACHE)))
    _WEIGHT_CACHE[key] = (weakref.ref(base), q)
    return q


def _quantize_for_mm(x: torch.Tensor, dtype: torch.dtype, granularity: str, reduce_dim: int) -> tuple:
    """:func:`quantize` laid out for ``torch._scaled_mm``; CUDA tensorwise/rowwise operands use the Triton kernels.

    For B (``reduce_dim=0``) the rows of ``x.t()`` are quantized
    (:func:`recopt.fp8.dual_quant.quant_rows`), which yields B column-major,
    as ``torch._scaled_mm`` wants it, without a transposed bf16 copy. A kernel
    that cannot run raises: there is no silent switch to the eager quantizer.
    """
    if x.is_cuda and granularity in ("tensorwise", "rowwise"):
        src = x if reduce_dim == 1 else x.t()
        q, s = quant_rows(src, dtype, granularity)
        return (q, s) if reduce_dim == 1 else (q.t(), s if s.dim() == 0 else s.t())
    return quantize(x, dtype, granularity, reduce_dim)
