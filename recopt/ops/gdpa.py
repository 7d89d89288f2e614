"""GDPA as a custom op: ``torch.ops.recopt.gdpa`` (dense) and ``torch.ops.recopt.gdpa_jagged``.

Public entry points are :func:`gdpa` and :func:`gdpa_jagged`; see
:mod:`recopt.ops.gdpa_ref` for the exact semantics. Each op has

- a reference implementation (plain PyTorch, any device) — the fallback;
- Triton kernels (forward, and a backward that recomputes the scores: one launch
  with atomic dQ, or two launches when deterministic algorithms are on or a
  small grid favours them — :func:`recopt.ops._gdpa_triton.bwd_choice`), used when
  triton is importable and the tensors are on CUDA, or when forced with
  ``RECOPT_GDPA_BACKEND=triton`` (CPU tests under ``TRITON_INTERPRET=1``);
  ``RECOPT_GDPA_BACKEND=reference`` forces the reference;
- a fake (meta) implementation, autograd (via ``recopt::gdpa_backward`` /
  ``recopt::gdpa_jagged_backward``) and a FLOP formula for
  ``torch.utils.flop_counter``.

When triton is importable the ops are ``torch.library.triton_op``s, so
``torch.compile`` sees the kernels (no graph break, Inductor can schedule
them); otherwise they are plain ``custom_op``s.

``activation="softmax"`` is accepted everywhere; :func:`gdpa` routes it to
``F.scaled_dot_product_attention`` (flash on GPU) without going through the
custom op, so every attention form has one entry point.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import gdpa_ref as R
from .gdpa_cpu import gdpa_cpu, gdpa_jagged_cpu, use_lean
from .gdpa_softmax import (note_route, softmax_fused, softmax_jagged_fused, softmax_jagged_route,
                           softmax_route)

# triton is optional: the reference works with torch alone. Only its absence is caught; an
# error inside our own launcher module must fail loudly, not route every call to the reference.
try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - exercised on installs without triton
    _T = None
    HAS_TRITON = False
else:
    from . import _gdpa_triton as _T

    HAS_TRITON = True

BACKEND_ENV = "RECOPT_GDPA_BACKEND"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def backend_for(q: Tensor, k: Tensor, v: Tensor, activation: str, causal: bool = False,
                bias: Optional[Tensor] = None) -> str:
    """``"triton"`` or ``"reference"``: which implementation runs for these inputs.

    ``causal`` and an additive ``bias`` (with its gradient) run in the Triton
    kernels; :func:`reference_reason` names any feature that would send a call
    to the reference on every device (none today), and the gdpa pass reports it.
    """
    choice = os.environ.get(BACKEND_ENV, "auto").lower()
    if choice not in ("auto", "triton", "reference"):
        raise ValueError(f"{BACKEND_ENV}={choice!r}; use auto, triton or reference")
    if choice == "reference" or activation == R.SOFTMAX or reference_reason(causal, bias):
        return "reference"
    usable = (
        HAS_TRITON
        and q.dtype in _TRITON_DTYPES
        and q.dtype == k.dtype == v.dtype
    )
    if choice == "triton":
        if not HAS_TRITON:
            raise RuntimeError(
                f"{BACKEND_ENV}=triton but triton is not importable; install the [gpu] extra"
            )
        if not usable:
            raise RuntimeError(
                f"{BACKEND_ENV}=triton needs q, k, v of one dtype among {_TRITON_DTYPES}, got "
                f"{q.dtype}, {k.dtype}, {v.dtype}"
            )
        return "triton"
    return "triton" if usable and q.is_cuda else "reference"


def reference_reason(causal: bool, bias: Optional[Tensor]) -> Optional[str]:
    """Why a call with these features runs the reference whatever the device, or None.

    None for every pointwise call: the Triton kernels implement causal masks
    (fully masked tiles skipped) and an additive bias, forward and backward
    (dbias included). A bias that is not a 4-D tensor is rejected by the op.
    """
    return None


def backward_note() -> str:
    """What the gdpa pass reports (detail ``backward``) for a pointwise site: the Triton
    backward is chosen per call (the batch is symbolic at optimize time)."""
    return ("Triton: one launch with atomic fp32 dQ (5 GEMM-units per score element) or two launches "
            "(dK/dV, then dQ: 7, no atomics), chosen per call by recopt.ops._gdpa_triton.bwd_choice; two "
            "launches under torch.use_deterministic_algorithms; RECOPT_GDPA_BWD=fused|two_launch forces one; "
            "eager choices counted in recopt.ops._gdpa_triton.BACKWARD_COUNTS")


def _bias4(bias: Optional[Tensor]) -> Optional[Tensor]:
    """A bias of fewer than 4 dims as a 4-D view (leading size-1 dims), as the kernels take it."""
    return bias if bias is None or bias.dim() == 4 else bias[(None,) * (4 - bias.dim())]


def _define(name: str):
    """Decorator: a triton_op when triton is importable, else a custom_op with a fake."""

    def deco(fn):
        if HAS_TRITON:
            return torch.library.triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)  # fn is shape-only-safe on fake tensors (reference path)
        return op

    return deco


# ----------------------------------------------------------------------------- dense


def _check_dense(q, k, v, q_lengths, kv_lengths):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "recopt.gdpa expects q [B,H,Tq,d], k [B,Hkv,Tk,d], v [B,Hkv,Tk,dv]; got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} (use gdpa_jagged for [N,H,d])"
        )
    B, H, _, d = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]} "
                         "(for one query shared by the batch, pass broadcast_q=True to gdpa())")
    if k.shape[3] != d:
        raise ValueError(f"q and k head dims differ: {d} vs {k.shape[3]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree on heads and length")
    if H % k.shape[1]:
        raise ValueError(f"GQA needs H % Hkv == 0, got H={H}, Hkv={k.shape[1]}")


@_define("recopt::gdpa")
def _gdpa_op(
    q: Tensor, k: Tensor, v: Tensor,
    q_lengths: Optional[Tensor], kv_lengths: Optional[Tensor],
    activation: str, qk_scale: float, pre_scale: float, window: int,
    causal: bool = False, bias: Optional[Tensor] = None,
) -> Tensor:
    if backend_for(q, k, v, activation, causal, bias) == "triton":
        return _T.gdpa_fwd(q, k, v, activation=activation, qk_scale=qk_scale,
                           pre_scale=pre_scale, window=window,
                           q_lengths=q_lengths, kv_lengths=kv_lengths, causal=causal, bias=_bias4(bias))
    return R.gdpa_ref(q, k, v, q_lengths, kv_lengths, activation, qk_scale, pre_scale, window,
                      causal, bias)


@_define("recopt::gdpa_backward")
def _gdpa_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
    q_lengths: Optional[Tensor], kv_lengths: Optional[Tensor],
    activation: str, qk_scale: float, pre_scale: float, window: int,
    causal: bool = False, bias: Optional[Tensor] = None, bias_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dbias)``; ``dbias`` is an empty tensor when ``bias`` is None or
    ``bias_grad`` is false (autograd passes ``ctx.needs_input_grad`` of the bias: a bias
    that does not require grad costs no dbias stores or atomics in the kernels).

    The Triton backward is the one-launch kernel (atomic dQ) or the two launches, chosen
    per call by :func:`recopt.ops._gdpa_triton.bwd_choice` (two launches under
    ``torch.use_deterministic_algorithms``); eager choices are counted in
    :data:`recopt.ops._gdpa_triton.BACKWARD_COUNTS`."""
    want_db = bias is not None and bias_grad
    if backend_for(q, k, v, activation, causal, bias) == "triton":
        grads = _T.gdpa_bwd(grad_out.contiguous(), q, k, v, activation=activation,
                            qk_scale=qk_scale, pre_scale=pre_scale, window=window,
                            q_lengths=q_lengths, kv_lengths=kv_lengths, causal=causal, bias=_bias4(bias),
                            bias_grad=want_db)
        return grads[0], grads[1], grads[2], (grads[3].view(bias.shape) if want_db else q.new_empty(0))
    grads = R.gdpa_bwd_ref(grad_out, q, k, v, q_lengths, kv_lengths, activation,
                           qk_scale, pre_scale, window, causal, bias)
    dbias = grads[3].contiguous() if want_db else q.new_empty(0)
    return grads[0].contiguous(), grads[1].contiguous(), grads[2].contiguous(), dbias


