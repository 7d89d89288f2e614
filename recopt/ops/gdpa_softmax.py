"""Softmax GDPA on a fused path: the per-call route, the custom op, the masked-row fills.

:func:`recopt.ops.gdpa.gdpa` with ``activation="softmax"`` asks
:func:`softmax_route` which implementation serves the call:

- ``"triton"``: the online-softmax kernels (:mod:`recopt.kernels.gdpa_softmax`)
  through ``torch.ops.recopt.gdpa_softmax`` — q/kv lengths, causal, window,
  GQA, broadcast q, an additive float mask or bias (e.g. ``-1e9`` padding), a
  boolean ``attn_mask`` (as a ``-inf`` bias); O(T) memory, forward and backward;
- ``"sdpa"``: ``F.scaled_dot_product_attention`` (flash on CUDA) where it is
  exact: no mask but ``causal`` (top-left, SDPA's ``is_causal``), no lengths;
- ``"reference"``: :func:`recopt.ops.gdpa_ref.softmax_attention` (SDPA for
  boolean masks, the model's own math for float masks): CPU tensors, active
  dropout (its random stream is ``F.dropout``'s), a bias that requires grad
  (no ``dbias`` in the kernels), head sizes over 256 (64 in fp32), dtypes the kernels do
  not take, a boolean mask together with a float one when ``masked_rows`` is
  not ``"zero"``, or ``RECOPT_GDPA_BACKEND=reference``.

Each route carries its reason (:class:`SoftmaxRoute`); :data:`ROUTE_COUNTS`
counts the routes :func:`recopt.ops.gdpa.gdpa` / ``gdpa_jagged`` took, with their
reasons, in eager mode (not inside ``torch.compile`` traces) — a call that could
not use the kernels is visible there.

Fully-masked rows follow ``masked_rows`` exactly as the reference does. The
kernel gives 0 (and no gradient) for rows with no kept key and for rows whose
biased scores are all -inf; with ``"uniform"``/``"nan"`` the latter are NaN in
the kernel (NaN gradients), and rows with no kept key are filled here, after
the op, with plain torch ops (``where(dead, mean(v), o)``), so their gradients
(into v only) are the reference's.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import gdpa_ref as R

# triton is optional: the reference works with torch alone. Only its absence is caught; an
# error inside our own launcher module must fail loudly, not route every call to the reference.
try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - exercised on installs without triton
    _S = None
    HAS_TRITON = False
else:
    from . import _gdpa_softmax_triton as _S

    HAS_TRITON = True

BACKEND_ENV = "RECOPT_GDPA_BACKEND"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_HEAD_DIM_FP32 = 64
ROUTE_COUNTS: Counter = Counter()


@dataclass(frozen=True)
class SoftmaxRoute:
    """Which implementation serves a softmax GDPA call, and why."""

    backend: str   # "triton" | "sdpa" | "reference"
    reason: str


def softmax_route(q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Optional[Tensor] = None,
                  bias: Optional[Tensor] = None, q_lengths: Optional[Tensor] = None,
                  kv_lengths: Optional[Tensor] = None, window: int = -1, causal: bool = False,
                  masked_rows: str = "zero", dropout_p: float = 0.0) -> SoftmaxRoute:
    """The route of one dense softmax call (``q [B,H,Tq,d]``, ``k``/``v`` ``[B,Hkv,Tk,·]``).

    ``RECOPT_GDPA_BACKEND=triton`` forces the kernels (CPU tests under
    ``TRITON_INTERPRET=1``) wherever they can serve the call; a call they cannot
    serve keeps the reference and says why.
    """
    choice = os.environ.get(BACKEND_ENV, "auto").lower()
    if choice not in ("auto", "triton", "reference"):
        raise ValueError(f"{BACKEND_ENV}={choice!r}; use auto, triton or reference")
    if choice == "reference":
        return SoftmaxRoute("reference", f"{BACKEND_ENV}=reference")
    float_masks = [t for t in (attn_mask, bias) if t is not None and t.dtype != torch.bool]
    bool_mask = attn_mask is not None and attn_mask.dtype == torch.bool
    why = None
    if not HAS_TRITON:
        why = "triton is not installed (the [gpu] extra): the reference runs"
    elif not (q.dtype in _DTYPES and q.dtype == k.dtype == v.dtype):
        why = f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}: the kernels take one of {_DTYPES}"
    elif choice == "auto" and not q.is_cuda:
        why = "CPU tensors: the reference runs (SDPA for boolean masks, the model's math for float masks)"
    elif dropout_p > 0.0:
        why = "dropout in training: drawn by the reference (F.dropout's random stream)"
    elif torch.is_grad_enabled() and any(t.requires_grad for t in float_masks):
        why = "an additive mask/bias that requires grad: dbias is not in the softmax kernels"
    elif _head_dim_reason(q, v):
        why = _head_dim_reason(q, v)
    elif bool_mask and float_masks and masked_rows != "zero":
        why = (f"a boolean and a float mask together with masked_rows={masked_rows!r}: rows the boolean "
               "mask empties are filled, rows the float mask empties are NaN; the reference tells them apart")
    elif k.shape[2] == 0:
        why = "no keys (Tk = 0)"
    elif any(t.device != q.device for t in (k, v, *float_masks)):
        why = "tensors on different devices"
    elif choice == "auto" and torch.compiler.is_exporting():
        why = "exporting: the reference's plain ops are what an exported program can hold"
    if why is not None:
        return SoftmaxRoute("reference", why)
    unmasked = (attn_mask is None and bias is None and q_lengths is None and kv_lengths is None
                and window < 0)
    if choice == "auto" and unmasked:
        return SoftmaxRoute("sdpa", "no mask but causal, no lengths: F.scaled_dot_product_attention "
                                    "(flash) is exact here")
    return SoftmaxRoute("triton", "fused online-softmax Triton kernel (O(T) memory)")


def _head_dim_reason(q: Tensor, v: Tensor) -> Optional[str]:
    """Why this head size keeps the reference, or None."""
    d = max(q.shape[-1], v.shape[-1])
    if d > MAX_HEAD_DIM:
        return f"head size {d} > {MAX_HEAD_DIM}"
    if q.dtype == torch.float32 and d > MAX_HEAD_DIM_FP32:
        return (f"fp32 at head size {d} > {MAX_HEAD_DIM_FP32}: the exact-fp32 kernels (FMA dots) spill "
                "there (24 B-8 KB of stack, docs/kernels.md); the reference runs")
    return None


def static_note(dropout: bool = False) -> str:
    """What the gdpa pass reports for a softmax site (the route is decided per call)."""
    if dropout:
        return ("softmax with dropout: the reference in training (F.dropout's stream); in eval, on CUDA, "
                "the fused online-softmax kernel")
    return ("softmax: on CUDA the fused online-softmax Triton kernel (lengths, causal, window, additive "
            "and boolean masks; SDPA flash when unmasked); the reference on CPU (per call: "
            "recopt.ops.gdpa_softmax.softmax_route)")


# ----------------------------------------------------------------------------- the op


def _define(name: str):
    def deco(fn):
        return torch.library.triton_op(name, fn, mutates_args=())

    return deco


if HAS_TRITON:

    @_define("recopt::gdpa_softmax")
    def _softmax_op(
        q: Tensor, k: Tensor, v: Tensor, q_lengths: Optional[Tensor], kv_lengths: Optional[Tensor],
        bias: Optional[Tensor], qk_scale: float, pre_scale: float, window: int, causal: bool,
        dead_nan: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(o, M, 1/L)``: output and the row statistics the backward needs (fp32)."""
        return _S.softmax_fwd(q, k, v, qk_scale=qk_scale, pre_scale=pre_scale, window=window,
                              q_lengths=q_lengths, kv_lengths=kv_lengths, causal=causal, bias=bias,
                              dead_nan=dead_nan)

    @_define("recopt::gdpa_softmax_backward")
    def _softmax_backward_op(
        grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, m: Tensor, l_inv: Tensor,
        q_lengths: Optional[Tensor], kv_lengths: Optional[Tensor], bias: Optional[Tensor],
        qk_scale: float, pre_scale: float, window: int, causal: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return _S.softmax_bwd(grad_out.contiguous(), q, k, v, o, m, l_inv, qk_scale=qk_scale,
                              pre_scale=pre_scale, window=window, q_lengths=q_lengths,
                              kv_lengths=kv_lengths, causal=causal, bias=bias)

    def _setup(ctx, inputs, output):
        q, k, v, q_lengths, kv_lengths, bias, qk_scale, pre_scale, window, causal, _ = inputs
        o, m, l_inv = output
        ctx.save_for_backward(q, k, v, o, m, l_inv, q_lengths, kv_lengths, bias)
        ctx.args = (qk_scale, pre_scale, window, causal)

    def _backward(ctx, grad_o, grad_m, grad_l):
        q, k, v, o, m, l_inv, q_lengths, kv_lengths, bias = ctx.saved_tensors
        dq, dk, dv = torch.ops.recopt.gdpa_softmax_backward(grad_o, q, k, v, o, m, l_inv, q_lengths,
                                                            kv_lengths, bias, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None, None

    _softmax_op.register_autograd(_backward, setup_context=_setup)

    @_define("recopt::gdpa_softmax_jagged")
    def _softmax_jagged_op(
        q: Tensor, k: Tensor, v: Tensor, q_offsets: Tensor, kv_offsets: Tensor,
        max_seq_len_q: int, max_seq_len_kv: int, qk_scale: float, pre_scale: float, window: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Jagged ``(o, M, 1/L)`` (``M``, ``1/L``: ``[H, N]``); rows with no kept key give 0."""
        return _S.softmax_fwd(q, k, v, qk_scale=qk_scale, pre_scale=pre_scale, window=window,
                              q_offsets=q_offsets, kv_offsets=kv_offsets, max_seq_len_q=max_seq_len_q,
                              max_seq_len_kv=max_seq_len_kv)

    @_define("recopt::gdpa_softmax_jagged_backward")
    def _softmax_jagged_backward_op(
        grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, m: Tensor, l_inv: Tensor,
        q_offsets: Tensor, kv_offsets: Tensor, max_seq_len_q: int, max_seq_len_kv: int,
        qk_scale: float, pre_scale: float, window: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return _S.softmax_bwd(grad_out.contiguous(), q, k, v, o, m, l_inv, qk_scale=qk_scale,
                              pre_scale=pre_scale, window=window, q_offsets=q_offsets,
                              kv_offsets=kv_offsets, max_seq_len_q=max_seq_len_q,
                              max_seq_len_kv=max_seq_len_kv)

    def _setup_jagged(ctx, inputs, output):
        q, k, v, q_offsets, kv_offsets, *rest = inputs
        o, m, l_inv = output
        ctx.save_for_backward(q, k, v, o, m, l_inv, q_offsets, kv_offsets)
        ctx.args = tuple(rest)

    def _backward_jagged(ctx, grad_o, grad_m, grad_l):
        q, k, v, o, m, l_inv, q_offsets, kv_offsets = ctx.saved_tensors
        dq, dk, dv = torch.ops.recopt.gdpa_softmax_jagged_backward(grad_o, q, k, v, o, m, l_inv, q_offsets,
                                                                   kv_offsets, *ctx.args)
        return (dq, dk, dv) + (None,) * 7

    _softmax_jagged_op.register_autograd(_backward_jagged, setup_context=_setup_jagged)

    def _register_flops():
        from torch.utils.flop_counter import register_flop_formula

        def flops(q_shape, k_shape, v_shape, backward=False):
            B, H, Tq, d = q_shape
            fwd = 2 * B * H * Tq * k_shape[2] * (d + v_shape[3])
            return int(fwd * 2.5) if backward else fwd

        @register_flop_formula(torch.ops.recopt.gdpa_softmax)
        def _fwd(q_shape, k_shape, v_shape, *args, out_shape=None, **kw):
            return flops(q_shape, k_shape, v_shape)

        @register_flop_formula(torch.ops.recopt.gdpa_softmax_backward)
        def _bwd(go_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kw):
            return flops(q_shape, k_shape, v_shape, backward=True)

        # jagged: every query row counted against the longest key sequence (an upper bound)
        @register_flop_formula(torch.ops.recopt.gdpa_softmax_jagged)
        def _jfwd(q_shape, k_shape, v_shape, qo, ko, max_q, max_k, *args, out_shape=None, **kw):
            return 2 * q_shape[0] * q_shape[1] * max_k * (q_shape[2] + v_shape[2])

        @register_flop_formula(torch.ops.recopt.gdpa_softmax_jagged_backward)
        def _jbwd(go, q_shape, k_shape, v_shape, o, m, l_inv, qo, ko, max_q, max_k, *args, out_shape=None, **kw):
            return int(2.5 * 2 * q_shape[0] * q_shape[1] * max_k * (q_shape[2] + v_shape[2]))

    _register_flops()


# ----------------------------------------------------------------------------- the call


def note_route(route: SoftmaxRoute) -> SoftmaxRoute:
    """Count a route taken (reference routes too, with their reason) in eager mode; a traced
    graph is not counted per call. Returns ``route``."""
    if not torch.compiler.is_compiling():
        ROUTE_COUNTS[(route.backend, route.reason)] += 1
    return route


def _rows_without_keys(Tq: int, Tk: int, kv_lengths, window: int, causal: bool, device) -> Optional[Tensor]:
    """``[B|1, 1, Tq, 1]`` bool: query rows no key survives for (lengths, window, causal), from the
    kept interval ``[max(0, i - w), min(kv_len - 1, i + w, i)]`` per row — O(B·Tq), no score mask."""
    if kv_lengths is None and window < 0:
        return None  # Tk > 0 (softmax_route): key 0 is kept by every row, causal or not
    i = torch.arange(Tq, device=device).view(1, Tq)
    kl = (kv_lengths.to(device).view(-1, 1).clamp(0, Tk) if kv_lengths is not None
          else torch.full((1, 1), Tk, device=device))
    lo = (i - window).clamp_min(0) if window >= 0 else torch.zeros_like(i)
    hi = kl - 1
    if window >= 0:
        hi = torch.minimum(hi, i + window)
    if causal:
        hi = torch.minimum(hi, i)
    return (lo > hi)[:, None, :, None]


def softmax_fused(route: SoftmaxRoute, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                  bias: Optional[Tensor], q_lengths: Optional[Tensor], kv_lengths: Optional[Tensor],
                  qk_scale: float, pre_scale: float, window: int, causal: bool, masked_rows: str) -> Tensor:
    """Softmax GDPA through ``route`` ("triton" or "sdpa"); same contract as the reference
    (:func:`recopt.ops.gdpa.gdpa`'s softmax mode), masked rows included."""
    if route.backend == "sdpa":
        if k.shape[1] != q.shape[1]:
            k, v = R._expand_kv_heads(k, q.shape[1]), R._expand_kv_heads(v, q.shape[1])
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=pre_scale)
        return (o * qk_scale if qk_scale != 1.0 else o).to(q.dtype)
    if route.backend != "triton":
        raise ValueError(f"softmax_fused serves the triton and sdpa routes, not {route.backend!r}")
    Tq, Tk = q.shape[2], k.shape[2]
    add = bias
    bool_mask = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bool_mask = attn_mask
            zero = torch.zeros((), dtype=q.dtype, device=q.device)
            as_bias = torch.where(attn_mask, zero, torch.full_like(zero, float("-inf")))
            add = as_bias if add is None else add + as_bias
        else:
            add = attn_mask if add is None else add + attn_mask
    # NaN for rows the float masks empty (a model's own softmax), unless only the bool mask can
    fill_rows = masked_rows != "zero"
    dead_nan = fill_rows and bool_mask is None and add is not None
    o, _, _ = torch.ops.recopt.gdpa_softmax(q, k, v, q_lengths, kv_lengths, add, float(qk_scale),
                                            float(pre_scale), int(window), bool(causal), dead_nan)
    if not fill_rows:
        return o
    dead = _rows_without_keys(Tq, Tk, kv_lengths, window, causal, q.device)
    if bool_mask is not None:
        none_kept = ~bool_mask.any(dim=-1, keepdim=True)
        dead = none_kept if dead is None else dead | none_kept
    if dead is None:
        return o
    if q_lengths is not None:
        dead = dead & R._q_row_mask(Tq, q_lengths, q.device)
    ve = R._expand_kv_heads(v, q.shape[1])
    fill = ve.mean(dim=-2, keepdim=True).to(o.dtype)
    if masked_rows == "nan":
        fill = fill * torch.where(dead, float("nan"), 0.0).to(o.dtype)
    return torch.where(dead, fill * qk_scale if qk_scale != 1.0 else fill, o)


def softmax_jagged_route(q: Tensor, k: Tensor, v: Tensor) -> SoftmaxRoute:
    """The route of a jagged softmax call (``gdpa_jagged(..., activation="softmax")``): the
    kernels on CUDA (or forced), else the reference (padding, :func:`R.gdpa_jagged_ref`)."""
    choice = os.environ.get(BACKEND_ENV, "auto").lower()
    if choice not in ("auto", "triton", "reference"):
        raise ValueError(f"{BACKEND_ENV}={choice!r}; use auto, triton or reference")
    if choice == "reference":
        return SoftmaxRoute("reference", f"{BACKEND_ENV}=reference")
    if not HAS_TRITON:
        return SoftmaxRoute("reference", "triton is not installed (the [gpu] extra): the reference runs")
    if not (q.dtype in _DTYPES and q.dtype == k.dtype == v.dtype):
        return SoftmaxRoute("reference", f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}: the kernels "
                                         f"take one of {_DTYPES}")
    if choice == "auto" and not q.is_cuda:
        return SoftmaxRoute("reference", "CPU tensors: the reference runs (padded)")
    if _head_dim_reason(q, v):
        return SoftmaxRoute("reference", _head_dim_reason(q, v))
    if choice == "auto" and torch.compiler.is_exporting():
        return SoftmaxRoute("reference", "exporting: the reference's plain ops are what an exported "
                                         "program can hold")
    return SoftmaxRoute("triton", "fused online-softmax Triton kernel on jagged values (O(T) memory)")


def softmax_jagged_fused(q, k, v, q_offsets, kv_offsets, max_seq_len_q: int, max_seq_len_kv: int,
                         qk_scale: float, pre_scale: float, window: int) -> Tensor:
    """Jagged softmax GDPA through the kernels; rows with no kept key give 0 (the reference's
    ``masked_rows="zero"``)."""
    o, _, _ = torch.ops.recopt.gdpa_softmax_jagged(q, k, v, q_offsets, kv_offsets, int(max_seq_len_q),
                                                   int(max_seq_len_kv), float(qk_scale), float(pre_scale),
                                                   int(window))
    return o
