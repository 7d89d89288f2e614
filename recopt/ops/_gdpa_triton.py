"""Launching the GDPA Triton kernels: layouts, block sizes, grids.

Imported only when triton is importable. Every function takes tensors in the
op's layout (dense ``[B, H, T, d]`` or jagged ``[N, H, d]``) and allocates its
outputs, or fills ``out=`` tensors given by a test (poisoned-output checks).
The kernels are launched through ``torch.library.wrap_triton`` so that, inside
a ``torch.library.triton_op``, Inductor sees and compiles them.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from typing import Optional

import torch
import triton
from torch.library import wrap_triton

from recopt.kernels.gdpa import (gdpa_bwd_dkdv_kernel, gdpa_bwd_dq_kernel, gdpa_bwd_fused_kernel,
                                 gdpa_fwd_kernel)

from ._triton_spec import TYPES, SpecBuilder
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


# ----------------------------------------------------------------------------- configs
#
# A config is (BLOCK_M, BLOCK_N, num_warps, num_stages). The choice is keyed on
# (T_Q, T_K, head dims, dtype, arch) and pruned by a shared-memory estimate so
# every head size from 16 to 256 fits; tests/test_kernel_compile.py compiles
# every config these functions can return for sm_90 and sm_100 and fails on
# spills or shared memory over the limit.

SMEM_LIMIT = 232448  # bytes per block, sm_90 and sm_100 (227 KB)


def _smem_estimate(bm: int, bn: int, bd: int, bdv: int, stages: int, elt: int) -> int:
    """Conservative shared-memory bytes of one program: Q (or K) tile resident, K/V
    (or Q/dO) tiles per pipeline stage, one score tile staged for the second GEMM."""
    return elt * (bm * bd + stages * bn * (bd + bdv) + bm * bn)


def smem_estimate(kind: str, bm: int, bn: int, bd: int, bdv: int, stages: int, elt: int) -> int:
    """Shared-memory bytes of one program of kernel ``kind`` (fwd, dkdv, dq): the resident
    tiles (fwd: Q; dkdv: K and V; dq: Q and dO), the streamed ones per pipeline stage (fwd:
    K, V; dkdv: Q, dO; dq: K, V) and one score tile staged for the second GEMM."""
    if kind == "dkdv":
        return elt * (bn * (bd + bdv) + stages * bm * (bd + bdv) + bm * bn)
    if kind == "dq":
        return elt * (bm * (bd + bdv) + stages * bn * (bd + bdv) + bm * bn)
    if kind == "fused":   # the dK/dV kernel's tiles, and dS staged a second time (for dS K)
        return elt * (bn * (bd + bdv) + stages * bm * (bd + bdv) + 2 * bm * bn)
    return _smem_estimate(bm, bn, bd, bdv, stages, elt)


def _prune(configs, bd: int, bdv: int, elt: int, kind: str = "fwd"):
    """Keep configs that fit shared memory (first one wins); the last resort always fits."""
    for bm, bn, w, st in configs:
        if smem_estimate(kind, bm, bn, bd, bdv, st, elt) <= SMEM_LIMIT:
            return bm, bn, w, st
    return configs[-1]


def _arch(device) -> int:
    """Compute capability as an int (90 for sm_90); 90 for CPU tensors."""
    if device is not None and getattr(device, "type", "cpu") == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def fwd_config(t_q: int, t_k: int, d: int, dv: int, dtype: torch.dtype, arch: int = 90,
               heavy: bool = False, act: str = ""):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward for this shape
    (16 x 16 tiles, one warp under the CPU interpreter). ``heavy``: jagged inputs, a
    bias, a causal or window mask (more live registers per score element). ``act``: the
    activation (sm_100 picks the tile width per activation, see ``_WIDE_ON_SM100``)."""
    if interpreting():
        return 16, 16, 1, 1
    return _fwd_config_gpu(t_q, t_k, d, dv, dtype, arch, heavy, act)


# Activations whose plain forward takes 128 x 128 score tiles on sm_100 too (the wider tile
# amortises the per-tile cost over twice the elements; gelu: 13.05 SASS instructions per
# element, budget 14). There ptxas holds the kernel to 128 registers, and gelu_tanh's
# (tanh.approx) 128 x 128 tile spills 40-48 B, so it keeps 128 x 64 (11.3, budget 13).
_WIDE_ON_SM100 = frozenset(ACTIVATIONS) - {"gelu_tanh"}