def _setup_dense(ctx, inputs, output):
    q, k, v, q_lengths, kv_lengths, activation, qk_scale, pre_scale, window, causal, bias = inputs
    ctx.save_for_backward(q, k, v, q_lengths, kv_lengths, bias)
    ctx.args = (activation, qk_scale, pre_scale, window, causal)


def _backward_dense(ctx, grad_out):
    q, k, v, q_lengths, kv_lengths, bias = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[10]
    dq, dk, dv, dbias = torch.ops.recopt.gdpa_backward(grad_out, q, k, v, q_lengths, kv_lengths,
                                                       *ctx.args, bias, bias_grad)
    return dq, dk, dv, None, None, None, None, None, None, None, (dbias if bias_grad else None)


_gdpa_op.register_autograd(_backward_dense, setup_context=_setup_dense)


# ----------------------------------------------------------------------------- jagged


@_define("recopt::gdpa_jagged")
def _gdpa_jagged_op(
    q: Tensor, k: Tensor, v: Tensor, q_offsets: Tensor, kv_offsets: Tensor,
    max_seq_len_q: int, max_seq_len_kv: int,
    activation: str, qk_scale: float, pre_scale: float, window: int,
) -> Tensor:
    if backend_for(q, k, v, activation) == "triton":
        return _T.gdpa_fwd(q, k, v, activation=activation, qk_scale=qk_scale,
                           pre_scale=pre_scale, window=window,
                           q_offsets=q_offsets, kv_offsets=kv_offsets,
                           max_seq_len_q=max_seq_len_q, max_seq_len_kv=max_seq_len_kv)
    return R.gdpa_jagged_ref(q, k, v, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv,
                             activation, qk_scale, pre_scale, window)


