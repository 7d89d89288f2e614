"""ONNX translations of the ops that torch's exporter cannot (or should not) translate itself.

Each translation is a *trace-only* onnxscript function: torch's ONNX exporter
calls it with the node's inputs as ONNX values and its non-tensor arguments
as Python values, and records the ONNX ops it emits. The table returned by
:func:`translation_table` is passed to ``torch.onnx.export(...,
custom_translation_table=...)``.

Built in:

- ``recopt::gdpa`` (dense GDPA, semantics of :func:`recopt.ops.gdpa_ref.gdpa_ref`): ``MatMul(q, kᵀ)`` → ``Mul(pre_scale)``
  → zero masking (``Where``: window band, key lengths) → activation →
  ``Mul(qk_scale)`` → ``MatMul(·, v)`` → query-row masking. GQA repeats the
  K/V heads with ``Expand``/``Reshape``. Masked scores are **zero**, never
  ``-inf`` (valid because ``act(0) == 0`` for every GDPA activation).
- ``recopt::gdpa_jagged``: jagged values are padded with ``Gather`` over the
  offsets, run through the dense translation, and gathered back.
- ``aten::embedding_bag`` / ``aten::_embedding_bag`` (``nn.EmbeddingBag``,
  ``F.embedding_bag``): ``Gather`` of each bag's rows into a padded
  ``[bags, longest bag, D]`` block, masked, then ``ReduceSum`` / ``ReduceMean``
  (or ``ReduceMax``) over the bag axis. torch's own translation uses
  ``Loop`` + ``Sequence*`` ops, which several runtimes reject.
- ``recopt::fp8_linear``: QuantizeLinear/DequantizeLinear around MatMul, see
  :mod:`recopt.export.fp8_translation`.

The exporter inlines these nodes; :func:`recopt.export.onnx_export.wrap_in_functions`
then moves each GDPA / FP8-linear call site into a model-local ONNX function
(domain ``recopt``).

User translations: :func:`register_translation`.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch

# Extra translations registered by users (and by recopt modules that land
# later), op overload -> onnxscript function.
_USER_TRANSLATIONS: Dict[Callable, Callable] = {}

# Notes a translation leaves for the manifest (e.g. how FP8 was lowered).
_NOTES: list = []

LEAKY_SLOPE = 0.01  # recopt.ops.gdpa_ref.LEAKY_SLOPE


def register_translation(op: Callable, fn: Callable, *, replace: bool = False) -> None:
    """Register an ONNX translation for ``op`` (an ``OpOverload`` such as
    ``torch.ops.mylib.myop.default``).

    ``fn`` is an onnxscript trace-only function: it receives the op's
    arguments in schema order (tensors as ONNX values, other arguments as
    Python values) and returns the output value(s), built with
    ``from onnxscript import opset18 as op``.
    """
    if not isinstance(op, torch._ops.OpOverload):
        raise TypeError(
            f"register_translation expects an OpOverload such as torch.ops.mylib.myop.default, got {op!r}"
        )
    if op in _USER_TRANSLATIONS and _USER_TRANSLATIONS[op] is not fn and not replace:
        raise ValueError(f"a translation for {op} is already registered; pass replace=True to override it")
    _USER_TRANSLATIONS[op] = fn


def _op():
    from onnxscript import opset18

    return opset18


def _ir_dtype_of(value):
    dt = getattr(value, "dtype", None)
    return dt


def _onnx_float_type():
    import onnx

    return onnx.TensorProto.FLOAT


def _const_i64(values):
    op = _op()
    return op.Constant(value_ints=list(int(v) for v in values))


def _scalar(x: float, like=None):
    """A float32 scalar constant (cast to ``like``'s dtype when given)."""
    op = _op()
    c = op.Constant(value_float=float(x))
    if like is not None:
        c = op.CastLike(c, like)
    return c


# ----------------------------------------------------------------------------- GDPA


def _activation(s, act: str):
    """Elementwise GDPA activation, the same formulas as recopt.ops.gdpa_ref.act_fwd."""
    op = _op()
    if act == "raw":
        return s
    if act == "gelu":  # exact GELU: 0.5 x (1 + erf(x / sqrt 2))
        return op.Mul(op.Mul(s, _scalar(0.5, s)),
                      op.Add(_scalar(1.0, s), op.Erf(op.Mul(s, _scalar(1.0 / math.sqrt(2.0), s)))))
    if act == "gelu_tanh":
        c = math.sqrt(2.0 / math.pi)
        cube = op.Mul(op.Mul(s, s), s)
        inner = op.Mul(_scalar(c, s), op.Add(s, op.Mul(_scalar(0.044715, s), cube)))
        return op.Mul(op.Mul(s, _scalar(0.5, s)), op.Add(_scalar(1.0, s), op.Tanh(inner)))
    if act == "silu":
        return op.Mul(s, op.Sigmoid(s))
    if act == "relu":
        return op.Relu(s)
    if act == "relu_square":
        r = op.Relu(s)
        return op.Mul(r, r)
    if act == "leaky_relu":
        return op.LeakyRelu(s, alpha=LEAKY_SLOPE)
    if act == "hardswish":
        return op.HardSwish(s)
    raise ValueError(
        f"recopt ONNX export: GDPA activation {act!r} has no ONNX translation "
        "(softmax GDPA runs through F.scaled_dot_product_attention, which torch exports itself)"
    )


def _static_dim(value, axis: int, what: str) -> int:
    shape = getattr(value, "shape", None)
    dim = None if shape is None else shape[axis]
    if not isinstance(dim, int):
        raise ValueError(f"recopt ONNX export: GDPA needs a static {what} (axis {axis}), got {dim!r}")
    return dim


def _repeat_heads(t, heads: int, hkv: int):
    """``[B, Hkv, T, d] -> [B, heads, T, d]`` repeating each KV head ``heads // Hkv`` times
    (torch.repeat_interleave on dim 1)."""
    op = _op()
    if hkv == heads:
        return t
    r = heads // hkv
    shape = op.Shape(t)
    b = op.Slice(shape, _const_i64([0]), _const_i64([1]))
    td = op.Slice(shape, _const_i64([2]), _const_i64([4]))
    expanded = op.Expand(op.Unsqueeze(t, _const_i64([2])),
                         op.Concat(b, _const_i64([hkv, r]), td, axis=0))
    return op.Reshape(expanded, op.Concat(b, _const_i64([heads]), td, axis=0))


def _lengths_mask(lengths, n):
    """``[B] lengths``, scalar-int64 ``n`` -> bool ``[B, n]`` with ``t < lengths[b]``."""
    op = _op()
    pos = op.Range(_const_scalar_i64(0), n, _const_scalar_i64(1))
    return op.Less(op.Unsqueeze(pos, _const_i64([0])),
                   op.Unsqueeze(op.Cast(lengths, to=7), _const_i64([1])))


def _const_scalar_i64(v: int):
    op = _op()
    return op.Constant(value_int=int(v))


def _dim_scalar(value, axis: int):
    """Size of ``value`` along ``axis`` as a scalar int64 tensor (works for dynamic dims)."""
    op = _op()
    return op.Squeeze(op.Slice(op.Shape(value), _const_i64([axis]), _const_i64([axis + 1])),
                      _const_i64([0]))


def gdpa_dense(q, k, v, q_lengths=None, kv_lengths=None, activation: str = "raw",
               qk_scale: float = 1.0, pre_scale: float = 1.0, window: int = -1,
               causal: bool = False, bias=None):
    """ONNX translation of ``recopt::gdpa`` (see :func:`recopt.ops.gdpa_ref.gdpa_ref`)."""
    import onnx

    return _gdpa_core(q, k, v, q_lengths, kv_lengths, activation, qk_scale, pre_scale, window,
                      _static_dim(q, 1, "number of query heads"), _static_dim(k, 1, "number of K/V heads"),
                      causal=causal, bias=bias)


def _gdpa_core(q, k, v, q_lengths, kv_lengths, activation, qk_scale, pre_scale, window, heads: int, kv_heads: int,
               causal: bool = False, bias=None):
    import onnx

    op = _op()
    k = _repeat_heads(k, heads, kv_heads)
    v = _repeat_heads(v, heads, kv_heads)
    s = op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2]))              # [B, H, Tq, Tk]
    q_dtype = _ir_dtype_of(q)
    compute_f32 = q_dtype is not None and int(q_dtype) != onnx.TensorProto.FLOAT
    if compute_f32:
        s = op.Cast(s, to=onnx.TensorProto.FLOAT)
    if pre_scale != 1.0:
        s = op.Mul(s, _scalar(pre_scale, s))
    if bias is not None:
        s = op.Add(s, op.CastLike(bias, s))
    keep = None
    if causal:
        tq, tk = _dim_scalar(q, 2), _dim_scalar(k, 2)
        i = op.Range(_const_scalar_i64(0), tq, _const_scalar_i64(1))
        j = op.Range(_const_scalar_i64(0), tk, _const_scalar_i64(1))
        keep = op.Not(op.Greater(op.Unsqueeze(j, _const_i64([0])), op.Unsqueeze(i, _const_i64([1]))))
    if window is not None and window >= 0:
        tq, tk = _dim_scalar(q, 2), _dim_scalar(k, 2)
        i = op.Range(_const_scalar_i64(0), tq, _const_scalar_i64(1))
        j = op.Range(_const_scalar_i64(0), tk, _const_scalar_i64(1))
        dist = op.Abs(op.Sub(op.Unsqueeze(i, _const_i64([1])), op.Unsqueeze(j, _const_i64([0]))))
        band = op.Not(op.Greater(dist, _const_scalar_i64(window)))    # [Tq, Tk]
        keep = band if keep is None else op.And(keep, band)
    if kv_lengths is not None:
        kl = op.Unsqueeze(_lengths_mask(kv_lengths, _dim_scalar(k, 2)), _const_i64([1, 2]))  # [B,1,1,Tk]
        keep = kl if keep is None else op.And(keep, kl)
    if keep is not None:
        s = op.Where(keep, s, _scalar(0.0, s))
    p = _activation(s, activation)
    if qk_scale != 1.0:
        p = op.Mul(p, _scalar(qk_scale, p))
    if compute_f32 or (_ir_dtype_of(v) is not None and q_dtype is not None and int(_ir_dtype_of(v)) != int(q_dtype)):
        p = op.CastLike(p, v)
    o = op.MatMul(p, v)                                                  # [B, H, Tq, dv]
    if q_lengths is not None:
        rows = op.Unsqueeze(_lengths_mask(q_lengths, _dim_scalar(q, 2)), _const_i64([1, 3]))  # [B,1,Tq,1]
        o = op.Where(rows, o, op.CastLike(_scalar(0.0), o))
    return op.CastLike(o, q)


