"""Launching the softmax GDPA Triton kernels (:mod:`recopt.kernels.gdpa_softmax`).

Imported only when triton is importable. Layouts, strides, masks and the
flattened grid follow :mod:`recopt.ops._gdpa_triton` (whose helpers are
reused); this module adds the row statistics (``M``, ``L``: fp32, dense
``[B, H, T_Q]`` or jagged ``[H, N]``), the softmax configs and the
compile-check specs of the four kernels.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
from torch.library import wrap_triton

from recopt.kernels.gdpa_softmax import (
    gdpa_softmax_bwd_dkdv_kernel,
    gdpa_softmax_bwd_dq_kernel,
    gdpa_softmax_bwd_pre_kernel,
    gdpa_softmax_fwd_kernel,
)

from . import _gdpa_triton as G

# ----------------------------------------------------------------------------- configs
#
# (BLOCK_M, BLOCK_N, num_warps, num_stages), keyed on (T_Q, T_K, head dims, dtype, arch,
# heavy = masks/bias/jagged) and pruned by G's shared-memory estimate. Every config these
# functions can return is compiled for sm_90 and sm_100 by compile_specs below
# (tests/test_gdpa_softmax_compile.py) and must not spill.


def fwd_config(t_q: int, t_k: int, d: int, dv: int, dtype: torch.dtype, arch: int = 90,
               heavy: bool = False):
    """Forward config; 16 x 16 tiles and one warp under the CPU interpreter."""
    if G.interpreting():
        return 16, 16, 1, 1
    return _fwd_config_gpu(t_q, t_k, d, dv, dtype, arch, heavy)


def _fwd_config_gpu(t_q, t_k, d, dv, dtype, arch=90, heavy=False):
    bd, bdv = G._pow2(d), G._pow2(dv)
    big = max(bd, bdv)
    elt = 4 if dtype == torch.float32 else 2
    bm = 128 if t_q > 64 else 64
    # the online softmax keeps m, l and the rescaled accumulator live: 64-wide key tiles
    # (FlashAttention-2's choice on sm_90) except at small head sizes on the plain variant
    bn = 128 if (big <= 64 and t_k > 64 and not heavy and arch < 100) else 64
    if big >= 256:
        cands = [(bm, 32, 8 if bm == 128 else 4, 2), (64, 32, 4, 2), (64, 16, 4, 1)]
    elif big >= 128:
        cands = [(bm, bn, 8 if bm == 128 else 4, 2), (64, 64, 4, 2)]
    else:
        cands = [(bm, bn, 8 if bm == 128 else 4, 3), (64, 64, 4, 3), (64, 32, 4, 2)]
    if elt == 4:  # exact fp32 path (FMA dots): small tiles
        cands = [(min(c[0], 64), 16, 4, 2) for c in cands]
    if t_k <= 32:
        cands = [(c[0], min(c[1], 32), c[2], c[3]) for c in cands]
    return G._prune(cands, bd, bdv, elt)


def bwd_config(t_q: int, t_k: int, d: int, dv: int, dtype: torch.dtype, arch: int = 90,
               heavy: bool = False):
    """``(dkdv, dq)`` configs; one warpgroup per 64 rows of each GEMM's A operand."""
    if G.interpreting():
        return (16, 16, 1, 1), (16, 16, 1, 1)
    return _bwd_config_gpu(t_q, t_k, d, dv, dtype, arch, heavy)


def _bwd_config_gpu(t_q, t_k, d, dv, dtype, arch=90, heavy=False):
    bd, bdv = G._pow2(d), G._pow2(dv)
    big = max(bd, bdv)
    elt = 4 if dtype == torch.float32 else 2
    narrow = heavy or arch >= 100
    if big >= 256:
        # dK and dV in separate launches (dkdv_passes)
        dkdv, dq = [(16, 64, 4, 1)], [(64, 16, 4, 1)]
    elif big >= 128:
        dkdv = [(16 if narrow else 32, 64, 4, 2)]
        dq = [(64, 32, 4, 2)]
    else:
        dkdv = [(32 if narrow else 64, 64, 4, 3), (32, 64, 4, 2)]
        dq = [(64, 32 if narrow else 64, 4, 3), (64, 32, 4, 2)]
    if elt == 4:
        dkdv = [(16, 32, 4, 1)]
        dq = [(32, 16, 4, 1)]
    return G._prune(dkdv, bd, bdv, elt), G._prune(dq, bd, bdv, elt)