@_define("recopt::gdpa_jagged_backward")
def _gdpa_jagged_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, q_offsets: Tensor, kv_offsets: Tensor,
    max_seq_len_q: int, max_seq_len_kv: int,
    activation: str, qk_scale: float, pre_scale: float, window: int,
) -> tuple[Tensor, Tensor, Tensor]:
    if backend_for(q, k, v, activation) == "triton":
        return _T.gdpa_bwd(grad_out.contiguous(), q, k, v, activation=activation,
                           qk_scale=qk_scale, pre_scale=pre_scale, window=window,
                           q_offsets=q_offsets, kv_offsets=kv_offsets,
                           max_seq_len_q=max_seq_len_q, max_seq_len_kv=max_seq_len_kv)
    q_len = (q_offsets[1:] - q_offsets[:-1]).to(torch.long)
    kv_len = (kv_offsets[1:] - kv_offsets[:-1]).to(torch.long)
    pad = R.jagged_to_padded
    qp = pad(q, q_offsets, max_seq_len_q).transpose(1, 2)
    kp = pad(k, kv_offsets, max_seq_len_kv).transpose(1, 2)
    vp = pad(v, kv_offsets, max_seq_len_kv).transpose(1, 2)
    gp = pad(grad_out, q_offsets, max_seq_len_q).transpose(1, 2)
    dq, dk, dv = R.gdpa_bwd_ref(gp, qp, kp, vp, q_len, kv_len, activation, qk_scale,
                                pre_scale, window)[:3]
    unpad = R.padded_to_jagged
    return (unpad(dq.transpose(1, 2), q_offsets, q.shape[0]).contiguous(),
            unpad(dk.transpose(1, 2), kv_offsets, k.shape[0]).contiguous(),
            unpad(dv.transpose(1, 2), kv_offsets, v.shape[0]).contiguous())


def _setup_jagged(ctx, inputs, output):
    q, k, v, q_offsets, kv_offsets, *rest = inputs
    ctx.save_for_backward(q, k, v, q_offsets, kv_offsets)
    ctx.args = tuple(rest)


def _backward_jagged(ctx, grad_out):
    q, k, v, q_offsets, kv_offsets = ctx.saved_tensors
    dq, dk, dv = torch.ops.recopt.gdpa_jagged_backward(
        grad_out, q, k, v, q_offsets, kv_offsets, *ctx.args)
    return (dq, dk, dv) + (None,) * 8


_gdpa_jagged_op.register_autograd(_backward_jagged, setup_context=_setup_jagged)


# ----------------------------------------------------------------------------- FLOPs


