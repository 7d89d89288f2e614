"""Launching the GDPA Triton kernels: layouts, block sizes, grids.

Imported only when triton is importable. Every function takes tensors in the
op's layout (dense ``[B, H, T, d]`` or jagged ``[N, H, d]``) and allocates its
outputs, or fills ``out=`` tensors given by a test (poisoned-output checks).
The kernels are launched through ``torch.library.wrap_triton`` so that, inside
a ``torch.library.triton_op``, Inductor sees and compiles them.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
from torch.library import wrap_triton

from recopt.kernels.gdpa import gdpa_bwd_dkdv_kernel, gdpa_bwd_dq_kernel, gdpa_fwd_kernel

from .gdpa_ref import ACTIVATIONS


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _fix_interpreter_scalar_index() -> None:
    """Work around triton 3.6's CPU interpreter with numpy >= 2.3.

    The interpreter holds scalars as 1-element arrays and turns them into loop
    bounds with ``int(array)``, which numpy 2.3+ rejects for arrays of ndim > 0;
    any loop with a runtime bound (``range(lo, hi)``) then fails. Patch that one
    conversion, inside the interpreter's own patch scope (so it is undone after
    each launch). No effect on GPU compilation.
    """
    import triton.runtime.interpreter as interp

    if getattr(interp, "_recopt_scalar_index_fix", False):
        return
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched
    interp._recopt_scalar_index_fix = True


if interpreting():
    _fix_interpreter_scalar_index()


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def _fwd_config(d: int, dv: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward."""
    if interpreting():
        return 16, 16, 1, 1
    big = max(d, dv) >= 128
    return 128, (64 if big else 64), (8 if big else 4), 3