def sdpa(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
         scale: Optional[float] = None, enable_gqa: bool = False):
    """ONNX translation of ``aten::scaled_dot_product_attention`` with PyTorch's semantics for a
    query row whose every key is masked: **0** (torch's own ONNX translation softmaxes a row of
    ``-inf`` and gets NaN or garbage). Any row whose scores are all ``-inf`` after the boolean /
    additive mask and ``is_causal`` gives 0, as SDPA's CPU kernels do (docs/gdpa.md)."""
    import onnx

    if dropout_p:
        raise ValueError(f"recopt ONNX export: scaled_dot_product_attention with dropout_p={dropout_p} "
                         "(export the model in eval mode)")
    op = _op()
    rank = len(query.shape)
    e = _static_dim(query, rank - 1, "query feature size")
    if enable_gqa:
        key = _repeat_heads(key, _static_dim(query, 1, "query heads"), _static_dim(key, 1, "K/V heads"))
        value = _repeat_heads(value, _static_dim(query, 1, "query heads"), _static_dim(value, 1, "K/V heads"))
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    s = op.MatMul(query, op.Transpose(key, perm=perm))
    s = op.Mul(s, _scalar(scale if scale is not None else 1.0 / math.sqrt(e), s))
    neg_inf = _scalar(float("-inf"), s)
    if is_causal:
        tq, tk = _dim_scalar(query, rank - 2), _dim_scalar(key, rank - 2)
        i = op.Range(_const_scalar_i64(0), tq, _const_scalar_i64(1))
        j = op.Range(_const_scalar_i64(0), tk, _const_scalar_i64(1))
        s = op.Where(op.Greater(op.Unsqueeze(j, _const_i64([0])), op.Unsqueeze(i, _const_i64([1]))), neg_inf, s)
    if attn_mask is not None:
        if _ir_dtype_of(attn_mask) is not None and int(_ir_dtype_of(attn_mask)) == onnx.TensorProto.BOOL:
            s = op.Where(attn_mask, s, neg_inf)
        else:
            s = op.Add(s, op.CastLike(attn_mask, s))
    dead = op.Equal(op.ReduceMax(s, _const_i64([-1]), keepdims=1), neg_inf)     # [.., Tq, 1]
    p = op.Where(dead, _scalar(0.0, s), op.Softmax(s, axis=-1))
    return op.MatMul(p, value)