def gdpa_flops(B: int, H: int, Tq: int, Tk: int, d: int, dv: int, backward: bool = False,
               bias: bool = False) -> int:
    """FLOPs of GDPA: 2·Tq·Tk·(d + dv) per head forward (+ Tq·Tk for an additive
    bias); the backward (which recomputes the scores) does 2.5× that. Causal
    and window masks are counted dense, like torch's own SDPA formula."""
    fwd = 2 * B * H * Tq * Tk * (d + dv) + (B * H * Tq * Tk if bias else 0)
    return int(fwd * 2.5) if backward else fwd


def _register_flops():
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.recopt.gdpa)
    def _fwd(q_shape, k_shape, v_shape, *args, out_shape=None, **kw):
        B, H, Tq, d = q_shape
        bias = (args[7] if len(args) > 7 else kw.get("bias")) is not None
        return gdpa_flops(B, H, Tq, k_shape[2], d, v_shape[3], bias=bias)

    @register_flop_formula(torch.ops.recopt.gdpa_backward)
    def _bwd(go_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kw):
        B, H, Tq, d = q_shape
        bias = (args[7] if len(args) > 7 else kw.get("bias")) is not None
        return gdpa_flops(B, H, Tq, k_shape[2], d, v_shape[3], backward=True, bias=bias)

    # Jagged: shapes only, so count every query row against the longest key
    # sequence (an upper bound; exact when the K/V side is dense, e.g. PFFN).
    @register_flop_formula(torch.ops.recopt.gdpa_jagged)
    def _jfwd(q_shape, k_shape, v_shape, qo, ko, max_q, max_k, *args, out_shape=None, **kw):
        return gdpa_flops(1, q_shape[1], q_shape[0], max_k, q_shape[2], v_shape[2])

    @register_flop_formula(torch.ops.recopt.gdpa_jagged_backward)
    def _jbwd(go, q_shape, k_shape, v_shape, qo, ko, max_q, max_k, *args, out_shape=None, **kw):
        return gdpa_flops(1, q_shape[1], q_shape[0], max_k, q_shape[2], v_shape[2], backward=True)


_register_flops()


# ----------------------------------------------------------------------------- public API


def _window_arg(window) -> int:
    if window is None:
        return -1
    w = int(window)
    if w < 0:
        raise ValueError(f"window must be >= 0 (or None for no window), got {window}")
    return w