def _fwd_config_gpu(t_q, t_k, d, dv, dtype, arch=90, heavy=False, act=""):
    bd, bdv = _pow2(d), _pow2(dv)
    big = max(bd, bdv)
    elt = 4 if dtype == torch.float32 else 2
    bm = 128 if t_q > 64 else 64
    # 128 x 128 score tiles (64 elements per thread amortise the loop's fixed cost) only for the
    # plain variant on sm_90; masks, a bias, or sm_100's register allocation need narrower tiles
    wide = 128 if (t_k > 64 and not heavy and (arch < 100 or act in _WIDE_ON_SM100)) else 64
    if big >= 256:
        cands = [(bm, 32 if bm == 128 else 16, 8, 2), (64, 16, 4, 2)]
    elif big >= 128:
        cands = [(bm, wide, 8, 2), (bm, 64, 8, 2), (64, 64, 4, 2)]
    else:
        cands = [(bm, wide, 8, 2), (bm, 64, 4, 3), (64, 32, 4, 2)]
    if elt == 4:  # exact fp32 path (FMA dots, operands in registers): small tiles, 16 rows from d 128
        cands = [(min(c[0], 64 if big < 128 else 16), 16, 4, 2) for c in cands]
    if t_k <= 32:
        cands = [(c[0], min(c[1], 32), c[2], c[3]) for c in cands]
    # at most one warpgroup (4 warps) per 64 rows: more would split the score tile's columns
    # across warpgroups, each recomputing the whole tile
    cands = [(m, n, min(w, 4 * max(m // 64, 1)), st) for m, n, w, st in cands]
    return _prune(cands, bd, bdv, elt)


def bwd_config(t_q: int, t_k: int, d: int, dv: int, dtype: torch.dtype, arch: int = 90,
               heavy: bool = False):
    """``(dkdv, dq)`` configs, each (BLOCK_M, BLOCK_N, num_warps, num_stages).

    dK/dV keeps a BLOCK_N x d tile of K, V, dK, dV and walks queries in BLOCK_M
    steps; dQ keeps BLOCK_M x d and walks keys. The A operand of each score GEMM
    has 64 rows per warpgroup (4 warps for 64 rows), so warpgroups split rows
    and never compute the same score tile twice.
    """
    if interpreting():
        return (16, 16, 1, 1), (16, 16, 1, 1)
    return _bwd_config_gpu(t_q, t_k, d, dv, dtype, arch, heavy)


def _bwd_config_gpu(t_q, t_k, d, dv, dtype, arch=90, heavy=False):
    bd, bdv = _pow2(d), _pow2(dv)
    big = max(bd, bdv)
    elt = 4 if dtype == torch.float32 else 2
    narrow = heavy or arch >= 100
    if big >= 256:
        # dK and dV in separate launches (dkdv_passes): one 64 x 256 fp32 accumulator per
        # warpgroup, 128 registers a thread. sm_90: two warpgroups (128 keys, 128 queries for
        # dQ at any Tq) halve the per-thread share of each streamed tile, and two stages make
        # those loads cp.async; with one warpgroup or one stage they went through registers
        # and spilled (8-360 B, depending on the activation and variant)
        if arch >= 100:
            dkdv, dq = [(16, 64, 4, 1)], [(128, 16, 8, 1) if t_q > 64 else (64, 16, 4, 1)]
        else:
            dkdv, dq = [(16, 128, 8, 2)], [(128, 16, 8, 2)]
    elif big >= 128:
        # dK, dV accumulators are 128 registers/thread on sm_90 (wgmma accumulates in registers):
        # a narrow query step keeps it unspilled; sm_100 accumulates in tensor memory and takes
        # 64-row steps unless masks or a bias add live values
        dkdv = [(16 if heavy else (64 if arch >= 100 else 32), 64, 4, 2)]
        dq = [(128, 32 if narrow else 64, 8, 2) if t_q > 64 else (64, 32, 4, 2)]
    else:
        dkdv = [(32 if heavy else 64, 64, 4, 3), (32, 64, 4, 2)]
        dq = [(64, 32 if narrow else 64, 4, 3), (64, 32, 4, 2)]
    if elt == 4:  # exact fp32 path (FMA dots, operands in registers): small tiles, smaller from d 128
        dkdv = [(16, 32 if big < 128 else 16, 4, 1)]
        dq = [(32 if big < 256 else 16, 16, 4, 1)]
    return _prune(dkdv, bd, bdv, elt, "dkdv"), _prune(dq, bd, bdv, elt, "dq")


def dkdv_passes(d: int, dv: int) -> tuple:
    """(OUT_DK, OUT_DV) of each dK/dV launch: one launch for both, or (d >= 256) one each,
    since the two fp32 accumulators of 64 x 256 would not fit in registers."""
    if max(_pow2(d), _pow2(dv)) >= 256:
        return ((True, False), (False, True))
    return ((True, True),)


def fused_config(t_q: int, t_k: int, d: int, dv: int, dtype: torch.dtype, arch: int = 90,
                 heavy: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the one-launch backward
    (:func:`recopt.kernels.gdpa.gdpa_bwd_fused_kernel`): the dK/dV kernel's layout (keys as
    rows, BLOCK_N keys resident, BLOCK_M query steps) with room for the transient fp32
    ``BLOCK_M x d`` dQ tile it adds atomically."""
    if interpreting():
        return 16, 16, 1, 1
    return _fused_config_gpu(t_q, t_k, d, dv, dtype, arch, heavy)


def _fused_config_gpu(t_q, t_k, d, dv, dtype, arch=90, heavy=False):
    bd, bdv = _pow2(d), _pow2(dv)
    big = max(bd, bdv)
    elt = 4 if dtype == torch.float32 else 2
    if big >= 256:
        # two launches of the kernel (fused_passes): dK + dQ (+ dbias), then dV. Two warpgroups
        # (128 keys, 64 each) halve each thread's share of the streamed tiles. Plain: two stages
        # (181 KB; one stage spilled 64-280 B on sm_90); masks/bias/jagged: one stage (two
        # spilled 32 B on sm_90)
        cands = [(16, 128, 8, 1 if heavy else 2)]
    elif big >= 128:
        # dK, dV accumulators take 128 registers a thread; with one warpgroup (64 keys) the
        # stored bias gradient and silu/hardswish/leaky_relu spilled 8-56 B on sm_90. Two
        # warpgroups of 64 keys each: unspilled, and half the dQ atomics per score element.
        # Plain: 32-query steps (sm_90: 36 SASS instructions per element for gelu where 16-query
        # steps took 46; three stages, since silu spilled 24 B with two); masks/bias/jagged: 16
        if heavy:
            cands = [(16, 128, 8, 2)]
        else:
            cands = [(32, 128, 8, 3 if arch < 100 else 2)]
    else:
        # 32-row query steps (64 spilled 8-56 B for gelu, silu, gelu_tanh on sm_90 / sm_100);
        # sm_100 two stages (three: hardswish spilled 16 B)
        cands = [(32, 64, 4, 3 if arch < 100 else 2), (32, 64, 4, 2)]
    if elt == 4:
        # exact fp32 path (FMA dots, operands in registers): bwd_choice keeps fp32 on the two
        # launches (this kernel spilled 8-24 B on sm_100 at several head sizes); this config
        # serves an explicit kernel="fused" / RECOPT_GDPA_BWD=fused and the interpreter
        cands = [(16, 16, 4, 1)]
    return _prune(cands, bd, bdv, elt, "fused")


def fused_passes(d: int, dv: int) -> tuple:
    """(OUT_DK, OUT_DV, OUT_DQ) of each launch of the one-launch backward: one launch, or
    (d >= 256) dK with dQ (and the bias gradient) then dV, as :func:`dkdv_passes`."""
    if max(_pow2(d), _pow2(dv)) >= 256:
        return ((True, False, True), (False, True, False))
    return ((True, True, True),)


# GEMM-units per score element of each backward (a unit: one [BLOCK x BLOCK x d] GEMM over
# the score tile). Two-launch: dK/dV (S, dV, dP, dK) + dQ (S, dP, dQ); d = 256 splits dK
# and dV (S, dP, dK + S, dV). One-launch: S, dV, dP, dK, dQ; d = 256: (S, dP, dK, dQ) + (S, dV).
_UNITS_TWO = {False: 4 + 3, True: 3 + 2 + 3}
_UNITS_FUSED = {False: 5, True: 4 + 2}
# Predicted cost of the one-launch kernel's fp32 dQ atomics and of the final cast, in
# GEMM-units (d / BLOCK_N reductions per score element at L2). A model, not a measurement:
# no GPU was available when it was set.
ATOMIC_UNITS = 0.5
BACKWARD_ENV = "RECOPT_GDPA_BWD"
BWD_KERNELS = ("fused", "two_launch")
# (kernel, reason) -> calls, counted in eager mode (not inside torch.compile traces)
BACKWARD_COUNTS: Counter = Counter()


def _sm_count(device) -> int:
    """SMs of a CUDA device; 132 (H100 SXM) for CPU tensors (the interpreter)."""
    if device is not None and getattr(device, "type", "cpu") == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 132


def _size_hint(x, default: int = 4096) -> int:
    """A size as a plain int: a symbolic size's hint (no guard), ``default`` when it has none."""
    if isinstance(x, torch.SymInt):
        hint = x.node.hint
        return int(hint) if hint is not None else default
    return int(x)


def _waves_time(units: float, grid: int, slots: int) -> float:
    """Time (in units of one program-slot doing the whole work once) of ``grid`` programs
    sharing ``units`` of work on ``slots`` SMs: ceil(grid / slots) waves of units / grid."""
    return math.ceil(grid / slots) * units / grid if grid > 0 else 0.0


def bwd_choice(t_q: int, t_k: int, d: int, dv: int, nb: int, h: int, hkv: int, dtype: torch.dtype,
               arch: int = 90, heavy: bool = False, sms: int = 132,
               deterministic: Optional[bool] = None) -> tuple:
    """``(kernel, reason)``: which backward serves this call, ``"fused"`` (one launch, atomic
    dQ, 5 GEMM-units per score element) or ``"two_launch"`` (dK/dV then dQ, 7, no atomics).

    - two-launch when ``torch.are_deterministic_algorithms_enabled()`` (atomic dQ adds are
      not deterministic), or when ``RECOPT_GDPA_BWD=two_launch``, or for fp32 inputs (the
      exact FMA path, where the one-launch kernel is not spill-free);
    - otherwise the faster under a wave model: each launch costs ceil(grid / SMs) waves of
      (GEMM-units / grid). The one-launch grid has one program per key block of a K/V head;
      when it is small (tiny Tk, few heads and samples) its programs each walk all of Tq
      while the two-launch's dQ kernel spreads Tq over more programs, and the model picks
      the two launches. ``RECOPT_GDPA_BWD=fused`` forces the one launch.
    """
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    forced = os.environ.get(BACKWARD_ENV, "auto").lower()
    if forced not in ("auto",) + BWD_KERNELS:
        raise ValueError(f"{BACKWARD_ENV}={forced!r}; use auto, fused or two_launch")
    if deterministic:
        if forced == "fused":
            raise RuntimeError(f"{BACKWARD_ENV}=fused, but deterministic algorithms are enabled and the "
                               "one-launch GDPA backward adds dQ atomically; unset one of the two")
        return "two_launch", "deterministic algorithms enabled (atomic dQ adds are not deterministic)"
    if forced != "auto":
        return forced, f"{BACKWARD_ENV}={forced}"
    if dtype == torch.float32:
        return "two_launch", ("fp32 (exact FMA path): the one-launch kernel is not spill-free there "
                              "(8-24 B on sm_100)")
    # A speed choice, exact either way: under torch.compile with dynamic shapes decide on the
    # sizes' hints rather than guard (and recompile) on them
    t_q, t_k, nb = _size_hint(t_q), _size_hint(t_k), _size_hint(nb)
    big = max(_pow2(d), _pow2(dv)) >= 256
    (_, bn_kv, _, _), (bm_q, _, _, _) = (bwd_config(t_q, t_k, d, dv, dtype, arch, heavy))
    bn_f = fused_config(t_q, t_k, d, dv, dtype, arch, heavy)[1]
    g_kv = triton.cdiv(max(t_k, 1), bn_kv) * nb * hkv
    g_q = triton.cdiv(max(t_q, 1), bm_q) * nb * h
    g_f = triton.cdiv(max(t_k, 1), bn_f) * nb * hkv
    two = _waves_time(_UNITS_TWO[big] - 3, g_kv, sms) + _waves_time(3, g_q, sms)
    fused = _waves_time(_UNITS_FUSED[big] + ATOMIC_UNITS, g_f, sms)
    # reasons without the numbers, so BACKWARD_COUNTS has few keys
    if fused <= two:
        return "fused", "wave model: one launch predicted faster"
    return "two_launch", ("wave model: two launches predicted faster (the one-launch grid is small: few "
                          "key blocks x samples x K/V heads)")


def fast_math(dtype: torch.dtype) -> int:
    """FAST constexpr: 0 exact fp32 math (fp32 inputs), 2 fast math with tanh.approx on a
    GPU, 1 the same fast formulas without inline asm under the CPU interpreter."""
    if dtype == torch.float32:
        return 0
    return 1 if interpreting() else 2


def _strides(t: torch.Tensor, jagged: bool):
    """(stride_b, stride_t, stride_h, stride_d) of a dense 4-D or jagged 3-D tensor."""
    if jagged:
        return 0, t.stride(0), t.stride(1), t.stride(2)
    return t.stride(0), t.stride(2), t.stride(1), t.stride(3)


def _bias_strides(bias: Optional[torch.Tensor]):
    """(stride_b, stride_h, stride_q, stride_k) of a bias broadcastable to [B, H, Tq, Tk]."""
    if bias is None:
        return 0, 0, 0, 0
    if bias.dim() != 4:
        raise ValueError(f"GDPA bias must be 4-D [B|1, H|1, Tq, Tk], got shape {tuple(bias.shape)}")
    return tuple(0 if bias.shape[i] == 1 else bias.stride(i) for i in range(4))


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


def _common(q, q_off, k_off, q_len, k_len, window, T_Q, T_K, activation, causal, causal_offset, bias,
            nb, H):
    dummy = q
    win = -1 if window is None or window < 0 else min(int(window), max(T_Q, T_K) + 1)
    if bias is not None:
        want = (nb, H, T_Q, T_K)
        if any(bs not in (1, w) for bs, w in zip(bias.shape, want)) or bias.dim() != 4:
            raise ValueError(f"GDPA bias of shape {tuple(bias.shape)} does not broadcast to "
                             f"[B, H, Tq, Tk] = {list(want)}")
        if bias.device != q.device:
            raise ValueError(f"GDPA bias is on {bias.device}, q on {q.device}")
    off = int(causal_offset)
    off = max(min(off, T_K + 1), -(T_Q + 1))  # beyond this every (or no) score is kept
    return dict(
        QOFF=q_off if q_off is not None else dummy,
        KOFF=k_off if k_off is not None else dummy,
        QLEN=q_len if q_len is not None else dummy,
        KLEN=k_len if k_len is not None else dummy,
        BIAS=bias if bias is not None else dummy,
        bias_strides=_bias_strides(bias),
        window=max(win, 0),
        causal_off=off,
        ACT=ACTIVATIONS[activation],
        JAGGED=q_off is not None,
        HAS_QLEN=q_len is not None,
        HAS_KLEN=k_len is not None,
        HAS_WINDOW=win >= 0,
        CAUSAL=bool(causal),
        HAS_BIAS=bias is not None,
        FAST=fast_math(q.dtype),
        DOT_FP32=interpreting() or q.dtype == torch.float32,
        EVEN_D=False,  # set by the launchers from the head sizes
    )


_FLAGS = ("ACT", "JAGGED", "HAS_QLEN", "HAS_KLEN", "HAS_WINDOW", "CAUSAL", "HAS_BIAS", "FAST", "DOT_FP32",
          "EVEN_D")


def gdpa_fwd(
    q, k, v, *, activation: str, qk_scale: float, pre_scale: float, window: int,
    q_lengths=None, kv_lengths=None, q_offsets=None, kv_offsets=None,
    max_seq_len_q: Optional[int] = None, max_seq_len_kv: Optional[int] = None,
    causal: bool = False, causal_offset: int = 0, bias: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Forward. Dense when offsets are None (lengths optional), jagged otherwise.

    ``causal``: score (i, j) kept only if ``j <= i + causal_offset`` (positions
    within the sample; 0 = top-left aligned like SDPA's ``is_causal``). ``bias``:
    added to ``pre_scale * q.k`` before masking and the activation; any tensor
    broadcastable to ``[B, H, Tq, Tk]`` (jagged: padded positions, Tq/Tk the max
    lengths); no gradient is computed for it.
    """
    jagged = q_offsets is not None
    B, H, Hkv, T_Q, T_K, D, DV = _geometry(q, k, v, jagged, max_seq_len_q, max_seq_len_kv)
    nb = q_offsets.shape[0] - 1 if jagged else B
    if out is None:
        shape = (q.shape[0], H, DV) if jagged else (B, H, T_Q, DV)
        out = torch.empty(shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0 or nb == 0 or T_Q == 0:
        return out.zero_() if not jagged else out
    # jagged offsets, masks and a bias keep more values live: narrower tiles (see fwd_config)
    heavy = bool(causal) or bias is not None or (window is not None and window >= 0) or jagged
    BLOCK_M, BLOCK_N, warps, stages = fwd_config(T_Q, T_K, D, DV, q.dtype, _arch(q.device), heavy,
                                                 activation)
    grid = (triton.cdiv(T_Q, BLOCK_M) * nb * H,)
    c = _common(q, q_offsets, kv_offsets, q_lengths, kv_lengths, window, T_Q, T_K, activation,
                causal, causal_offset, bias, nb, H)
    c["EVEN_D"] = D == _pow2(D) and DV == _pow2(DV)
    wrap_triton(gdpa_fwd_kernel)[grid](
        q, k, v, out, c["QOFF"], c["KOFF"], c["QLEN"], c["KLEN"], c["BIAS"],
        *_strides(q, jagged), *_strides(k, jagged), *_strides(v, jagged), *_strides(out, jagged),
        *c["bias_strides"],
        H, H // Hkv, T_Q, T_K, D, DV,
        float(qk_scale), float(pre_scale), c["window"], c["causal_off"],
        **{f: c[f] for f in _FLAGS},
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV),
        num_warps=warps, num_stages=stages,
    )
    return out


def gdpa_bwd(
    grad_out, q, k, v, *, activation: str, qk_scale: float, pre_scale: float, window: int,
    q_lengths=None, kv_lengths=None, q_offsets=None, kv_offsets=None,
    max_seq_len_q: Optional[int] = None, max_seq_len_kv: Optional[int] = None,
    causal: bool = False, causal_offset: int = 0, bias: Optional[torch.Tensor] = None,
    bias_grad: bool = False, out: Optional[tuple] = None, kernel: Optional[str] = None,
):
    """Backward: ``(dq, dk, dv)`` shaped like ``q, k, v`` (GQA heads summed), and ``dbias``
    shaped like ``bias`` (in its dtype) as a fourth element when ``bias_grad`` (which needs
    a ``bias``; without it the kernels compute no bias gradient: ``DBIAS=0``).

    ``kernel``: ``"fused"`` (one launch, :func:`recopt.kernels.gdpa.gdpa_bwd_fused_kernel`:
    dQ added atomically in fp32, then cast), ``"two_launch"`` (dK/dV, then dQ; no atomics
    for dQ), or None: :func:`bwd_choice` decides (two launches under
    ``torch.use_deterministic_algorithms``); the choice and its reason are counted in
    :data:`BACKWARD_COUNTS` (eager calls).

    ``causal``, ``causal_offset`` and ``bias`` as in :func:`gdpa_fwd`. The bias
    gradient is the score gradient ``qk_scale * act'(s) * dP`` (0 where masked),
    summed over the bias's broadcast dims; the kernel that computes dS writes it
    (the dQ kernel of the two launches, or the one-launch kernel): stored directly when the bias has the full
    ``[B, H, Tq, Tk]`` shape, else added atomically (fp32, summed over broadcast
    query/key dims inside the tile first; the order of the atomic adds, so the
    last bits, may differ run to run). Dense inputs only.
    """
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
    db, db_meta = _dbias_buffer(bias, bias_grad, jagged, nb, H, T_Q, T_K)
    if nb == 0 or (T_Q == 0 and T_K == 0):
        return _with_dbias((dq.zero_(), dk.zero_(), dv.zero_()), db, bias)
    go = grad_out
    # jagged offsets, masks and a bias keep more values live: narrower tiles (see bwd_config)
    heavy = bool(causal) or bias is not None or (window is not None and window >= 0) or jagged
    arch = _arch(q.device)
    if kernel is None:
        kernel, reason = bwd_choice(T_Q, T_K, D, DV, nb, H, Hkv, q.dtype, arch, heavy, _sm_count(q.device))
    elif kernel in BWD_KERNELS:
        if kernel == "fused" and torch.are_deterministic_algorithms_enabled():
            raise RuntimeError("gdpa_bwd(kernel='fused') adds dQ atomically (not deterministic), but "
                               "torch.use_deterministic_algorithms is on; use kernel='two_launch' or None")
        reason = "requested by the caller"
    else:
        raise ValueError(f"gdpa_bwd(kernel={kernel!r}): use 'fused', 'two_launch' or None (automatic)")
    if not torch.compiler.is_compiling():
        BACKWARD_COUNTS[(kernel, reason)] += 1
    c = _common(q, q_offsets, kv_offsets, q_lengths, kv_lengths, window, T_Q, T_K, activation,
                causal, causal_offset, bias, nb, H)
    c["EVEN_D"] = D == _pow2(D) and DV == _pow2(DV)
    flags = {f: c[f] for f in _FLAGS}

    def meta(cfg):
        return dict(BLOCK_M=cfg[0], BLOCK_N=cfg[1], BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV),
                    num_warps=cfg[2], num_stages=cfg[3], **flags)

    scal = (H, H // Hkv, T_Q, T_K, D, DV, float(qk_scale), float(pre_scale), c["window"], c["causal_off"])
    db_strides = db_meta.pop("strides")
    if kernel == "fused":
        # fp32 dQ accumulator: dq itself when it is fp32, else a buffer cast at the end
        acc = dq if dq.dtype == torch.float32 else torch.empty(dq.shape, dtype=torch.float32, device=dq.device)
        acc.zero_()
        if T_K > 0 and dk.numel() > 0:
            cfg = fused_config(T_Q, T_K, D, DV, q.dtype, arch, heavy)
            for out_dk, out_dv, out_dq in fused_passes(D, DV):
                dbm = db_meta if out_dq else dict(DBIAS=0, DB_SUM_Q=False, DB_SUM_K=False)
                wrap_triton(gdpa_bwd_fused_kernel)[(triton.cdiv(T_K, cfg[1]) * nb * Hkv,)](
                    q, k, v, go, dk, dv, acc, db if db is not None else acc,
                    c["QOFF"], c["KOFF"], c["QLEN"], c["KLEN"], c["BIAS"],
                    *_strides(q, jagged), *_strides(k, jagged), *_strides(v, jagged), *_strides(go, jagged),
                    *_strides(dk, jagged), *_strides(dv, jagged), *_strides(acc, jagged), *c["bias_strides"],
                    *db_strides, *scal, OUT_DK=out_dk, OUT_DV=out_dv, OUT_DQ=out_dq, **dbm, **meta(cfg),
                )
        else:
            dk.zero_(), dv.zero_()
        acc.mul_(float(pre_scale) * float(qk_scale))
        if acc is not dq:
            dq.copy_(acc)
        return _with_dbias((dq, dk, dv), db, bias)
    cfg_dkdv, cfg_dq = bwd_config(T_Q, T_K, D, DV, q.dtype, arch, heavy)
    if T_K > 0 and dk.numel() > 0:
        for out_dk, out_dv in dkdv_passes(D, DV):
            wrap_triton(gdpa_bwd_dkdv_kernel)[(triton.cdiv(T_K, cfg_dkdv[1]) * nb * Hkv,)](
                q, k, v, go, dk, dv, c["QOFF"], c["KOFF"], c["QLEN"], c["KLEN"], c["BIAS"],
                *_strides(q, jagged), *_strides(k, jagged), *_strides(v, jagged), *_strides(go, jagged),
                *_strides(dk, jagged), *_strides(dv, jagged), *c["bias_strides"],
                *scal, OUT_DK=out_dk, OUT_DV=out_dv, **meta(cfg_dkdv),
            )
    else:
        dk.zero_(), dv.zero_()
    if T_Q > 0 and dq.numel() > 0:
        wrap_triton(gdpa_bwd_dq_kernel)[(triton.cdiv(T_Q, cfg_dq[0]) * nb * H,)](
            q, k, v, go, dq, c["QOFF"], c["KOFF"], c["QLEN"], c["KLEN"], c["BIAS"],
            db if db is not None else q,
            *_strides(q, jagged), *_strides(k, jagged), *_strides(v, jagged), *_strides(go, jagged),
            *_strides(dq, jagged), *c["bias_strides"], *db_strides,
            *scal, **db_meta, **meta(cfg_dq),
        )
    else:
        dq.zero_()
    return _with_dbias((dq, dk, dv), db, bias)


def _dbias_buffer(bias, bias_grad, jagged, nb, H, T_Q, T_K):
    """(zero-filled dbias buffer or None, the dQ kernel's DB strides and DBIAS constexprs).

    DBIAS 1: the bias has the full [B, H, Tq, Tk] shape; the kernel stores into a buffer of
    the bias's dtype. DBIAS 2: broadcast over some dim; fp32 buffer, atomic adds (summed over
    broadcast query/key dims inside each tile first: DB_SUM_Q / DB_SUM_K).
    """
    off = dict(strides=(0, 0, 0, 0), DBIAS=0, DB_SUM_Q=False, DB_SUM_K=False)
    if not bias_grad:
        return None, off
    if bias is None:
        raise ValueError("gdpa_bwd(bias_grad=True) needs the bias whose gradient it computes")
    if jagged:
        raise ValueError("gdpa_bwd: the bias gradient is computed for dense inputs only "
                         "(the jagged op takes no bias)")
    full = tuple(bias.shape) == (nb, H, T_Q, T_K)
    db = torch.zeros(bias.shape, dtype=bias.dtype if full else torch.float32, device=bias.device)
    strides = tuple(0 if db.shape[i] == 1 else db.stride(i) for i in range(4))
    return db, dict(strides=strides, DBIAS=1 if full else 2,
                    DB_SUM_Q=not full and bias.shape[2] == 1, DB_SUM_K=not full and bias.shape[3] == 1)


def _with_dbias(grads, db, bias):
    if db is None:
        return grads
    return grads + (db.to(bias.dtype),)


# ----------------------------------------------------------------------------- compile checks
#
# What recopt.kernels.compile_check compiles for the GDPA kernels: every config
# fwd_config / bwd_config can return (over sequence lengths, head sizes 16..256
# and dtypes), every activation, and the variants (dense, lengths, jagged,
# window, causal, bias, GQA, broadcast q). Arguments are typed the way a launch
# with contiguous tensors specializes them: strides of 1 become constexpr 1,
# pointers and the other strides are multiples of 16.

_KERNELS = {
    "fwd": ("gdpa_fwd_kernel", ("Q", "K", "V", "O"),
            ("sqb sqt sqh sqd", "skb skt skh skd", "svb svt svh svd", "sob sot soh sod")),
    "dkdv": ("gdpa_bwd_dkdv_kernel", ("Q", "K", "V", "DO", "DK", "DV_"),
             ("sqb sqt sqh sqd", "skb skt skh skd", "svb svt svh svd", "sdob sdot sdoh sdod",
              "sdkb sdkt sdkh sdkd", "sdvb sdvt sdvh sdvd")),
    "dq": ("gdpa_bwd_dq_kernel", ("Q", "K", "V", "DO", "DQ"),
           ("sqb sqt sqh sqd", "skb skt skh skd", "svb svt svh svd", "sdob sdot sdoh sdod",
            "sdqb sdqt sdqh sdqd")),
    "fused": ("gdpa_bwd_fused_kernel", ("Q", "K", "V", "DO", "DK", "DV_", "DQ", "DB"),
              ("sqb sqt sqh sqd", "skb skt skh skd", "svb svt svh svd", "sdob sdot sdoh sdod",
               "sdkb sdkt sdkh sdkd", "sdvb sdvt sdvh sdvd", "sdqb sdqt sdqh sdqd")),
}

# variant name -> flags; "gqa" leaves GROUP a runtime int, "bcast_q" makes q's batch stride 0.
VARIANTS = {
    "dense": dict(),
    "lengths": dict(HAS_QLEN=True, HAS_KLEN=True),
    "jagged": dict(JAGGED=True),
    "window": dict(HAS_QLEN=True, HAS_KLEN=True, HAS_WINDOW=True),
    "causal": dict(HAS_KLEN=True, CAUSAL=True),
    "bias": dict(HAS_BIAS=True),
    "gqa": dict(GQA=True),
    "bcast_q": dict(BCAST_Q=True),
    "light": dict(JAGGED=True, GQA=True),
    "gqa_len": dict(HAS_QLEN=True, HAS_KLEN=True, GQA=True),
    "all": dict(JAGGED=True, HAS_WINDOW=True, CAUSAL=True, HAS_BIAS=True, GQA=True, DBIAS=2),
    # the bias gradient (dQ kernel): stored for a full-shape bias, atomic adds for a broadcast one
    "dbias": dict(HAS_KLEN=True, CAUSAL=True, HAS_BIAS=True, DBIAS=1),
    "dbias_bcast": dict(HAS_BIAS=True, DBIAS=2, DB_SUM_Q=True),
}

# variants the launchers serve with their "heavy" configs (jagged, masks, a bias)
_HEAVY_VARIANTS = ("jagged", "window", "causal", "bias", "light", "all", "dbias", "dbias_bcast")

_TYPES = TYPES  # (the softmax launcher reads this name)
HEAD_DIMS = (16, 32, 64, 128, 256)         # BLOCK_D classes: every d in [1, 256] maps onto one
_SHAPES = ((16, 16), (64, 32), (1000, 256), (1024, 1024))  # (T_Q, T_K) probing the config keys


def _spec(kind: str, act: str, variant: str, d: int, dtype, cfg, outs=(True, True, True)):
    """The compile-check spec of one launch: kernel ``kind`` (fwd, dkdv, dq, fused), activation,
    variant (:data:`VARIANTS`), head size, dtype, config ``(BLOCK_M, BLOCK_N, warps, stages)``
    and, for dkdv / fused, the outputs ``(OUT_DK, OUT_DV[, OUT_DQ])`` of that launch."""
    attr, ptrs, stride_groups = _KERNELS[kind]
    flags = dict(JAGGED=False, HAS_QLEN=False, HAS_KLEN=False, HAS_WINDOW=False, CAUSAL=False,
                 HAS_BIAS=False, GQA=False, BCAST_Q=False, DBIAS=0, DB_SUM_Q=False, DB_SUM_K=False)
    flags.update(VARIANTS[variant])
    sb = SpecBuilder(dtype)
    has_db = kind in ("dq", "fused")
    # the bias gradient's buffer (fp32 when atomic); the fused kernel's dQ accumulator is fp32
    db_ty = sb.ty if flags["DBIAS"] == 1 else "fp32"
    for p in ptrs:
        sb.pointers((p,), "fp32" if p == "DQ" and kind == "fused" else (db_ty if p == "DB" else ""))
    sb.pointers(("QOFF", "KOFF", "QLEN", "KLEN"), "i64").pointers(("BIAS",))
    if kind == "dq":
        sb.pointers(("DB",), db_ty)
    sb.strides(stride_groups).strides(("sbb sbh sbq sbk",))
    if has_db:
        sb.strides(("sdbb sdbh sdbq sdbk",))
    sb.attention_scalars(d, flags["GQA"])
    if flags["BCAST_Q"]:
        sb.divisible("sqb")                          # stride 0: divisible, not specialized
    bm, bn, warps, stages = cfg
    sb.constexprs(
        ACT=ACTIVATIONS[act], JAGGED=flags["JAGGED"], HAS_QLEN=flags["HAS_QLEN"],
        HAS_KLEN=flags["HAS_KLEN"], HAS_WINDOW=flags["HAS_WINDOW"], CAUSAL=flags["CAUSAL"],
        HAS_BIAS=flags["HAS_BIAS"], FAST=0 if dtype == torch.float32 else 2,
        DOT_FP32=dtype == torch.float32, EVEN_D=d == _pow2(d),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(d),
    )
    part = ""
    if has_db:
        # the bias gradient is written by the launch that computes dS (fused: the one with OUT_DQ)
        dbias = flags["DBIAS"] if kind == "dq" or outs[2] else 0
        sb.constexprs(DBIAS=dbias, DB_SUM_Q=flags["DB_SUM_Q"] and dbias != 0,
                      DB_SUM_K=flags["DB_SUM_K"] and dbias != 0)
    if kind == "dkdv":
        sb.constexprs(OUT_DK=outs[0], OUT_DV=outs[1])
        part = {(True, True): "", (True, False): "[dk]", (False, True): "[dv]"}[tuple(outs[:2])]
    if kind == "fused":
        sb.constexprs(OUT_DK=outs[0], OUT_DV=outs[1], OUT_DQ=outs[2])
        part = {(True, True, True): "", (True, False, True): "[dkdq]", (False, True, False): "[dv]"}[tuple(outs)]
    name = f"gdpa_{kind}{part}/{act}/{variant}/{sb.ty}/d{d}/m{bm}n{bn}w{warps}s{stages}"
    tags = dict(family="gdpa", kernel=kind, act=act, variant=variant, dtype=sb.ty, d=d,
                BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return sb.build(name, "recopt.kernels.gdpa", attr, warps, stages, tags)


def launch_configs(kind: str, dtype, arch: int = 90, act: str = "gelu") -> list:
    """Every (d, config, heavy) the launcher can pick for this kernel kind, dtype, arch and
    activation (the forward's tile width depends on it on sm_100)."""
    out = []
    for d in HEAD_DIMS:
        for heavy in (False, True):
            for tq, tk in _SHAPES:
                if kind == "fwd":
                    picked = _fwd_config_gpu(tq, tk, d, d, dtype, arch, heavy, act)
                elif kind == "fused":
                    picked = _fused_config_gpu(tq, tk, d, d, dtype, arch, heavy)
                else:
                    picked = _bwd_config_gpu(tq, tk, d, d, dtype, arch, heavy)[0 if kind == "dkdv" else 1]
                cfg = (d, picked, heavy)
                if cfg not in out:
                    out.append(cfg)
    return out


def compile_specs(level: str = "ci") -> list:
    """Specs for recopt.kernels.compile_check.

    ``ci`` (about 100 s on 2 idle cores), per arch (sm_90, sm_100): every
    config the launcher can pick for every head-size class (16..256), compiled
    with the heaviest variant that config serves (``all``: jagged, window,
    causal, bias, GQA, gelu, the atomic bias gradient in dQ, for the configs
    picked under jagged inputs, masks or a bias; ``gqa_len`` / ``lengths``:
    lengths and GQA, otherwise), in bf16 and (d 64) fp32, the forward also with
    gelu_tanh where its config differs; every activation through the dK/dV
    kernel (it holds both act and its gradient) and through the forward on
    sm_100 (three fast ones on sm_90); dQ's stored and atomic bias gradients;
    on sm_90 also each kernel's ``dense``, ``causal`` and odd-head-size code
    paths, and the d = 256 backward with ``raw``. ``full``: activation x
    variant x config x dtype, both archs.
    """
    specs, seen = [], set()

    def add(kind, act, variant, d, dtype, cfg, archs):
        for outs in _launch_outputs(kind, d):
            s = dataclasses.replace(_spec(kind, act, variant, d, dtype, cfg, outs), archs=tuple(archs))
            key = (s.name, s.archs)
            if key not in seen:
                seen.add(key)
                specs.append(s)

    bf16 = torch.bfloat16
    for kind in ("fwd", "dkdv", "dq"):
        for arch in (90, 100):
            if level == "full":
                for dtype in (bf16, torch.float16, torch.float32):
                    for act in ACTIVATIONS:
                        for d, cfg, heavy in launch_configs(kind, dtype, arch, act):
                            for variant in VARIANTS:
                                if variant.startswith("dbias") and kind not in ("dq", "fused"):
                                    continue                 # only dQ and the fused kernel have DBIAS
                                if heavy == (variant in _HEAVY_VARIANTS):
                                    add(kind, act, variant, d, dtype, cfg, (arch,))
                continue
            done = set()
            for act in (("gelu", "gelu_tanh") if kind == "fwd" else ("gelu",)):
                for d, cfg, heavy in launch_configs(kind, bf16, arch, act):
                    if (d, cfg, heavy) not in done:  # gelu_tanh: only the configs gelu does not take
                        done.add((d, cfg, heavy))
                        add(kind, act, "all" if heavy else ("lengths" if kind == "fwd" else "gqa_len"), d,
                            bf16, cfg, (arch,))
            for d, cfg, heavy in launch_configs(kind, torch.float32, arch):
                if d == 64:
                    add(kind, "gelu", "all" if heavy else ("lengths" if kind == "fwd" else "gqa_len"), d,
                        torch.float32, cfg, (arch,))
            acts = ACTIVATIONS if kind == "dkdv" else (("gelu", "gelu_tanh", "silu") if kind == "fwd" else ())
            if kind == "fwd" and arch >= 100:
                acts = ACTIVATIONS                   # the tile width depends on the activation here
            for act in acts:
                main = [c for d, c, h in launch_configs(kind, bf16, arch, act) if d == 128 and not h][-1]
                add(kind, act, "dense", 128, bf16, main, (arch,))
            main = [c for d, c, h in launch_configs(kind, bf16, arch) if d == 128 and not h][-1]
            heavy_main = [c for d, c, h in launch_configs(kind, bf16, arch) if d == 128 and h][-1]
            if kind == "dq":  # the bias gradient: stored (full-shape bias) and atomic (broadcast)
                add(kind, "gelu", "dbias", 128, bf16, heavy_main, (arch,))
                if arch == 90:
                    add(kind, "silu", "dbias_bcast", 64, bf16,
                        [c for d, c, h in launch_configs(kind, bf16, arch) if d == 64 and h][-1], (arch,))
            if arch == 90:
                add(kind, "gelu", "dense", 128, bf16, main, (arch,))
                add(kind, "gelu", "causal", 128, bf16, heavy_main, (arch,))
                add(kind, "gelu", "lengths", 96, bf16, main, (arch,))   # d != BLOCK_D: masked head-dim loads
                if kind != "fwd":  # d = 256 is the tightest fit; register use is not monotonic in the
                    # activation (raw spilled here where gelu did not): the simplest one as well
                    add(kind, "raw", "dense", 256, bf16,
                        [c for d, c, h in launch_configs(kind, bf16, arch) if d == 256 and not h][-1], (arch,))
    for s in fused_compile_specs("all" if level == "full" else "ci"):
        key = (s.name, s.archs)
        if key not in seen:
            seen.add(key)
            specs.append(s)
    return specs


def _launch_outputs(kind: str, d: int) -> tuple:
    """The (OUT_DK, OUT_DV[, OUT_DQ]) of each launch of kernel ``kind`` at head size d."""
    if kind == "dkdv":
        return dkdv_passes(d, d)
    if kind == "fused":
        return fused_passes(d, d)
    return ((True, True, True),)


def fused_compile_specs(level: str = "ci") -> list:
    """Compile-check specs of the one-launch backward (``gdpa_bwd_fused_kernel``).

    ``ci`` (in the CI compile test; 5 compiles, about 15 s on 2 idle cores): per arch, the
    tightest fits, with every mask, jagged, GQA and the atomic bias gradient (``all``): the
    d = 128 config and the d = 256 dK + dQ launch; on sm_90 the stored (full-shape) bias
    gradient at d = 128. ``all`` (the slow tests, and the
    ``full`` level): every config :func:`fused_config` can pick for d 16..256 in bf16 (fp32
    runs the two launches: :func:`bwd_choice`), with the heaviest variant it serves,
    broadcast q, and every activation at d = 64 and 128, on both archs.
    """
    specs, seen = [], set()
    bf16 = torch.bfloat16

    def add(act, variant, d, dtype, cfg, arch, first_only=False):
        for outs in fused_passes(d, d)[:1] if first_only else fused_passes(d, d):
            s = dataclasses.replace(_spec("fused", act, variant, d, dtype, cfg, outs), archs=(arch,))
            if (s.name, arch) not in seen:
                seen.add((s.name, arch))
                specs.append(s)

    for arch in (90, 100):
        if level == "all":
            for dtype in (bf16,):    # fp32 runs the two launches (bwd_choice)
                for d, cfg, heavy in launch_configs("fused", dtype, arch):
                    add("gelu", "all" if heavy else "gqa_len", d, dtype, cfg, arch)
                    if not heavy:
                        add("gelu", "bcast_q", d, dtype, cfg, arch)
            for act in ACTIVATIONS:
                for d in (64, 128):
                    cfg = [c for dd, c, h in launch_configs("fused", bf16, arch) if dd == d and not h][-1]
                    add(act, "dense", d, bf16, cfg, arch)
            continue
        for d, cfg, heavy in launch_configs("fused", bf16, arch):
            if d in (128, 256) and heavy:
                add("gelu", "all", d, bf16, cfg, arch, first_only=d == 256)
        if arch == 90:
            heavy128 = [c for dd, c, h in launch_configs("fused", bf16, arch) if dd == 128 and h][-1]
            add("gelu", "dbias", 128, bf16, heavy128, arch)
    return specs
