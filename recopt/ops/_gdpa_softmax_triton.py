"""Launching the softmax GDPA Triton kernels (:mod:`recopt.kernels.gdpa_softmax`).

Imported only when triton is importable. Layouts, strides, masks and the
flattened grid follow :mod:`recopt.ops._gdpa_triton` (whose helpers are
reused); this module adds the row statistics (``M``, ``1/L``: fp32, dense
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
from ._triton_spec import SpecBuilder

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
        # masks/bias at d = 256: 32-row tiles (64 x 32 spilled 40 B on sm_90)
        cands = [(32, 32, 4, 2)] if heavy else [(bm, 32, 8 if bm == 128 else 4, 2), (32, 32, 4, 2)]
    elif big >= 128:
        cands = [(bm, bn, 8 if bm == 128 else 4, 2), (64, 64, 4, 2)]
    else:
        cands = [(bm, bn, 8 if bm == 128 else 4, 3), (64, 64, 4, 3), (64, 32, 4, 2)]
    if elt == 4:  # exact fp32 path (FMA dots): small tiles (64 x 16 spilled 32 B); sm_90 at
        # d <= 32 three stages (two spilled 16 B causal); one stage spilled 8 B, so also at T_k <= 32
        cands = [(32, 16, 4, 3 if (arch < 100 and big <= 32) else 2)]
        return G._prune(cands, bd, bdv, elt)
    if t_k <= 32:
        # one key tile: nothing to pipeline, one stage — except sm_100's masked 64 x 32 at
        # d = 128, which spilled with one (48 B, jagged) and two (16 B) and not with three
        keep3 = arch >= 100 and heavy and big == 128
        cands = [(c[0], min(c[1], 32), c[2], 3 if (keep3 and c[0] == 64) else 1) for c in cands]
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
    if big >= 256:
        # dK and dV in separate launches (dkdv_passes); 16 x 16 / 16 x 32 tiles compile
        # without spills (16 x 64 dK/dV spilled 88-424 B, 64 x 16 dQ 384 B); sm_90's dK pass
        # needs three stages under a bias (one or two spilled 8 B)
        dkdv, dq = [(16, 16, 4, 3 if arch < 100 else 1)], [(16, 32, 4, 1)]
    elif big >= 128:
        # sm_90: 128 keys over two warpgroups (64 rows each): K, V, dK, dV stay in registers
        # unspilled (4 warps x 64 keys spills: the score, P, dP and dS tiles on top of them).
        # sm_100 accumulates in tensor memory: 64-row query steps on the plain variant (16 x
        # 128 costs ~3x the SASS per element), 16 x 64 under masks (16 x 128 spilled 8 B causal)
        if arch >= 100:
            dkdv = [(16, 64, 4, 2)] if heavy else [(64, 64, 4, 2)]
        else:
            dkdv = [(16, 128, 8, 2)]
        dq = [(64, 32, 4, 2)]
    else:
        # sm_100 plain: 64 x 64 (17 SASS instructions per element at d = 64, 16 x 128: 50);
        # under masks 16 x 128 (three stages at d = 16: two spilled 8 B)
        if arch >= 100:
            dkdv = [(16, 128, 8, 3 if big <= 16 else 2)] if heavy else [(64, 64, 4, 2)]
        else:
            dkdv = [(32, 128, 8, 2)]
        dq = [(64, 32 if (heavy or arch >= 100) else 64, 4, 3), (64, 32, 4, 2)]
    if elt == 4:  # exact fp32 path (FMA dots); 16 x 32 dK/dV spilled 32-40 B. Stages as ptxas
        # allows (each spilled 8-16 B in some variant otherwise): dK/dV two at d = 64, one at
        # d <= 32 on sm_90 (two: 16 B plain); on sm_100 at d = 32 dK/dV and dQ three (one: 8-16 B
        # jagged/bias, two: 8 B bias/causal)
        sm100_32 = arch >= 100 and big == 32
        dkdv = [(16, 16, 4, 3 if sm100_32 else (2 if big >= 64 else 1))]
        dq = [(32, 16, 4, 3 if sm100_32 else 1)]
    return G._prune(dkdv, bd, bdv, elt), G._prune(dq, bd, bdv, elt)


def pre_config(dv: int):
    """(BLOCK_M, num_warps) of the row-term kernel: 64 rows, 32 at d = 256 (64 x 256 of O and
    dO spilled 40-56 B), 16 rows on one warp under the CPU interpreter."""
    if G.interpreting():
        return 16, 1
    return _pre_config_gpu(dv)


def _pre_config_gpu(dv: int):
    return (32 if G._pow2(dv) >= 256 else 64), 4


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
    """Forward: ``(o, M, 1/L)``. Dense when offsets are None (lengths optional), jagged otherwise.

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
    l_inv = torch.empty(st_shape, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or nb == 0 or T_Q == 0:
        if not jagged:
            out.zero_()
        return out, m.fill_(float("inf")), l_inv.fill_(1.0)
    bias = _bias4d(bias)
    heavy = _heavy(causal, bias, window, jagged)
    BLOCK_M, BLOCK_N, warps, stages = fwd_config(T_Q, T_K, D, DV, q.dtype, G._arch(q.device), heavy)
    c = G._common(q, q_offsets, kv_offsets, q_lengths, kv_lengths, window, T_Q, T_K, "raw",
                  causal, causal_offset, bias, nb, H)
    wrap_triton(gdpa_softmax_fwd_kernel)[(triton.cdiv(T_Q, BLOCK_M) * nb * H,)](
        q, k, v, out, m, l_inv, c["QOFF"], c["KOFF"], c["QLEN"], c["KLEN"], c["BIAS"],
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
    return out, m, l_inv


def softmax_bwd(
    grad_out, q, k, v, o, m, l_inv, *, qk_scale: float, pre_scale: float, window: int = -1,
    q_lengths=None, kv_lengths=None, q_offsets=None, kv_offsets=None,
    max_seq_len_q: Optional[int] = None, max_seq_len_kv: Optional[int] = None,
    causal: bool = False, causal_offset: int = 0, bias: Optional[torch.Tensor] = None,
    out: Optional[tuple] = None,
):
    """Backward: ``(dq, dk, dv)`` shaped like ``q, k, v`` (GQA heads summed, no atomics), from the
    forward's ``o``, ``M`` and ``1/L``. The bias gets no gradient here."""
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
    pre_m, pre_warps = pre_config(DV)
    wrap_triton(gdpa_softmax_bwd_pre_kernel)[(triton.cdiv(T_Q, pre_m) * nb * H,)](
        o, go, delta, *G._strides(o, jagged), *G._strides(go, jagged), *st,
        H, T_Q, DV, c["QOFF"], JAGGED=c["JAGGED"], BLOCK_M=pre_m, BLOCK_DV=G._pow2(DV),
        num_warps=pre_warps,
    )

    def meta(cfg):
        return dict(BLOCK_M=cfg[0], BLOCK_N=cfg[1], BLOCK_D=G._pow2(D), BLOCK_DV=G._pow2(DV),
                    num_warps=cfg[2], num_stages=cfg[3], **flags)

    scal = (H, H // Hkv, T_Q, T_K, D, DV, float(qk_scale), float(pre_scale), c["window"], c["causal_off"])
    if dk.numel() > 0:
        for out_dk, out_dv in dkdv_passes(D, DV):
            wrap_triton(gdpa_softmax_bwd_dkdv_kernel)[(triton.cdiv(T_K, cfg_dkdv[1]) * nb * Hkv,)](
                q, k, v, go, dk, dv, m, l_inv, delta, c["QOFF"], c["KOFF"], c["QLEN"], c["KLEN"], c["BIAS"],
                *G._strides(q, jagged), *G._strides(k, jagged), *G._strides(v, jagged),
                *G._strides(go, jagged), *G._strides(dk, jagged), *G._strides(dv, jagged), *st,
                *c["bias_strides"], *scal, OUT_DK=out_dk, OUT_DV=out_dv, **meta(cfg_dkdv),
            )
    if dq.numel() > 0:
        wrap_triton(gdpa_softmax_bwd_dq_kernel)[(triton.cdiv(T_Q, cfg_dq[0]) * nb * H,)](
            q, k, v, go, dq, m, l_inv, delta, c["QOFF"], c["KOFF"], c["QLEN"], c["KLEN"], c["BIAS"],
            *G._strides(q, jagged), *G._strides(k, jagged), *G._strides(v, jagged),
            *G._strides(go, jagged), *G._strides(dq, jagged), *st, *c["bias_strides"],
            *scal, **meta(cfg_dq),
        )
    return dq, dk, dv


# ----------------------------------------------------------------------------- compile checks
#
# What recopt.kernels.compile_check compiles for the softmax kernels (provider
# "recopt.ops._gdpa_softmax_triton:compile_specs"): every config the functions above can
# return, over the head-size classes 16..256, typed as a launch with contiguous tensors
# specializes them (unit strides constexpr 1, pointers and other strides multiples of 16).

_KERNELS = {
    "fwd": ("gdpa_softmax_fwd_kernel", ("Q", "K", "V", "O"),
            ("sqb sqt sqh sqd", "skb skt skh skd", "svb svt svh svd", "sob sot soh sod")),
    "dkdv": ("gdpa_softmax_bwd_dkdv_kernel", ("Q", "K", "V", "DO", "DK", "DV_"),
             ("sqb sqt sqh sqd", "skb skt skh skd", "svb svt svh svd", "sdob sdot sdoh sdod",
              "sdkb sdkt sdkh sdkd", "sdvb sdvt sdvh sdvd")),
    "dq": ("gdpa_softmax_bwd_dq_kernel", ("Q", "K", "V", "DO", "DQ"),
           ("sqb sqt sqh sqd", "skb skt skh skd", "svb svt svh svd", "sdob sdot sdoh sdod",
            "sdqb sdqt sdqh sdqd")),
}

# variant name -> flags; GQA leaves GROUP a runtime int
VARIANTS = {
    "dense": dict(),
    "lengths": dict(HAS_QLEN=True, HAS_KLEN=True),
    "jagged": dict(JAGGED=True),
    "causal": dict(HAS_KLEN=True, CAUSAL=True),
    "window": dict(HAS_QLEN=True, HAS_KLEN=True, HAS_WINDOW=True),
    "bias": dict(HAS_BIAS=True, DEAD_NAN=True),
    "gqa": dict(GQA=True),
    "light": dict(HAS_QLEN=True, HAS_KLEN=True, GQA=True),
    "all": dict(JAGGED=True, HAS_WINDOW=True, CAUSAL=True, HAS_BIAS=True, DEAD_NAN=True, GQA=True),
}
HEAVY_VARIANTS = ("jagged", "causal", "window", "bias", "all")
# fp32 (FMA dots) runs these kernels up to this head size; recopt.ops.gdpa_softmax's route
# keeps the reference above it (the FMA tiles spill there)
FP32_MAX_D = 64


def _spec(kind: str, variant: str, d: int, dtype, cfg, outs=(True, True)):
    """The compile-check spec of one launch: kernel ``kind`` (pre, fwd, dkdv, dq), variant
    (:data:`VARIANTS`), head size, dtype, config and, for dkdv, the outputs ``(OUT_DK, OUT_DV)``."""
    flags = dict(JAGGED=False, HAS_QLEN=False, HAS_KLEN=False, HAS_WINDOW=False, CAUSAL=False,
                 HAS_BIAS=False, DEAD_NAN=False, GQA=False)
    flags.update(VARIANTS[variant])
    sb = SpecBuilder(dtype)
    if kind == "pre":
        sb.pointers(("O", "DO")).pointers(("DELTA",), "fp32").pointers(("QOFF",), "i64")
        sb.strides(("sob sot soh sod", "sdob sdot sdoh sdod"))
        sb.ints(("smb", "smh", "H", "T_Q", "DV")).constexprs(smt=1)
        bm, warps = cfg
        sb.constexprs(JAGGED=flags["JAGGED"], BLOCK_M=bm, BLOCK_DV=G._pow2(d))
        name = f"gdpa_softmax_pre/{variant}/{sb.ty}/d{d}/m{bm}w{warps}"
        tags = dict(family="gdpa_softmax", kernel="pre", variant=variant, dtype=sb.ty, d=d, BLOCK_M=bm,
                    num_warps=warps)
        return sb.build(name, "recopt.kernels.gdpa_softmax", "gdpa_softmax_bwd_pre_kernel", warps, 1, tags)
    attr, ptrs, stride_groups = _KERNELS[kind]
    sb.pointers(ptrs).pointers(("M", "L") + (("DELTA",) if kind != "fwd" else ()), "fp32")
    sb.pointers(("QOFF", "KOFF", "QLEN", "KLEN"), "i64").pointers(("BIAS",))
    sb.strides(stride_groups).ints(("smb", "smh")).constexprs(smt=1)
    sb.strides(("sbb sbh sbq sbk",)).attention_scalars(d, flags["GQA"])
    bm, bn, warps, stages = cfg
    sb.constexprs(JAGGED=flags["JAGGED"], HAS_QLEN=flags["HAS_QLEN"], HAS_KLEN=flags["HAS_KLEN"],
                  HAS_WINDOW=flags["HAS_WINDOW"], CAUSAL=flags["CAUSAL"], HAS_BIAS=flags["HAS_BIAS"],
                  DOT_FP32=dtype == torch.float32, EVEN_D=d == G._pow2(d),
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=G._pow2(d), BLOCK_DV=G._pow2(d))
    part = ""
    if kind == "fwd":
        sb.constexprs(DEAD_NAN=flags["DEAD_NAN"])
    if kind == "dkdv":
        sb.constexprs(OUT_DK=outs[0], OUT_DV=outs[1])
        part = {(True, True): "", (True, False): "[dk]", (False, True): "[dv]"}[tuple(outs)]
    name = f"gdpa_softmax_{kind}{part}/{variant}/{sb.ty}/d{d}/m{bm}n{bn}w{warps}s{stages}"
    tags = dict(family="gdpa_softmax", kernel=kind, variant=variant, dtype=sb.ty, d=d,
                BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return sb.build(name, "recopt.kernels.gdpa_softmax", attr, warps, stages, tags)


def launch_configs(kind: str, dtype, arch: int = 90) -> list:
    """Every (d, config, heavy) the launcher can pick for this kernel kind, dtype and arch."""
    out = []
    for d in G.HEAD_DIMS:
        for heavy in (False, True):
            for tq, tk in G._SHAPES:
                if kind == "fwd":
                    picked = _fwd_config_gpu(tq, tk, d, d, dtype, arch, heavy)
                else:
                    picked = _bwd_config_gpu(tq, tk, d, d, dtype, arch, heavy)[0 if kind == "dkdv" else 1]
                if (d, picked, heavy) not in out:
                    out.append((d, picked, heavy))
    return out


def compile_specs(level: str = "ci") -> list:
    """Specs for recopt.kernels.compile_check.

    ``ci`` (13 compiles, about 30 s on 2 idle cores): bf16, the configs the launcher picks
    for long sequences at d = 128 under masks (compiled with ``all``: jagged, window,
    causal, bias, NaN rows, GQA) and at d = 64 without (``light``: lengths + GQA; sm_90's
    dK/dV with ``all``), forward, dK/dV and dQ on sm_90 and sm_100, and the row-term kernel on
    sm_90; tests/test_kernel_compile.py fails on any spill. ``full``: every config at
    every head size 16..256, every variant, bf16 / fp16 (and fp32 at d <= 64: the route
    keeps the reference above), both archs (a ``slow`` test).
    """
    specs, seen = [], set()

    def add(kind, variant, d, dtype, cfg, arch):
        passes = dkdv_passes(d, d) if kind == "dkdv" else ((True, True),)
        for outs in passes:
            s = dataclasses.replace(_spec(kind, variant, d, dtype, cfg, outs), archs=(arch,))
            if (s.name, s.archs) not in seen:
                seen.add((s.name, s.archs))
                specs.append(s)

    for arch in (90, 100):
        if level == "full":
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                for kind in _KERNELS:
                    for d, cfg, heavy in launch_configs(kind, dtype, arch):
                        if dtype == torch.float32 and d > FP32_MAX_D:
                            continue   # never launched: softmax_route keeps the reference
                        for variant in VARIANTS:
                            if heavy == (variant in HEAVY_VARIANTS):
                                add(kind, variant, d, dtype, cfg, arch)
                for d in G.HEAD_DIMS:
                    for variant in ("dense", "jagged"):
                        add("pre", variant, d, dtype, _pre_config_gpu(d), arch)
            continue
        # ci: the long-sequence configs at d = 128 under masks and d = 64 without, bf16, each
        # compiled with the heaviest variant it serves
        bf16 = torch.bfloat16
        for kind in _KERNELS:
            # sm_90's d = 64 dK/dV serves both with one config (compiled with ``all``); sm_100
            # has a plain one (64 x 64) besides the masked d = 128 one
            for d, heavy in ((128, True), (64, kind == "dkdv" and arch < 100)):
                if kind == "fwd":
                    cfg = _fwd_config_gpu(1024, 1024, d, d, bf16, arch, heavy)
                else:
                    cfg = _bwd_config_gpu(1024, 1024, d, d, bf16, arch, heavy)[0 if kind == "dkdv" else 1]
                add(kind, "all" if heavy else "light", d, bf16, cfg, arch)
        if arch == 90:
            add("pre", "jagged", 128, bf16, _pre_config_gpu(128), arch)
    return specs