def _broadcast_bh(q: Tensor, k: Tensor, v: Tensor):
    """Expand size-1 batch/head dims (stride 0, no copy) so q is [B,H,..] and k, v
    [B,Hkv,..] with H % Hkv == 0. A 1-sized K/V head dim stays 1 (GQA)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return q, k, v
    B = max(q.shape[0], k.shape[0], v.shape[0])
    if any(n == 0 for n in (q.shape[0], k.shape[0], v.shape[0])):
        B = 0   # torch's broadcasting: a size-1 batch takes the other size, 0 (an empty batch) included
    hk, hv = k.shape[1], v.shape[1]
    if hk != hv:
        hkv = max(hk, hv)
        k = k.expand(-1, hkv, -1, -1) if hk == 1 else k
        v = v.expand(-1, hkv, -1, -1) if hv == 1 else v
    hkv = k.shape[1]
    if q.shape[1] == 1 and hkv > 1:
        q = q.expand(-1, hkv, -1, -1)
    if q.shape[0] == 1 and B != 1:
        q = q.expand(B, -1, -1, -1)
    if k.shape[0] == 1 and B != 1:
        k = k.expand(B, -1, -1, -1)
    if v.shape[0] == 1 and B != 1:
        v = v.expand(B, -1, -1, -1)
    return q, k, v


def gdpa(
    q: Tensor, k: Tensor, v: Tensor, *,
    activation: str = "raw",
    qk_scale: float = 1.0,
    pre_scale: float = 1.0,
    window: Optional[int] = None,
    q_lengths: Optional[Tensor] = None,
    kv_lengths: Optional[Tensor] = None,
    broadcast_q: bool = False,
    attn_mask: Optional[Tensor] = None,
    causal: bool = False,
    bias: Optional[Tensor] = None,
    masked_rows: str = "zero",
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Generalized dot-product attention on dense (padded) tensors.

    ``o = act(pre_scale · q kᵀ + bias) · qk_scale · v`` with masked scores set to 0.

    Args:
        q: ``[B, H, Tq, d]``; with ``broadcast_q`` ``[H, Tq, d]`` or ``[1, H, Tq, d]``
            (one query shared by the batch: PMA/HSP seeds; read with stride 0).
            Size-1 batch or head dims of q, k, v broadcast (no copy).
        k: ``[B, Hkv, Tk, d]``, ``H % Hkv == 0`` (GQA). ``Tk`` may differ from ``Tq``.
        v: ``[B, Hkv, Tk, dv]``.
        activation: one of ``raw, gelu, gelu_tanh, silu, relu, relu_square,
            leaky_relu, hardswish`` (aliases accepted) or ``softmax``.
        qk_scale: multiplier after the activation (``/N`` of HSTU).
        pre_scale: multiplier of the scores before the activation (``1/sqrt(d)``).
        window: keep only ``|i - j| <= window`` (symmetric band); ``None`` = all.
        q_lengths, kv_lengths: ``[B]`` integer valid lengths; output rows past
            ``q_lengths`` are 0, keys past ``kv_lengths`` are ignored.
        attn_mask: softmax only: a bool keep-mask or additive float mask
            broadcastable to ``[B, H, Tq, Tk]`` (SDPA's convention).
        causal: keep only keys ``j <= i`` (top-left aligned, as SDPA's ``is_causal``).
        bias: additive score bias broadcastable to ``[B, H, Tq, Tk]`` (HSTU's
            relative attention bias), added after ``pre_scale`` and before the
            activation; differentiable (``dbias``).
        masked_rows: softmax only: what a query row with no kept key returns —
            ``"zero"``, ``"uniform"`` (mean of v: a model that fills masked
            scores with a finite value such as -1e9) or ``"nan"`` (a ``-inf``
            fill). Pointwise activations give 0 there (act(0) = 0).
        dropout_p, training: dropout on the activated scores (softmax: the
            probabilities), applied only when ``training`` is true — a fused
            graph passes its own ``self.training`` so ``.train()``/``.eval()``
            keep working. With dropout active the reference runs.

    Causal masks and a bias run in the Triton kernels too (on CUDA), the bias
    gradient included.

    Returns:
        ``[B, H, Tq, dv]`` in ``q.dtype``.
    """
    act = R.canonical_activation(activation)
    if broadcast_q:
        if q.dim() == 3:
            q = q.unsqueeze(0)
        if q.dim() != 4 or q.shape[0] != 1:
            raise ValueError(f"broadcast_q expects q [H,Tq,d] or [1,H,Tq,d], got {tuple(q.shape)}")
    q, k, v = _broadcast_bh(q, k, v)
    _check_dense(q, k, v, q_lengths, kv_lengths)
    w = _window_arg(window)
    if masked_rows not in R.MASKED_ROWS:
        raise ValueError(f"masked_rows must be one of {R.MASKED_ROWS}, got {masked_rows!r}")
    if bias is not None and bias.dim() > 4:
        raise ValueError(f"bias must broadcast to [B, H, Tq, Tk], got shape {tuple(bias.shape)}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    p_drop = float(dropout_p) if training else 0.0
    if act == R.SOFTMAX:
        return _softmax(q, k, v, attn_mask, bias, q_lengths, kv_lengths, qk_scale, pre_scale, w,
                        bool(causal), masked_rows, p_drop)
    if attn_mask is not None:
        raise ValueError(
            "attn_mask is only supported with activation='softmax'; pointwise GDPA supports "
            "q_lengths/kv_lengths, window and causal masks (zero masking) and an additive bias")
    if p_drop > 0.0:   # dropout is not in the op (nor its kernels): the reference, autograd
        return R.gdpa_ref(q, k, v, q_lengths, kv_lengths, act, float(qk_scale), float(pre_scale),
                          w, bool(causal), bias, dropout_p=p_drop)
    if use_lean(q) and not causal and bias is None:
        # CPU: plain aten ops, no custom-op dispatch (recopt.ops.gdpa_cpu); causal and a
        # bias are not in that path: they go through the op (reference)
        return gdpa_cpu(q, k, v, q_lengths, kv_lengths, act, float(qk_scale), float(pre_scale), w)
    return torch.ops.recopt.gdpa(q, k, v, q_lengths, kv_lengths, act, float(qk_scale),
                                 float(pre_scale), w, bool(causal), bias)


def _softmax(q, k, v, attn_mask, bias, q_lengths, kv_lengths, qk_scale, pre_scale, window,
             causal, masked_rows, dropout_p=0.0):
    """Softmax mode: the fused path where :func:`~recopt.ops.gdpa_softmax.softmax_route` says
    so (CUDA: Triton online softmax or SDPA flash); else one keep mask (lengths, window,
    causal, bool attn_mask) and one additive bias (float attn_mask + bias), then
    :func:`R.softmax_attention`."""
    route = note_route(softmax_route(q, k, v, attn_mask=attn_mask, bias=bias, q_lengths=q_lengths,
                                     kv_lengths=kv_lengths, window=window, causal=causal,
                                     masked_rows=masked_rows, dropout_p=dropout_p))
    if route.backend != "reference":
        return softmax_fused(route, q, k, v, attn_mask, bias, q_lengths, kv_lengths, qk_scale,
                             pre_scale, window, causal, masked_rows)
    Tq, Tk = q.shape[2], k.shape[2]
    keep = R._keep_mask(q.shape[0], Tq, Tk, None, kv_lengths, window, q.device, causal)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else attn_mask & keep
        else:
            bias = attn_mask if bias is None else bias + attn_mask
    if k.shape[1] != q.shape[1]:
        k = R._expand_kv_heads(k, q.shape[1])
        v = R._expand_kv_heads(v, q.shape[1])
    rows = R._q_row_mask(Tq, q_lengths, q.device)
    return R.softmax_attention(q, k, v, keep, rows, qk_scale, pre_scale, bias=bias,
                               masked_rows=masked_rows, dropout_p=dropout_p)


def gdpa_jagged(
    q: Tensor, k: Tensor, v: Tensor, q_offsets: Tensor, kv_offsets: Tensor,
    max_seq_len_q: Optional[int] = None, max_seq_len_kv: Optional[int] = None, *,
    activation: str = "raw", qk_scale: float = 1.0, pre_scale: float = 1.0,
    window: Optional[int] = None,
) -> Tensor:
    """GDPA on jagged tensors (TorchRec/FBGEMM layout).

    Args:
        q: ``[sum_b Tq_b, H, d]`` with ``q_offsets`` ``int[B+1]``.
        k, v: ``[sum_b Tk_b, Hkv, d|dv]`` with ``kv_offsets`` ``int[B+1]``
            (dense per-sample K/V such as 256 generated PFFN rows:
            ``kv_offsets = arange(B+1) * 256``).
        max_seq_len_q, max_seq_len_kv: bounds on the lengths (must not be
            smaller than the longest sequence); computed from the offsets
            (one host sync) when omitted.

    Returns:
        ``[sum_b Tq_b, H, dv]``.
    """
    act = R.canonical_activation(activation)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"gdpa_jagged expects values [N,H,d]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)} (use gdpa for padded [B,H,T,d])"
        )
    if q_offsets.shape != kv_offsets.shape:
        raise ValueError(f"q_offsets {tuple(q_offsets.shape)} and kv_offsets "
                         f"{tuple(kv_offsets.shape)} must both be [B+1]")
    if max_seq_len_q is None:
        max_seq_len_q = int((q_offsets[1:] - q_offsets[:-1]).max().item()) if q_offsets.numel() > 1 else 0
    if max_seq_len_kv is None:
        max_seq_len_kv = int((kv_offsets[1:] - kv_offsets[:-1]).max().item()) if kv_offsets.numel() > 1 else 0
    w = _window_arg(window)
    if act == R.SOFTMAX:
        if note_route(softmax_jagged_route(q, k, v)).backend == "triton":
            return softmax_jagged_fused(q, k, v, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv,
                                        qk_scale, pre_scale, w)
        return R.gdpa_jagged_ref(q, k, v, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv,
                                 act, qk_scale, pre_scale, w)
    if use_lean(q):  # CPU: plain aten ops, no custom-op dispatch (recopt.ops.gdpa_cpu)
        return gdpa_jagged_cpu(q, k, v, q_offsets, kv_offsets, int(max_seq_len_q), int(max_seq_len_kv),
                               act, float(qk_scale), float(pre_scale), w)
    return torch.ops.recopt.gdpa_jagged(q, k, v, q_offsets, kv_offsets, int(max_seq_len_q),
                                        int(max_seq_len_kv), act, float(qk_scale),
                                        float(pre_scale), w)