def _jagged_positions(offsets, max_len: int):
    """For offsets ``[B+1]``: gather indices ``[B, L]`` into the values and a bool ``[B, L]``
    mask of valid positions, ``L = max_len``."""
    op = _op()
    offsets = op.Cast(offsets, to=7)
    starts = op.Slice(offsets, _const_i64([0]), _const_i64([-1]))
    ends = op.Slice(offsets, _const_i64([1]), _const_i64([2**62]))
    lengths = op.Sub(ends, starts)
    pos = op.Range(_const_scalar_i64(0), _const_scalar_i64(max_len), _const_scalar_i64(1))
    idx = op.Add(op.Unsqueeze(starts, _const_i64([1])), op.Unsqueeze(pos, _const_i64([0])))  # [B, L]
    valid = op.Less(op.Unsqueeze(pos, _const_i64([0])), op.Unsqueeze(lengths, _const_i64([1])))
    return idx, valid, lengths


def _pad_jagged(values, offsets, max_len: int):
    """``values [N, H, d]`` -> padded ``[B, H, L, d]`` (zeros past each length) and lengths ``[B]``."""
    op = _op()
    idx, valid, lengths = _jagged_positions(offsets, max_len)
    n = _dim_scalar(values, 0)
    safe = op.Where(valid, op.Min(idx, op.Sub(n, _const_scalar_i64(1))), _const_scalar_i64(0))
    safe = op.Max(safe, _const_scalar_i64(0))
    g = op.Gather(values, safe, axis=0)                                  # [B, L, H, d]
    g = op.Where(op.Unsqueeze(valid, _const_i64([2, 3])), g, op.CastLike(_scalar(0.0), g))
    return op.Transpose(g, perm=[0, 2, 1, 3]), lengths