def dkdv_passes(d: int, dv: int) -> tuple:
    """(OUT_DK, OUT_DV) of each dK/dV launch (two launches at d = 256)."""
    return G.dkdv_passes(d, dv)


# ----------------------------------------------------------------------------- launchers


def _stats_strides(m: torch.Tensor, jagged: bool):
    """(stride_b, stride_t, stride_h) of a row-statistics tensor: dense [B, H, T], jagged [H, N]."""
    if jagged:
        return 0, m.stride(1), m.stride(0)
    return m.stride(0), m.stride(2), m.stride(1)


def _bias4d(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A bias broadcastable to [B, H, Tq, Tk] as a 4-D view (leading size-1 dims, no copy)."""
    if bias is None:
        return None
    if bias.dim() > 4:
        raise ValueError(f"softmax GDPA bias must broadcast to [B, H, Tq, Tk], got {tuple(bias.shape)}")
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    return bias


def _heavy(causal, bias, window, jagged) -> bool:
    return bool(causal) or bias is not None or (window is not None and window >= 0) or jagged


def softmax_fwd(
    q, k, v, *, qk_scale: float, pre_scale: float, window: int = -1,
    q_lengths=None, kv_lengths=None, q_offsets=None, kv_offsets=None,
    max_seq_len_q: Optional[int] = None, max_seq_len_kv: Optional[int] = None,
    causal: bool = False, causal_offset: int = 0, bias: Optional[torch.Tensor] = None,
    dead_nan: bool = False, out: Optional[torch.Tensor] = None,
):
    """Forward: ``(o, M, L)``. Dense when offsets are None (lengths optional), jagged otherwise.

    ``bias`` (additive; finite or -inf entries) broadcasts to ``[B, H, Tq, Tk]``.
    ``dead_nan``: rows with kept keys whose biased scores are all -inf give NaN (the
    ``masked_rows`` "nan"/"uniform" convention); otherwise every dead row gives 0.
    """
    jagged = q_offsets is not None
    B, H, Hkv, T_Q, T_K, D, DV = G._geometry(q, k, v, jagged, max_seq_len_q, max_seq_len_kv)
    nb = q_offsets.shape[0] - 1 if jagged else B
    if out is None:
        shape = (q.shape[0], H, DV) if jagged else (B, H, T_Q, DV)
        out = torch.empty(shape, dtype=q.dtype, device=q.device)
    st_shape = (H, q.shape[0]) if jagged else (B, H, T_Q)
    m = torch.empty(st_shape, dtype=torch.float32, device=q.device)
    lsum = torch.empty(st_shape, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or nb == 0 or T_Q == 0:
        if not jagged:
            out.zero_()
        return out, m.fill_(float("inf")), lsum.fill_(1.0)
    bias = _bias4d(bias)
    heavy = _heavy(causal, bias, window, jagged)
    BLOCK_M, BLOCK_N, warps, stages = fwd_config(T_Q, T_K, D, DV, q.dtype, G._arch(q.device), heavy)
    c = G._common(q, q_offsets, kv_offsets, q_lengths, kv_lengths, window, T_Q, T_K, "raw",
                  causal, causal_offset, bias, nb, H)
    wrap_triton(gdpa_softmax_fwd_kernel)[(triton.cdiv(T_Q, BLOCK_M) * nb * H,)](
        q, k, v, out, m, lsum, c["QOFF"], c["KOFF"], c["QLEN"], c["KLEN"], c["BIAS"],
        *G._strides(q, jagged), *G._strides(k, jagged), *G._strides(v, jagged), *G._strides(out, jagged),
        *_stats_strides(m, jagged), *c["bias_strides"],
        H, H // Hkv, T_Q, T_K, D, DV,
        float(qk_scale), float(pre_scale), c["window"], c["causal_off"],
        JAGGED=c["JAGGED"], HAS_QLEN=c["HAS_QLEN"], HAS_KLEN=c["HAS_KLEN"], HAS_WINDOW=c["HAS_WINDOW"],
        CAUSAL=c["CAUSAL"], HAS_BIAS=c["HAS_BIAS"], DEAD_NAN=bool(dead_nan), DOT_FP32=c["DOT_FP32"],
        EVEN_D=D == G._pow2(D) and DV == G._pow2(DV),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=G._pow2(D), BLOCK_DV=G._pow2(DV),
        num_warps=warps, num_stages=stages,
    )
    return out, m, lsum


def softmax_bwd(
    grad_out, q, k, v, o, m, lsum, *, qk_scale: float, pre_scale: float, window: int = -1,
    q_lengths=None, kv_lengths=None, q_offsets=None, kv_offsets=None,
    max_seq_len_q: Optional[int] = None, max_seq_len_kv: Optional[int] = None,
    causal: bool = False, causal_offset: int = 0, bias: Optional[torch.Tensor] = None,
    out: Optional[tuple] = None,
):
    """Backward: ``(dq, dk, dv)`` shaped like ``q, k, v`` (GQA heads summed, no atomics), from the
    forward's ``o``, ``M`` and ``L``. The bias gets no gradient here."""
    jagged = q_offsets is not None
    B, H, Hkv, T_Q, T_K, D, DV = G._geometry(q, k, v, jagged, max_seq_len_q, max_seq_len_kv)
    nb = q_offsets.shape[0] - 1 if jagged else B
    if out is None:
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    else:
        dq, dk, dv = out
    if nb == 0 or T_Q == 0 or T_K == 0 or q.shape[0] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    go = grad_out
    bias = _bias4d(bias)
    heavy = _heavy(causal, bias, window, jagged)
    arch = G._arch(q.device)
    cfg_dkdv, cfg_dq = bwd_config(T_Q, T_K, D, DV, q.dtype, arch, heavy)
    c = G._common(q, q_offsets, kv_offsets, q_lengths, kv_lengths, window, T_Q, T_K, "raw",
                  causal, causal_offset, bias, nb, H)
    flags = dict(JAGGED=c["JAGGED"], HAS_QLEN=c["HAS_QLEN"], HAS_KLEN=c["HAS_KLEN"],
                 HAS_WINDOW=c["HAS_WINDOW"], CAUSAL=c["CAUSAL"], HAS_BIAS=c["HAS_BIAS"],
                 DOT_FP32=c["DOT_FP32"], EVEN_D=D == G._pow2(D) and DV == G._pow2(DV))
    delta = torch.empty_like(m)
    st = _stats_strides(m, jagged)
    pre_m = 16 if G.interpreting() else 64
    wrap_triton(gdpa_softmax_bwd_pre_kernel)[(triton.cdiv(T_Q, pre_m) * nb * H,)](
        o, go, delta, *G._strides(o, jagged), *G._strides(go, jagged), *st,
        H, T_Q, DV, c["QOFF"], JAGGED=c["JAGGED"], BLOCK_M=pre_m, BLOCK_DV=G._pow2(DV),
        num_warps=1 if G.interpreting() else 4,
    )

    def meta(cfg):
        return dict(BLOCK_M=cfg[0], BLOCK_N=cfg[1], BLOCK_D=G._pow2(D), BLOCK_DV=G._pow2(DV),
                    num_warps=cfg[2], num_stages=cfg[3], **flags)

    scal = (H, H // Hkv, T_Q, T_K, D, DV, float(qk_scale), float(pre_scale), c["window"], c["causal_off"])
    if dk.numel() > 0:
        for out_dk, out_dv in dkdv_passes(D, DV):
            wrap_triton(gdpa_softmax_bwd_dkdv_kernel)[(triton.cdiv(T_K, cfg_dkdv[1]) * nb * Hkv,)](
                q, k, v, go, dk, dv, m, lsum, delta, c["QOFF"], c["KOFF"], c["QLEN"], c["KLEN"], c["BIAS"],
                *G._strides(q, jagged), *G._strides(k, jagged), *G._strides(v, jagged),
                *G._strides(go, jagged), *G._strides(dk, jagged), *G._strides(dv, jagged), *st,
                *c["bias_strides"], *scal, OUT_DK=out_dk, OUT_DV=out_dv, **meta(cfg_dkdv),
            )
    if dq.numel() > 0:
        wrap_triton(gdpa_softmax_bwd_dq_kernel)[(triton.cdiv(T_Q, cfg_dq[0]) * nb * H,)](
            q, k, v, go, dq, m, lsum, delta, c["QOFF"], c["KOFF"], c["QLEN"], c["KLEN"], c["BIAS"],
            *G._strides(q, jagged), *G._strides(k, jagged), *G._strides(v, jagged),
            *G._strides(go, jagged), *G._strides(dq, jagged), *st, *c["bias_strides"],
            *scal, **meta(cfg_dq),
        )
    return dq, dk, dv
