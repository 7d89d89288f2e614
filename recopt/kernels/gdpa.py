"""Triton kernels of GDPA: forward, backward dK/dV, backward dQ.

Kernels only; shapes, block sizes and dispatch live in ``recopt.ops``. One
kernel serves dense padded tensors (``[B, H, T, d]`` with optional per-sample
lengths) and jagged ones (``values [sum T_b, H, d]`` + ``offsets [B+1]``):
every tensor is addressed as ``base + b*stride_b + (start_b + t)*stride_t +
h*stride_h + c*stride_c``, where ``start_b`` is the jagged offset (0 when
dense) and ``stride_b`` is 0 when jagged. Strides may be 0 (broadcast query,
expanded K/V) or arbitrary (transposed views): nothing is copied.

Semantics are those of :func:`recopt.ops.gdpa_ref.gdpa_ref`: scores
``pre_scale * q·k`` in fp32, masked scores (key past its length, outside the
window ``|i-j| <= WINDOW``) set to 0, ``p = act(s) * qk_scale`` cast to the
value dtype, fp32 accumulation. Nothing O(T²) is stored: the backward
recomputes the scores.

Dense outputs are written in full, including rows past a sample's length
(zeros), so callers may allocate them with ``torch.empty``. Jagged outputs
cover every row of the values tensor as long as ``MAX_Q``/``MAX_K`` bound the
lengths.

``DOT_FP32``: dots in full fp32 (IEEE, not TF32). Set for fp32 inputs, and
under the CPU interpreter (TRITON_INTERPRET=1), whose triton 3.6 build computes
``tl.dot`` on bf16 operands wrongly: the operands are upcast after they were
rounded to their storage dtype, which gives the numbers a GPU computes with
fp32 accumulation.
"""
import triton
import triton.language as tl

_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): saturates correctly at +-inf without NaN.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _act(s, ACT: tl.constexpr):
    """act(s); codes as in recopt.ops.gdpa_ref.ACTIVATIONS."""
    if ACT == 1:
        out = 0.5 * s * (1.0 + tl.erf(s * _SQRT1_2))
    elif ACT == 2:
        out = 0.5 * s * (1.0 + _tanh(_SQRT_2_OVER_PI * (s + 0.044715 * s * s * s)))
    elif ACT == 3:
        out = s / (1.0 + tl.exp(-s))
    elif ACT == 4:
        out = tl.maximum(s, 0.0)
    elif ACT == 5:
        r = tl.maximum(s, 0.0)
        out = r * r
    elif ACT == 6:
        out = tl.where(s > 0.0, s, 0.01 * s)
    elif ACT == 7:
        out = s * tl.minimum(tl.maximum(s + 3.0, 0.0), 6.0) * (1.0 / 6.0)
    else:
        out = s
    return out


@triton.jit
def _act_grad(s, ACT: tl.constexpr):
    """d act(s) / ds."""
    if ACT == 1:
        out = 0.5 * (1.0 + tl.erf(s * _SQRT1_2)) + s * tl.exp(-0.5 * s * s) * _INV_SQRT_2PI
    elif ACT == 2:
        t = _tanh(_SQRT_2_OVER_PI * (s + 0.044715 * s * s * s))
        out = 0.5 * (1.0 + t) + 0.5 * s * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 0.134145 * s * s)
    elif ACT == 3:
        sig = 1.0 / (1.0 + tl.exp(-s))
        out = sig * (1.0 + s * (1.0 - sig))
    elif ACT == 4:
        out = tl.where(s > 0.0, 1.0, 0.0)
    elif ACT == 5:
        out = 2.0 * tl.maximum(s, 0.0)
    elif ACT == 6:
        out = tl.where(s > 0.0, 1.0, 0.01)
    elif ACT == 7:
        out = tl.where(s <= -3.0, 0.0, tl.where(s >= 3.0, 1.0, (2.0 * s + 3.0) * (1.0 / 6.0)))
    else:
        out = s * 0.0 + 1.0
    return out


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    if DOT_FP32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _seq_bounds(OFF, LEN, b, T, JAGGED: tl.constexpr, HAS_LEN: tl.constexpr):
    """(start row, length) of sample b."""
    if JAGGED:
        start = tl.load(OFF + b).to(tl.int64)
        length = (tl.load(OFF + b + 1).to(tl.int64) - start).to(tl.int32)
    else:
        start = tl.zeros([], dtype=tl.int64)
        if HAS_LEN:
            length = tl.minimum(tl.maximum(tl.load(LEN + b).to(tl.int32), 0), T)
        else:
            length = tl.zeros([], dtype=tl.int32) + T
    return start, length