def gdpa_jagged(q, k, v, q_offsets, kv_offsets, max_seq_len_q: int, max_seq_len_kv: int,
                activation: str = "raw", qk_scale: float = 1.0, pre_scale: float = 1.0, window: int = -1):
    """ONNX translation of ``recopt::gdpa_jagged``: pad with Gather, dense GDPA, gather back.

    Query rows past ``max_seq_len_q`` within a sequence give 0, as in the reference.
    """
    op = _op()
    qp, q_len = _pad_jagged(q, q_offsets, max_seq_len_q)
    kp, kv_len = _pad_jagged(k, kv_offsets, max_seq_len_kv)
    vp, _ = _pad_jagged(v, kv_offsets, max_seq_len_kv)
    o = _gdpa_core(qp, kp, vp, q_len, kv_len, activation, qk_scale, pre_scale, window,
                   _static_dim(q, 1, "number of query heads"), _static_dim(k, 1, "number of K/V heads"))
    # o: [B, H, Lq, dv]
    o = op.Transpose(o, perm=[0, 2, 1, 3])                               # [B, Lq, H, dv]
    # Row n of q belongs to sample b(n) = #(starts <= n) - 1 at position n - start[b(n)].
    q_offsets = op.Cast(q_offsets, to=7)
    starts = op.Slice(q_offsets, _const_i64([0]), _const_i64([-1]))
    n = op.Range(_const_scalar_i64(0), _dim_scalar(q, 0), _const_scalar_i64(1))
    ge = op.Cast(op.Not(op.Less(op.Unsqueeze(n, _const_i64([1])), op.Unsqueeze(starts, _const_i64([0])))), to=7)
    b = op.Sub(op.ReduceSum(ge, _const_i64([1]), keepdims=0), _const_scalar_i64(1))  # [N]
    t = op.Sub(n, op.Gather(starts, b, axis=0))
    in_range = op.Less(t, _const_scalar_i64(max_seq_len_q))
    t_safe = op.Where(in_range, t, _const_scalar_i64(0))
    rows = op.GatherND(o, op.Concat(op.Unsqueeze(b, _const_i64([1])), op.Unsqueeze(t_safe, _const_i64([1])),
                                    axis=1))                             # [N, H, dv]
    return op.Where(op.Unsqueeze(in_range, _const_i64([1, 2])), rows, op.CastLike(_scalar(0.0), rows))


# ----------------------------------------------------------------------------- embedding bags

_MODE_SUM, _MODE_MEAN, _MODE_MAX = 0, 1, 2


