"""ONNX translation of recopt's FP8 linear (``torch.ops.recopt.fp8_linear``, :mod:`recopt.fp8.linear`).

The op computes ``x @ Wᵀ + b`` with the forward GEMM's operands quantized
per the forward recipe (:mod:`recopt.fp8.recipes`: ``scale = max(amax,
1e-12) / fp8_max``, saturating round-to-nearest-even cast) and the product
taken in float32 on the dequantized values. Only the ``forward`` recipe
matters for inference. Lowering by opset:

- opset ≥ 21: ``QuantizeLinear`` (float8 ``output_dtype``, ``saturate=1``) →
  ``DequantizeLinear`` on both operands, around ``MatMul``; tensorwise uses a
  scalar scale, rowwise per-axis scales, blockwise blocked scales
  (``block_size=128``; the weight's 128×128 tiles as per-row-group scales).
  Scales are computed in the graph from ``amax`` like the PyTorch op.
- opset 19–20 (float8 types, no ``output_dtype``): the same quantization
  with ``Cast`` to float8 (``saturate=1``) and back, around ``MatMul``.
- opset < 19 (no float8 types): a **dequantized MatMul** in float32 whose
  operands are rounded to the float8 grid with float arithmetic
  (:func:`_round_to_fp8`: power-of-two step from ``log2|x|``, ``Round`` ties
  to even, saturation) — the same values as the cast, without float8 types.

A forward recipe of ``"bf16"`` (high precision) lowers to a plain float32
MatMul.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch

FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
BLOCK = 128
AMAX_FLOOR = 1e-12

# Parity tolerance for ONNX graphs with FP8-quantized linears. The quantization itself matches
# PyTorch exactly, but it is discontinuous: a 1-ulp difference upstream (another summation order in
# a MatMul) can move one activation across a float8 rounding boundary, changing it by one float8
# step (~6% of that element for e4m3). fp32 graphs keep rtol 1e-4.
FP8_PARITY_RTOL = 1e-2

_state = {"opset": 18, "notes": {}}


def set_opset(opset: int) -> None:
    """The opset the current export targets (chosen by the exporter before translating)."""
    _state["opset"] = int(opset)
    _state["notes"] = {}


def quantized() -> bool:
    """Whether the last export lowered at least one FP8 linear with a quantized forward."""
    return any("bf16" not in v for v in _state["notes"].values())


def notes() -> dict:
    """How FP8 linears were lowered in the last export (for the manifest)."""
    return dict(_state["notes"])


def _onnx_fp8_type(fmt: str) -> int:
    import onnx

    return {"e4m3": onnx.TensorProto.FLOAT8E4M3FN, "e5m2": onnx.TensorProto.FLOAT8E5M2}[fmt]


def _ops():
    import onnxscript

    if _state["opset"] >= 21:
        return onnxscript.opset21
    if _state["opset"] >= 19:
        return onnxscript.opset19
    return onnxscript.opset18


def _i64(values):
    return _ops().Constant(value_ints=[int(v) for v in values])


def _f32(x: float):
    return _ops().Constant(value_float=float(x))


def _scale(amax, fmt: str):
    op = _ops()
    return op.Div(op.Max(amax, _f32(AMAX_FLOOR)), _f32(FP8_MAX[fmt]))


def _blocks_amax_rows(a, k: int):
    """``a [M, K]`` -> amax over 1×128 blocks along K: ``[M, ceil(K/128)]``."""
    op = _ops()
    nb = -(-k // BLOCK)
    pad = nb * BLOCK - k
    t = op.Abs(a)
    if pad:
        t = op.Pad(t, _i64([0, 0, 0, pad]))
    return op.ReduceMax(op.Reshape(t, _i64([0, nb, BLOCK])), _i64([2]), keepdims=0)


def _weight_square_scales_rows(w, n: int, k: int, fmt: str):
    """``W [N, K]`` -> per-row copy of its 128×128 tile scales: ``[N, ceil(K/128)]``."""
    op = _ops()
    nb, nrb = -(-k // BLOCK), -(-n // BLOCK)
    t = op.Abs(w)
    if nb * BLOCK - k or nrb * BLOCK - n:
        t = op.Pad(t, _i64([0, 0, nrb * BLOCK - n, nb * BLOCK - k]))
    amax = op.ReduceMax(op.Reshape(t, _i64([nrb, BLOCK, nb, BLOCK])), _i64([1, 3]), keepdims=0)  # [nrb, nb]
    s = _scale(amax, fmt)
    s = op.Expand(op.Unsqueeze(s, _i64([1])), _i64([nrb, BLOCK, nb]))
    return op.Slice(op.Reshape(s, _i64([nrb * BLOCK, nb])), _i64([0]), _i64([n]))


def _qdq(t, scale, fmt: str, axis: int = 1, block_size: int = 0):
    """Quantize-dequantize ``t`` with ``scale`` (float32 out)."""
    op = _ops()
    if _state["opset"] >= 21:
        kw = {"axis": axis, "saturate": 1, "output_dtype": _onnx_fp8_type(fmt)}
        if block_size:
            kw["block_size"] = block_size
        q = op.QuantizeLinear(t, scale, **kw)
        dkw = {"axis": axis}
        if block_size:
            dkw["block_size"] = block_size
        return op.DequantizeLinear(q, scale, **dkw)
    if _state["opset"] >= 19:
        # Cast to float8 (saturating) and back; scale broadcast by the caller's shapes.
        q = op.Cast(op.Div(t, scale), to=_onnx_fp8_type(fmt), saturate=1)
        return op.Mul(op.Cast(q, to=1), scale)
    return op.Mul(_round_to_fp8(op.Div(t, scale), fmt), scale)


# (mantissa bits, smallest normal exponent) of the float8 formats.
_FP8_BITS = {"e4m3": (3, -6), "e5m2": (2, -14)}


def _round_to_fp8(y, fmt: str):
    """float32 ``y`` rounded to the nearest float8 value (ties to even, saturating), in float32.

    For opsets without float8 types: with ``e = max(floor(log2|y|), e_min)`` the
    float8 grid near ``y`` has step ``2^(e - mantissa bits)``; ``Round`` (ties to
    even) on ``y / step`` is exact because the step is a power of two.
    """
    op = _ops()
    mbits, emin = _FP8_BITS[fmt]
    m = FP8_MAX[fmt]
    y = op.Clip(y, _f32(-m), _f32(m))
    a = op.Max(op.Abs(y), _f32(2.0 ** (emin - mbits - 1)))
    two = _f32(2.0)
    e = op.Floor(op.Div(op.Log(a), _f32(math.log(2.0))))
    e = op.Where(op.Greater(op.Pow(two, e), a), op.Sub(e, _f32(1.0)), e)       # log rounding fix-ups
    e = op.Where(op.LessOrEqual(op.Pow(two, op.Add(e, _f32(1.0))), a), op.Add(e, _f32(1.0)), e)
    step = op.Pow(two, op.Sub(op.Max(e, _f32(float(emin))), _f32(float(mbits))))
    return op.Mul(op.Round(op.Div(y, step)), step)


def _expand_block_scale(scale, rows_dim, k: int):
    """``[R, nb]`` block scales -> ``[R, K]`` (for the Cast path)."""
    op = _ops()
    nb = -(-k // BLOCK)
    s = op.Expand(op.Unsqueeze(scale, _i64([2])), op.Concat(rows_dim, _i64([nb, BLOCK]), axis=0))
    s = op.Reshape(s, op.Concat(rows_dim, _i64([nb * BLOCK]), axis=0))
    return op.Slice(s, _i64([0]), _i64([k]), _i64([1]))


def _quantize_operand(t, fmt: str, granularity: str, rows: int, k: int, is_weight: bool):
    """Quantize-dequantize a 2-D operand laid out ``[rows, K]`` (K = reduction dim) per the recipe."""
    op = _ops()
    cast_path = _state["opset"] < 21
    if granularity == "tensorwise":
        return _qdq(t, _scale(op.ReduceMax(op.Abs(t), keepdims=0), fmt), fmt)
    if granularity == "rowwise":
        if cast_path:
            s = _scale(op.ReduceMax(op.Abs(t), _i64([1]), keepdims=1), fmt)       # [rows, 1]
            return _qdq(t, s, fmt)
        s = _scale(op.ReduceMax(op.Abs(t), _i64([1]), keepdims=0), fmt)           # [rows]
        return _qdq(t, s, fmt, axis=0)
    if granularity == "blockwise":
        if is_weight:
            s = _weight_square_scales_rows(t, rows, k, fmt)                       # [N, nb]
        else:
            s = _scale(_blocks_amax_rows(t, k), fmt)                              # [M, nb]
        if cast_path:
            rows_dim = op.Slice(op.Shape(t), _i64([0]), _i64([1]))
            return _qdq(t, _expand_block_scale(s, rows_dim, k), fmt)
        return _qdq(t, s, fmt, axis=1, block_size=BLOCK)
    raise ValueError(f"recopt ONNX export: unknown FP8 granularity {granularity!r}")


def fp8_linear(x, weight, bias=None, forward: str = "rowwise", dgrad: str = "bf16", wgrad: str = "bf16"):
    """ONNX translation of ``recopt::fp8_linear`` (inference: the forward recipe only)."""
    import onnx

    from recopt.fp8.linear import HP
    from recopt.fp8.recipes import get_recipe

    op = _ops()
    n, k = (int(d) for d in weight.shape)
    x_shape = op.Shape(x)
    a = op.Cast(op.Reshape(x, _i64([-1, k])), to=onnx.TensorProto.FLOAT)
    w = op.Cast(weight, to=onnx.TensorProto.FLOAT)
    if forward == HP:
        _state["notes"]["recopt.fp8_linear.default"] = "forward recipe bf16: plain float32 MatMul"
        y = op.MatMul(a, op.Transpose(w, perm=[1, 0]))
    else:
        rec = get_recipe(forward)
        fa, fb = rec.formats("forward")
        da = _quantize_operand(a, fa, rec.granularity, -1, k, is_weight=False)
        dw = _quantize_operand(w, fb, rec.granularity, n, k, is_weight=True)
        y = op.MatMul(da, op.Transpose(dw, perm=[1, 0]))
        if _state["opset"] >= 21:
            how = "QuantizeLinear/DequantizeLinear"
        elif _state["opset"] >= 19:
            how = "Cast to float8 and back"
        else:
            how = (f"opset {_state['opset']} has no float8 types: dequantized MatMul, the float8 rounding "
                   "emulated in float32 arithmetic")
        _state["notes"]["recopt.fp8_linear.default"] = (
            f"{how} ({rec.granularity}, x {fa}, W {fb}, scales from amax in the graph) around a float32 "
            f"MatMul (opset {_state['opset']})")
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=onnx.TensorProto.FLOAT))
    out_shape = op.Concat(op.Slice(x_shape, _i64([0]), _i64([-1])), _i64([n]), axis=0)
    return op.CastLike(op.Reshape(y, out_shape), x)


def fp8_translations() -> Dict[Callable, Callable]:
    """``{torch.ops.recopt.fp8_linear.default: fp8_linear}`` when recopt.fp8.linear is present."""
    try:
        import recopt.fp8.linear  # noqa: F401  registers torch.ops.recopt.fp8_linear
    except Exception:
        return {}
    return {torch.ops.recopt.fp8_linear.default: fp8_linear}