def _bwd_config(d: int, dv: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for both backward kernels.

    dK/dV keeps a BLOCK_N x d tile of K, V, dK, dV in registers and walks
    queries in BLOCK_M steps; dQ keeps BLOCK_M x d and walks keys.
    """
    if interpreting():
        return 16, 16, 1, 1
    big = max(d, dv) >= 128
    return (64, 64, 8, 2) if big else (64, 64, 4, 3)


def _strides(t: torch.Tensor, jagged: bool):
    """(stride_b, stride_t, stride_h, stride_d) of a dense 4-D or jagged 3-D tensor."""
    if jagged:
        return 0, t.stride(0), t.stride(1), t.stride(2)
    return t.stride(0), t.stride(2), t.stride(1), t.stride(3)


def _geometry(q, k, v, jagged, max_q, max_k):
    if jagged:
        B = None
        H, D = q.shape[1], q.shape[2]
        Hkv, DV = k.shape[1], v.shape[2]
        T_Q, T_K = max_q, max_k
    else:
        B, H, T_Q, D = q.shape
        Hkv, T_K, DV = k.shape[1], k.shape[2], v.shape[3]
    if H % Hkv:
        raise ValueError(f"GDPA: query heads H={H} must be a multiple of K/V heads Hkv={Hkv}")
    return B, H, Hkv, T_Q, T_K, D, DV


def _common(q, q_off, k_off, q_len, k_len, window, T_Q, T_K, activation):
    dummy = q
    win = -1 if window is None or window < 0 else min(int(window), max(T_Q, T_K) + 1)
    return dict(
        QOFF=q_off if q_off is not None else dummy,
        KOFF=k_off if k_off is not None else dummy,
        QLEN=q_len if q_len is not None else dummy,
        KLEN=k_len if k_len is not None else dummy,
        window=max(win, 0),
        ACT=ACTIVATIONS[activation],
        JAGGED=q_off is not None,
        HAS_QLEN=q_len is not None,
        HAS_KLEN=k_len is not None,
        HAS_WINDOW=win >= 0,
        DOT_FP32=interpreting() or q.dtype == torch.float32,
    )


def gdpa_fwd(
    q, k, v, *, activation: str, qk_scale: float, pre_scale: float, window: int,
    q_lengths=None, kv_lengths=None, q_offsets=None, kv_offsets=None,
    max_seq_len_q: Optional[int] = None, max_seq_len_kv: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Forward. Dense when offsets are None (lengths optional), jagged otherwise."""
    jagged = q_offsets is not None
    B, H, Hkv, T_Q, T_K, D, DV = _geometry(q, k, v, jagged, max_seq_len_q, max_seq_len_kv)
    nb = q_offsets.shape[0] - 1 if jagged else B
    if out is None:
        shape = (q.shape[0], H, DV) if jagged else (B, H, T_Q, DV)
        out = torch.empty(shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0 or nb == 0 or T_Q == 0:
        return out.zero_() if not jagged else out
    BLOCK_M, BLOCK_N, warps, stages = _fwd_config(D, DV)
    grid = (triton.cdiv(T_Q, BLOCK_M), nb * H)
    c = _common(q, q_offsets, kv_offsets, q_lengths, kv_lengths, window, T_Q, T_K, activation)
    wrap_triton(gdpa_fwd_kernel)[grid](
        q, k, v, out, c["QOFF"], c["KOFF"], c["QLEN"], c["KLEN"],
        *_strides(q, jagged), *_strides(k, jagged), *_strides(v, jagged), *_strides(out, jagged),
        H, H // Hkv, T_Q, T_K, D, DV,
        float(qk_scale), float(pre_scale), c["window"],
        ACT=c["ACT"], JAGGED=c["JAGGED"], HAS_QLEN=c["HAS_QLEN"], HAS_KLEN=c["HAS_KLEN"],
        HAS_WINDOW=c["HAS_WINDOW"], DOT_FP32=c["DOT_FP32"],
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV),
        num_warps=warps, num_stages=stages,
    )
    return out


def gdpa_bwd(
    grad_out, q, k, v, *, activation: str, qk_scale: float, pre_scale: float, window: int,
    q_lengths=None, kv_lengths=None, q_offsets=None, kv_offsets=None,
    max_seq_len_q: Optional[int] = None, max_seq_len_kv: Optional[int] = None,
    out: Optional[tuple] = None,
):
    """Backward: ``(dq, dk, dv)`` shaped like ``q, k, v`` (GQA heads summed, no atomics)."""
    jagged = q_offsets is not None
    B, H, Hkv, T_Q, T_K, D, DV = _geometry(q, k, v, jagged, max_seq_len_q, max_seq_len_kv)
    nb = q_offsets.shape[0] - 1 if jagged else B
    if out is None:
        # dq is dense even if q was a stride-0 broadcast: autograd sums it.
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    else:
        dq, dk, dv = out
    if nb == 0 or (T_Q == 0 and T_K == 0):
        return dq.zero_(), dk.zero_(), dv.zero_()
    go = grad_out
    BLOCK_M, BLOCK_N, warps, stages = _bwd_config(D, DV)
    c = _common(q, q_offsets, kv_offsets, q_lengths, kv_lengths, window, T_Q, T_K, activation)
    meta = dict(
        ACT=c["ACT"], JAGGED=c["JAGGED"], HAS_QLEN=c["HAS_QLEN"], HAS_KLEN=c["HAS_KLEN"],
        HAS_WINDOW=c["HAS_WINDOW"], DOT_FP32=c["DOT_FP32"],
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV),
        num_warps=warps, num_stages=stages,
    )
    scal = (H, H // Hkv, T_Q, T_K, D, DV, float(qk_scale), float(pre_scale), c["window"])
    if T_K > 0 and dk.numel() > 0:
        wrap_triton(gdpa_bwd_dkdv_kernel)[(triton.cdiv(T_K, BLOCK_N), nb * Hkv)](
            q, k, v, go, dk, dv, c["QOFF"], c["KOFF"], c["QLEN"], c["KLEN"],
            *_strides(q, jagged), *_strides(k, jagged), *_strides(v, jagged), *_strides(go, jagged),
            *_strides(dk, jagged), *_strides(dv, jagged),
            *scal, **meta,
        )
    else:
        dk.zero_(), dv.zero_()
    if T_Q > 0 and dq.numel() > 0:
        wrap_triton(gdpa_bwd_dq_kernel)[(triton.cdiv(T_Q, BLOCK_M), nb * H)](
            q, k, v, go, dq, c["QOFF"], c["KOFF"], c["QLEN"], c["KLEN"],
            *_strides(q, jagged), *_strides(k, jagged), *_strides(v, jagged), *_strides(go, jagged),
            *_strides(dq, jagged),
            *scal, **meta,
        )
    else:
        dq.zero_()
    return dq, dk, dv