def _embedding_bag(weight, indices, offsets, mode: int, per_sample_weights, include_last_offset: bool,
                   padding_idx: Optional[int]):
    """Bags as Gather + masked ReduceSum/ReduceMean/ReduceMax over a padded bag axis.

    ``indices [N]``, ``offsets [B]`` (bag starts; ``[B+1]`` with
    ``include_last_offset``), ``weight [V, D]`` -> ``[B, D]``; empty bags give
    zeros. Returns torch's four outputs (pooled, offset2bag, bag_size,
    max_indices); only ``pooled`` is normally used.
    """
    op = _op()
    indices = op.Cast(indices, to=7)
    offsets = op.Cast(offsets, to=7)
    n = _dim_scalar(indices, 0)
    if include_last_offset:
        starts = op.Slice(offsets, _const_i64([0]), _const_i64([-1]))
        ends = op.Slice(offsets, _const_i64([1]), _const_i64([2**62]))
    else:
        starts = offsets
        ends = op.Concat(op.Slice(offsets, _const_i64([1]), _const_i64([2**62])),
                         op.Unsqueeze(n, _const_i64([0])), axis=0)
    lengths = op.Sub(ends, starts)                                        # [B]
    longest = op.ReduceMax(op.Concat(lengths, _const_i64([0]), axis=0), keepdims=0)
    pos = op.Range(_const_scalar_i64(0), longest, _const_scalar_i64(1))   # [L]
    flat = op.Add(op.Unsqueeze(starts, _const_i64([1])), op.Unsqueeze(pos, _const_i64([0])))  # [B, L]
    valid = op.Less(op.Unsqueeze(pos, _const_i64([0])), op.Unsqueeze(lengths, _const_i64([1])))
    flat = op.Where(valid, flat, _const_scalar_i64(0))
    ids = op.Gather(indices, flat, axis=0)                                # [B, L]
    if padding_idx is not None and padding_idx >= 0:
        valid = op.And(valid, op.Not(op.Equal(ids, _const_scalar_i64(padding_idx))))
    rows = op.Gather(weight, ids, axis=0)                                 # [B, L, D]
    valid3 = op.Unsqueeze(valid, _const_i64([2]))
    count = op.ReduceSum(op.Cast(valid, to=7), _const_i64([1]), keepdims=0)  # [B] rows that count
    if mode == _MODE_MAX:
        neg_inf = op.CastLike(_scalar(float("-inf")), rows)
        pooled = op.ReduceMax(op.Where(valid3, rows, neg_inf), _const_i64([1]), keepdims=0)
        arg = op.ArgMax(op.Where(valid3, rows, neg_inf), axis=1, keepdims=0)  # [B, D] bag position
        max_indices = op.GatherElements(ids, arg, axis=1)
        has_rows = op.Unsqueeze(op.Greater(count, _const_scalar_i64(0)), _const_i64([1]))
        pooled = op.Where(has_rows, pooled, op.CastLike(_scalar(0.0), rows))
        max_indices = op.Where(has_rows, max_indices, _const_scalar_i64(-1))
    else:
        if per_sample_weights is not None:
            w = op.Gather(per_sample_weights, flat, axis=0)               # [B, L]
            rows = op.Mul(rows, op.CastLike(op.Unsqueeze(w, _const_i64([2])), rows))
        rows = op.Where(valid3, rows, op.CastLike(_scalar(0.0), rows))
        pooled = op.ReduceSum(rows, _const_i64([1]), keepdims=0)          # [B, D]
        if mode == _MODE_MEAN:
            denom = op.CastLike(op.Max(count, _const_scalar_i64(1)), pooled)
            pooled = op.Div(pooled, op.Unsqueeze(denom, _const_i64([1])))
        max_indices = op.Cast(op.Mul(op.Unsqueeze(count, _const_i64([1])), _const_scalar_i64(0)), to=7)
    # offset2bag: the bag of each index position, i.e. #(starts <= i) - 1.
    i = op.Range(_const_scalar_i64(0), n, _const_scalar_i64(1))
    ge = op.Cast(op.Not(op.Less(op.Unsqueeze(i, _const_i64([1])), op.Unsqueeze(starts, _const_i64([0])))), to=7)
    offset2bag = op.Sub(op.ReduceSum(ge, _const_i64([1]), keepdims=0), _const_scalar_i64(1))
    return pooled, offset2bag, count, max_indices