@triton.jit
def gdpa_fwd_kernel(
    Q, K, V, O, QOFF, KOFF, QLEN, KLEN,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    sob, sot, soh, sod,
    H, GROUP, T_Q, T_K, D, DV,
    qk_scale, pre_scale, window,
    ACT: tl.constexpr, JAGGED: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_KLEN: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """o[b, h, i] = sum_j cast(act(s_ij) * qk_scale) v_j. Grid: (cdiv(T_Q, BLOCK_M), B*H)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q_start, q_len = _seq_bounds(QOFF, QLEN, b, T_Q, JAGGED, HAS_QLEN)
    k_start, k_len = _seq_bounds(KOFF, KLEN, b, T_K, JAGGED, HAS_KLEN)
    start_m = pid_m * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < q_len

    q_ptrs = (Q + b.to(tl.int64) * sqb + (q_start + offs_m[:, None]) * sqt + h * sqh
              + offs_d[None, :] * sqd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + b.to(tl.int64) * skb + k_start * skt + hk * skh
    v_base = V + b.to(tl.int64) * svb + k_start * svt + hk * svh

    lo = k_len * 0
    hi = k_len
    if HAS_WINDOW:
        lo = tl.maximum(start_m - window, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(hi, start_m + BLOCK_M + window)
    if start_m >= q_len:
        hi = lo  # no valid row: skip the loop, write zeros

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < k_len
        kt = tl.load(k_base + cols[None, :] * skt + offs_d[:, None] * skd,
                     mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        s = _dot(q, kt, DOT_FP32) * pre_scale
        keep = col_ok[None, :]
        if HAS_WINDOW:
            diff = offs_m[:, None] - cols[None, :]
            keep = keep & (diff <= window) & (diff >= -window)
        s = tl.where(keep, s, 0.0)
        p = _act(s, ACT) * qk_scale
        vb = tl.load(v_base + cols[:, None] * svt + offs_dv[None, :] * svd,
                     mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc += _dot(p.to(vb.dtype), vb, DOT_FP32)

    acc = tl.where(row_ok[:, None], acc, 0.0)
    o_ptrs = (O + b.to(tl.int64) * sob + (q_start + offs_m[:, None]) * sot + h * soh
              + offs_dv[None, :] * sod)
    if JAGGED:
        o_mask = row_ok[:, None] & (offs_dv[None, :] < DV)
    else:
        o_mask = (offs_m[:, None] < T_Q) & (offs_dv[None, :] < DV)
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=o_mask)


@triton.jit
def gdpa_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV_, QOFF, KOFF, QLEN, KLEN,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    sdob, sdot, sdoh, sdod,
    sdkb, sdkt, sdkh, sdkd,
    sdvb, sdvt, sdvh, sdvd,
    H, GROUP, T_Q, T_K, D, DV,
    qk_scale, pre_scale, window,
    ACT: tl.constexpr, JAGGED: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_KLEN: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dK, dV for one block of keys of one K/V head, summed over its GROUP query heads.

    Grid: (cdiv(T_K, BLOCK_N), B*Hkv). Works on transposed tiles (keys as rows).
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    HKV = H // GROUP
    b = pid_bh // HKV
    hk = pid_bh % HKV
    q_start, q_len = _seq_bounds(QOFF, QLEN, b, T_Q, JAGGED, HAS_QLEN)
    k_start, k_len = _seq_bounds(KOFF, KLEN, b, T_K, JAGGED, HAS_KLEN)
    start_n = pid_n * BLOCK_N

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < k_len
    b64 = b.to(tl.int64)

    k = tl.load(K + b64 * skb + (k_start + offs_n[:, None]) * skt + hk * skh + offs_d[None, :] * skd,
                mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b64 * svb + (k_start + offs_n[:, None]) * svt + hk * svh + offs_dv[None, :] * svd,
                mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    lo = q_len * 0
    hi = q_len
    if HAS_WINDOW:
        lo = tl.maximum(start_n - window, 0) // BLOCK_M * BLOCK_M
        hi = tl.minimum(hi, start_n + BLOCK_N + window)
    if start_n >= k_len:
        hi = lo

    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + b64 * sqb + q_start * sqt + h * sqh
        do_base = DO + b64 * sdob + q_start * sdot + h * sdoh
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < q_len
            qt = tl.load(q_base + rows[None, :] * sqt + offs_d[:, None] * sqd,
                         mask=row_ok[None, :] & (offs_d[:, None] < D), other=0.0)
            do = tl.load(do_base + rows[:, None] * sdot + offs_dv[None, :] * sdod,
                         mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            st = _dot(k, qt, DOT_FP32) * pre_scale          # [BLOCK_N, BLOCK_M]
            keep = col_ok[:, None] & row_ok[None, :]
            if HAS_WINDOW:
                diff = rows[None, :] - offs_n[:, None]
                keep = keep & (diff <= window) & (diff >= -window)
            st = tl.where(keep, st, 0.0)
            pt = _act(st, ACT) * qk_scale
            dv += _dot(pt.to(v.dtype), do, DOT_FP32)
            dpt = _dot(v, tl.trans(do), DOT_FP32)            # [BLOCK_N, BLOCK_M]
            dst = tl.where(keep, _act_grad(st, ACT) * qk_scale * dpt, 0.0)
            dk += _dot(dst.to(qt.dtype), tl.trans(qt), DOT_FP32)

    dk = dk * pre_scale
    if JAGGED:
        row_mask = col_ok[:, None]
    else:
        row_mask = offs_n[:, None] < T_K
    tl.store(DK + b64 * sdkb + (k_start + offs_n[:, None]) * sdkt + hk * sdkh + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=row_mask & (offs_d[None, :] < D))
    tl.store(DV_ + b64 * sdvb + (k_start + offs_n[:, None]) * sdvt + hk * sdvh + offs_dv[None, :] * sdvd,
             dv.to(DV_.dtype.element_ty), mask=row_mask & (offs_dv[None, :] < DV))


@triton.jit
def gdpa_bwd_dq_kernel(
    Q, K, V, DO, DQ, QOFF, KOFF, QLEN, KLEN,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    sdob, sdot, sdoh, sdod,
    sdqb, sdqt, sdqh, sdqd,
    H, GROUP, T_Q, T_K, D, DV,
    qk_scale, pre_scale, window,
    ACT: tl.constexpr, JAGGED: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_KLEN: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dQ for one block of query rows of one head. Grid: (cdiv(T_Q, BLOCK_M), B*H)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q_start, q_len = _seq_bounds(QOFF, QLEN, b, T_Q, JAGGED, HAS_QLEN)
    k_start, k_len = _seq_bounds(KOFF, KLEN, b, T_K, JAGGED, HAS_KLEN)
    start_m = pid_m * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < q_len
    b64 = b.to(tl.int64)

    q = tl.load(Q + b64 * sqb + (q_start + offs_m[:, None]) * sqt + h * sqh + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b64 * sdob + (q_start + offs_m[:, None]) * sdot + h * sdoh + offs_dv[None, :] * sdod,
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    k_base = K + b64 * skb + k_start * skt + hk * skh
    v_base = V + b64 * svb + k_start * svt + hk * svh

    lo = k_len * 0
    hi = k_len
    if HAS_WINDOW:
        lo = tl.maximum(start_m - window, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(hi, start_m + BLOCK_M + window)
    if start_m >= q_len:
        hi = lo

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < k_len
        kt = tl.load(k_base + cols[None, :] * skt + offs_d[:, None] * skd,
                     mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        vt = tl.load(v_base + cols[None, :] * svt + offs_dv[:, None] * svd,
                     mask=col_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
        s = _dot(q, kt, DOT_FP32) * pre_scale
        keep = col_ok[None, :] & row_ok[:, None]
        if HAS_WINDOW:
            diff = offs_m[:, None] - cols[None, :]
            keep = keep & (diff <= window) & (diff >= -window)
        s = tl.where(keep, s, 0.0)
        dp = _dot(do, vt, DOT_FP32)
        ds = tl.where(keep, _act_grad(s, ACT) * qk_scale * dp, 0.0)
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), DOT_FP32)

    dq = dq * pre_scale
    if JAGGED:
        o_mask = row_ok[:, None] & (offs_d[None, :] < D)
    else:
        o_mask = (offs_m[:, None] < T_Q) & (offs_d[None, :] < D)
    tl.store(DQ + b64 * sdqb + (q_start + offs_m[:, None]) * sdqt + h * sdqh + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=o_mask)