def embedding_bag_padding_idx(weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
                              per_sample_weights=None, include_last_offset=False, padding_idx=None):
    """``aten::embedding_bag.padding_idx``."""
    return _embedding_bag(weight, indices, offsets, int(mode), per_sample_weights, bool(include_last_offset),
                          padding_idx)


def embedding_bag_default(weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
                          per_sample_weights=None, include_last_offset=False):
    """``aten::embedding_bag``."""
    return _embedding_bag(weight, indices, offsets, int(mode), per_sample_weights, bool(include_last_offset),
                          None)


def embedding_bag_private(weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
                          per_sample_weights=None, include_last_offset=False, padding_idx=-1):
    """``aten::_embedding_bag`` and ``aten::_embedding_bag_forward_only``."""
    return _embedding_bag(weight, indices, offsets, int(mode), per_sample_weights, bool(include_last_offset),
                          padding_idx)


# ----------------------------------------------------------------------------- FBGEMM / TorchRec helpers


def complete_cumsum(x):
    """``fbgemm::asynchronous_complete_cumsum``: ``[0, cumsum(x)...]`` (lengths -> offsets, ``N+1``)."""
    op = _op()
    zero = op.CastLike(op.Constant(value_ints=[0]), x)
    return op.Concat(zero, op.CumSum(x, _const_scalar_i64(0)), axis=0)


def _fbgemm_op(name: str):
    try:
        packet = getattr(torch.ops.fbgemm, name)
        return packet.default
    except (AttributeError, RuntimeError):
        return None


# ----------------------------------------------------------------------------- the table


def _recopt_op(name: str):
    """``torch.ops.recopt.<name>.default`` if recopt.ops registers an op of that name, else None."""
    import recopt.ops  # noqa: F401  registers torch.ops.recopt.*

    packet = getattr(torch.ops.recopt, name, None)
    try:
        return packet.default if packet is not None else None
    except AttributeError:
        return None


def translation_table() -> Dict[Callable, Callable]:
    """Op overload -> onnxscript translation, for ``torch.onnx.export(custom_translation_table=...)``."""
    aten = torch.ops.aten
    table: Dict[Callable, Callable] = {
        aten.embedding_bag.padding_idx: embedding_bag_padding_idx,
        aten.embedding_bag.default: embedding_bag_default,
        aten._embedding_bag.default: embedding_bag_private,
        aten._embedding_bag_forward_only.default: embedding_bag_private,
        aten.scaled_dot_product_attention.default: sdpa,
    }
    cumsum = _fbgemm_op("asynchronous_complete_cumsum")
    if cumsum is not None:
        table[cumsum] = complete_cumsum
    gdpa = _recopt_op("gdpa")
    if gdpa is not None:
        table[gdpa] = gdpa_dense
    jagged = _recopt_op("gdpa_jagged")
    if jagged is not None:
        table[jagged] = gdpa_jagged
    from .fp8_translation import fp8_translations

    table.update(fp8_translations())
    table.update(_USER_TRANSLATIONS)
    return table


def translated_ops() -> list:
    """Names of the ops with a recopt (or user) translation, for docs and error messages."""
    return sorted(str(k) for k in translation_table())


_DESCRIPTIONS = {
    "aten.embedding_bag": "Gather of each bag's rows + masked ReduceSum/ReduceMean/ReduceMax over offsets "
                          "(no Sequence ops)",
    "aten._embedding_bag": "Gather of each bag's rows + masked ReduceSum/ReduceMean/ReduceMax over offsets "
                           "(no Sequence ops)",
    "recopt.gdpa": "MatMul(q, kT) -> Mul(pre_scale) -> zero masking (Where: window, key lengths) -> activation "
                   "-> Mul(qk_scale) -> MatMul(p, v) -> query-row masking",
    "fbgemm.asynchronous_complete_cumsum": "Concat([0], CumSum(lengths)) (TorchRec lengths -> offsets)",
    "recopt.gdpa_jagged": "Gather-pad over offsets -> dense GDPA (MatMul, activation, Mul, MatMul) -> GatherND back",
}


def describe(op_name: str) -> str:
    """A one-line description of how ``op_name`` (``str(OpOverload)``) is lowered."""
    for prefix, text in _DESCRIPTIONS.items():
        if op_name == prefix or op_name.startswith(prefix + "."):
            return text
    if any(str(k) == op_name for k in _USER_TRANSLATIONS):
        return "user translation (recopt.export.register_translation)"
    return "recopt translation"
