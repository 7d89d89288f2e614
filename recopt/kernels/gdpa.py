"""Triton kernels of GDPA: forward, backward dK/dV, backward dQ.

Kernels only; shapes, block sizes and dispatch live in ``recopt.ops``. One
kernel serves dense padded tensors (``[B, H, T, d]`` with optional per-sample
lengths) and jagged ones (``values [sum T_b, H, d]`` + ``offsets [B+1]``):
every tensor is addressed as ``base + b*stride_b + (start_b + t)*stride_t +
h*stride_h + c*stride_c``, where ``start_b`` is the jagged offset (0 when
dense) and ``stride_b`` is 0 when jagged. Strides may be 0 (broadcast query,
expanded K/V) or arbitrary (transposed views): nothing is copied.

Semantics are those of :func:`recopt.ops.gdpa_ref.gdpa_ref`: scores
``pre_scale * q·k (+ bias)`` in fp32, masked scores (outside the window
``|i-j| <= WINDOW``, causal ``j > i + causal_off``) set to 0, ``act(s)`` cast
to the value dtype, fp32 accumulation, ``qk_scale`` applied to the fp32
accumulators at the end (the reference casts ``act(s) * qk_scale``: the two
differ by at most one rounding of p, and this saves a multiply per score
element). Keys and queries past their lengths are loaded as 0, which needs
no mask since act(0) == 0. Nothing O(T²) is stored: the backward recomputes
the scores.

Grids are flattened to axis 0 (``cdiv(T, BLOCK) * B * H`` programs; CUDA's y
axis stops at 65,535). ``FAST`` (0/1/2) selects exact fp32 math or fast
activations (tanh.approx, a fitted exp2-polynomial GELU) whose error is below
bf16 rounding; tile loops are split so interior tiles carry no mask.

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

# Shared with the softmax kernels. Length masks need no select here: K, V, Q, dO and the bias
# are loaded as 0 past their lengths, and every activation has act(0) == 0 (rows with dO = 0
# or V = 0 contribute nothing to any gradient).
from recopt.kernels._common import _dot, _keep, _kv_range, _load_tile, _q_range, _seq_bounds, _split_pid

# Constants used inside @triton.jit code must be tl.constexpr: triton >= 3.3
# refuses plain module-level globals when it generates code (the CPU
# interpreter does not, which is why tests/test_kernel_compile.py exists).
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


# Fast exact-GELU: Phi(-a) = 0.5 * erfc(a / sqrt 2) = exp2(P(a)) for a = min(|x|, 6), P a
# degree-5 polynomial fitted (weighted least squares toward minimax) to log2 of it on
# [0, 6]. Then gelu(x) = relu(x) - |x| * Phi(-|x|): no division, one MUFU.EX2. Its error
# is <= 2^-9 * |gelu(x)| + 2^-24 (below bf16 rounding) on all of R (max relative error
# 3.7e-4); tests/test_kernel_math.py checks that on a dense grid.
_GP0 = tl.constexpr(-1.000540326)
_GP1 = tl.constexpr(-1.14437247)
_GP2 = tl.constexpr(-0.472807929)
_GP3 = tl.constexpr(-0.042825842)
_GP4 = tl.constexpr(0.004466754)
_GP5 = tl.constexpr(-0.000201652)
_GP_MAX = tl.constexpr(6.0)
_NEG_HALF_LOG2E = tl.constexpr(-0.7213475204444817)
_GT_C0 = tl.constexpr(0.7978845608028654)               # sqrt(2 / pi)
_GT_C1 = tl.constexpr(0.7978845608028654 * 0.044715)


@triton.jit
def _tanh_exact(x):
    # 1 - 2 / (exp(2x) + 1): saturates correctly at +-inf without NaN.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _tanh(x, FAST: tl.constexpr):
    """tanh; FAST == 2: one MUFU.TANH (tanh.approx.f32, sm_75+, abs error ~2^-11)."""
    if FAST == 2:
        out = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                        is_pure=True, pack=1)
    elif FAST == 1:
        # Same formula shape as FAST == 2 but portable (the CPU interpreter has no inline asm).
        out = 1.0 - tl.fdiv(2.0, tl.exp(2.0 * x) + 1.0, ieee_rounding=False)
    else:
        out = _tanh_exact(x)
    return out


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    """2^x; FAST == 2: ex2.approx.ftz.f32 (one MUFU.EX2, no denormal fix-up)."""
    if FAST == 2:
        out = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                        is_pure=True, pack=1)
    else:
        out = tl.exp2(x)
    return out


@triton.jit
def _phi_neg_abs(s, FAST: tl.constexpr):
    """Phi(-|s|) (normal CDF) by the fitted exp2-polynomial above."""
    a = tl.minimum(tl.abs(s), _GP_MAX)
    p = _GP4 + a * _GP5
    p = _GP3 + a * p
    p = _GP2 + a * p
    p = _GP1 + a * p
    p = _GP0 + a * p
    return _exp2(p, FAST)


@triton.jit
def _act(s, ACT: tl.constexpr, FAST: tl.constexpr):
    """act(s); codes as in recopt.ops.gdpa_ref.ACTIVATIONS.

    FAST (0 exact fp32 math, 1 fast formulas, 2 fast formulas + tanh.approx)
    changes gelu, gelu_tanh and silu only; its error is below bf16 rounding.
    """
    if ACT == 1:
        if FAST != 0:
            out = tl.maximum(s, 0.0) - tl.abs(s) * _phi_neg_abs(s, FAST)
        else:
            out = 0.5 * s * (1.0 + tl.erf(s * _SQRT1_2))
    elif ACT == 2:
        hs = 0.5 * s
        out = hs + hs * _tanh((_GT_C0 + _GT_C1 * (s * s)) * s, FAST)
    elif ACT == 3:
        if FAST != 0:
            hs = 0.5 * s
            out = hs + hs * _tanh(hs, FAST)      # s * sigmoid(s), sigmoid(s) = (1 + tanh(s/2)) / 2
        else:
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
def _act_grad(s, ACT: tl.constexpr, FAST: tl.constexpr):
    """d act(s) / ds."""
    if ACT == 1:
        if FAST != 0:
            h = _phi_neg_abs(s, FAST)
            phi = tl.where(s >= 0.0, 1.0 - h, h)
            out = phi + s * _exp2(_NEG_HALF_LOG2E * (s * s), FAST) * _INV_SQRT_2PI
        else:
            out = 0.5 * (1.0 + tl.erf(s * _SQRT1_2)) + s * tl.exp(-0.5 * s * s) * _INV_SQRT_2PI
    elif ACT == 2:
        t = _tanh((_GT_C0 + _GT_C1 * (s * s)) * s, FAST)
        out = 0.5 * (1.0 + t) + 0.5 * s * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 0.134145 * s * s)
    elif ACT == 3:
        if FAST != 0:
            sig = 0.5 + 0.5 * _tanh(0.5 * s, FAST)
        else:
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
def _fwd_tile(acc, q, k_base, v_base, bias_base, offs_m, start_n, offs_n, offs_d, offs_dv,
              q_len, k_len, D, DV, skt, skd, svt, svd, sbq, sbk,
              qk_scale, pre_scale, window, causal_off,
              ACT: tl.constexpr, FAST: tl.constexpr, HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr):
    """One key tile. MASKED: bounds-checked loads and the positional mask; interior tiles
    (all keys valid, fully kept) skip both."""
    cols = start_n + offs_n
    col_ok = cols < k_len
    kt = _load_tile(k_base + cols[None, :] * skt + offs_d[:, None] * skd, col_ok[None, :],
                    offs_d[:, None] < D, MASKED, EVEN_D)
    s = _dot(q, kt, DOT_FP32) * pre_scale
    if HAS_BIAS:
        s += tl.load(bias_base + offs_m[:, None] * sbq + cols[None, :] * sbk,
                     mask=(offs_m[:, None] < q_len) & col_ok[None, :], other=0.0).to(tl.float32)
    if MASKED and (HAS_WINDOW or CAUSAL):
        s = tl.where(_keep(offs_m[:, None], cols[None, :], window, causal_off, HAS_WINDOW, CAUSAL), s, 0.0)
    p = _act(s, ACT, FAST)
    vb = _load_tile(v_base + cols[:, None] * svt + offs_dv[None, :] * svd, col_ok[:, None],
                    offs_dv[None, :] < DV, MASKED, EVEN_D)
    return acc + _dot(p.to(vb.dtype), vb, DOT_FP32)


@triton.jit
def gdpa_fwd_kernel(
    Q, K, V, O, QOFF, KOFF, QLEN, KLEN, BIAS,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    sob, sot, soh, sod,
    sbb, sbh, sbq, sbk,
    H, GROUP, T_Q, T_K, D, DV,
    qk_scale, pre_scale, window, causal_off,
    ACT: tl.constexpr, JAGGED: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_KLEN: tl.constexpr,
    HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    FAST: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """o[b, h, i] = sum_j cast(act(s_ij) * qk_scale) v_j. Grid: (cdiv(T_Q, BLOCK_M) * B * H,).

    ``s_ij = pre_scale * q_i.k_j + bias[b, h, i, j]`` (bias optional, any
    strides, 0 for broadcast dims), then 0 where masked (window, causal:
    ``j > i + causal_off``).
    """
    pid_m, b, h = _split_pid(T_Q, H, BLOCK_M)
    hk = h // GROUP
    q_start, q_len = _seq_bounds(QOFF, QLEN, b, T_Q, JAGGED, HAS_QLEN)
    k_start, k_len = _seq_bounds(KOFF, KLEN, b, T_K, JAGGED, HAS_KLEN)
    start_m = pid_m * BLOCK_M
    b64 = b.to(tl.int64)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < q_len

    q_ptrs = (Q + b64 * sqb + (q_start + offs_m[:, None]) * sqt + h * sqh + offs_d[None, :] * sqd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + b64 * skb + k_start * skt + hk * skh
    v_base = V + b64 * svb + k_start * svt + hk * svh
    bias_base = BIAS + b64 * sbb + h * sbh
    lo, mid, hi = _kv_range(start_m, q_len, k_len, window, causal_off, HAS_WINDOW, CAUSAL, BLOCK_M, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(lo, mid, BLOCK_N):
        acc = _fwd_tile(acc, q, k_base, v_base, bias_base, offs_m, start_n, offs_n, offs_d, offs_dv,
                        q_len, k_len, D, DV, skt, skd, svt, svd, sbq, sbk, qk_scale, pre_scale, window,
                        causal_off, ACT, FAST, HAS_WINDOW, CAUSAL, HAS_BIAS, DOT_FP32, EVEN_D, False)
    for start_n in range(mid, hi, BLOCK_N):
        acc = _fwd_tile(acc, q, k_base, v_base, bias_base, offs_m, start_n, offs_n, offs_d, offs_dv,
                        q_len, k_len, D, DV, skt, skd, svt, svd, sbq, sbk, qk_scale, pre_scale, window,
                        causal_off, ACT, FAST, HAS_WINDOW, CAUSAL, HAS_BIAS, DOT_FP32, EVEN_D, True)

    acc = tl.where(row_ok[:, None], acc * qk_scale, 0.0)
    o_ptrs = (O + b64 * sob + (q_start + offs_m[:, None]) * sot + h * soh + offs_dv[None, :] * sod)
    if JAGGED:
        o_mask = row_ok[:, None] & (offs_dv[None, :] < DV)
    else:
        o_mask = (offs_m[:, None] < T_Q) & (offs_dv[None, :] < DV)
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=o_mask)


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, bias_base, dq_base, db_base, offs_n, start_m, offs_m, offs_d,
               offs_dv, q_len, k_len, D, DV, sqt, sqd, sdot, sdod, sbq, sbk, sdqt, sdqd, sdbq, sdbk,
               qk_scale, pre_scale, window, causal_off,
               ACT: tl.constexpr, FAST: tl.constexpr, HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_D: tl.constexpr,
               MASKED: tl.constexpr, MASK_POS: tl.constexpr, OUT_DK: tl.constexpr, OUT_DV: tl.constexpr,
               OUT_DQ: tl.constexpr, DBIAS: tl.constexpr, DB_SUM_Q: tl.constexpr, DB_SUM_K: tl.constexpr):
    """One query tile. MASKED: bounds-checked loads; MASK_POS: the positional mask.
    OUT_DK / OUT_DV: which gradients this program accumulates. OUT_DQ (the one-launch
    backward): also ``dS^T K`` of the tile, added atomically (fp32) into the dQ accumulator
    at ``dq_base`` (unscaled: the caller multiplies by ``pre_scale * qk_scale`` when it
    casts). DBIAS / DB_SUM_Q / DB_SUM_K: the bias gradient of the tile, as in
    :func:`_dq_tile` but on the transposed (keys x queries) tile."""
    rows = start_m + offs_m
    row_ok = rows < q_len
    qt = _load_tile(q_base + rows[None, :] * sqt + offs_d[:, None] * sqd, row_ok[None, :],
                    offs_d[:, None] < D, MASKED, EVEN_D)
    do = _load_tile(do_base + rows[:, None] * sdot + offs_dv[None, :] * sdod, row_ok[:, None],
                    offs_dv[None, :] < DV, MASKED, EVEN_D)
    st = _dot(k, qt, DOT_FP32) * pre_scale          # [BLOCK_N, BLOCK_M]
    if HAS_BIAS:
        st += tl.load(bias_base + rows[None, :] * sbq + offs_n[:, None] * sbk,
                      mask=row_ok[None, :] & (offs_n[:, None] < k_len), other=0.0).to(tl.float32)
    if MASK_POS:
        keep = _keep(rows[None, :], offs_n[:, None], window, causal_off, HAS_WINDOW, CAUSAL)
        st = tl.where(keep, st, 0.0)
    if OUT_DV:
        pt = _act(st, ACT, FAST)
        dv += _dot(pt.to(v.dtype), do, DOT_FP32)
    if OUT_DK or OUT_DQ or (HAS_BIAS and DBIAS != 0):
        dpt = _dot(v, tl.trans(do), DOT_FP32)            # [BLOCK_N, BLOCK_M]
        dst = _act_grad(st, ACT, FAST) * dpt
        if MASK_POS:
            dst = tl.where(keep, dst, 0.0)
        if HAS_BIAS and DBIAS != 0:
            # rows past q_len and keys past k_len have dP == 0 (dO, V loaded as 0): dst is 0 there
            dbt = dst * qk_scale
            if DB_SUM_Q and DB_SUM_K:
                tl.atomic_add(db_base, tl.sum(tl.sum(dbt, axis=1), axis=0))
            elif DB_SUM_Q:
                tl.atomic_add(db_base + offs_n * sdbk, tl.sum(dbt, axis=1), mask=offs_n < k_len)
            elif DB_SUM_K:
                tl.atomic_add(db_base + rows * sdbq, tl.sum(dbt, axis=0), mask=row_ok)
            else:
                db_ptrs = db_base + rows[None, :] * sdbq + offs_n[:, None] * sdbk
                db_ok = row_ok[None, :] & (offs_n[:, None] < k_len)
                if DBIAS == 1:
                    tl.store(db_ptrs, dbt.to(db_base.dtype.element_ty), mask=db_ok)
                else:
                    tl.atomic_add(db_ptrs, dbt, mask=db_ok)
        dsc = dst.to(qt.dtype)
        if OUT_DK:
            dk += _dot(dsc, tl.trans(qt), DOT_FP32)
        if OUT_DQ:
            # dQ^T = K^T dS: [BLOCK_D, BLOCK_M]. As K^T dS (not dS^T K) the GEMM's M is the head
            # size (>= 64 on the tensor-core paths) rather than the narrow query step, so sm_90
            # takes wgmma with K^T from shared memory instead of mma.sync with K in registers
            dqt = _dot(tl.trans(k), dsc, DOT_FP32)
            dq_ptrs = dq_base + rows[None, :] * sdqt + offs_d[:, None] * sdqd
            if MASKED:
                tl.atomic_add(dq_ptrs, dqt, mask=row_ok[None, :] & (offs_d[:, None] < D))
            elif EVEN_D:
                tl.atomic_add(dq_ptrs, dqt)
            else:
                tl.atomic_add(dq_ptrs, dqt, mask=offs_d[:, None] < D)
    return dk, dv


@triton.jit
def _dkdv_region(dk, dv, k, v, q_b, do_b, bias_b, dq_b, db_b, hk, GROUP, start, stop, offs_n, offs_m, offs_d,
                 offs_dv, q_len, k_len, D, DV, sqh, sqt, sqd, sdoh, sdot, sdod, sbh, sbq, sbk,
                 sdqh, sdqt, sdqd, sdbh, sdbq, sdbk, qk_scale, pre_scale, window, causal_off,
                 ACT: tl.constexpr, FAST: tl.constexpr, HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_D: tl.constexpr,
                 MASKED: tl.constexpr, MASK_POS: tl.constexpr, OUT_DK: tl.constexpr, OUT_DV: tl.constexpr,
                 OUT_DQ: tl.constexpr, DBIAS: tl.constexpr, DB_SUM_Q: tl.constexpr, DB_SUM_K: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """Query tiles [start, stop) of each of the GROUP query heads of K/V head hk, as one flat
    loop (tile counter t and head g carried, no division)."""
    n = tl.cdiv(stop - start, BLOCK_M)
    t = n * 0
    g = n * 0
    for _ in range(0, GROUP * n):
        h = hk * GROUP + g
        dk, dv = _dkdv_tile(dk, dv, k, v, q_b + h * sqh, do_b + h * sdoh, bias_b + h * sbh, dq_b + h * sdqh,
                            db_b + h * sdbh, offs_n, start + t * BLOCK_M, offs_m, offs_d, offs_dv, q_len, k_len,
                            D, DV, sqt, sqd, sdot, sdod, sbq, sbk, sdqt, sdqd, sdbq, sdbk, qk_scale, pre_scale,
                            window, causal_off, ACT, FAST, HAS_WINDOW, CAUSAL, HAS_BIAS, DOT_FP32, EVEN_D,
                            MASKED, MASK_POS, OUT_DK, OUT_DV, OUT_DQ, DBIAS, DB_SUM_Q, DB_SUM_K)
        t += 1
        wrap = t == n
        g = tl.where(wrap, g + 1, g)
        t = tl.where(wrap, 0, t)
    return dk, dv


@triton.jit
def _bwd_kv_block(Q, K, V, DO, DK, DV_, DQ, DB, QOFF, KOFF, QLEN, KLEN, BIAS,
                  sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sdob, sdot, sdoh, sdod,
                  sdkb, sdkt, sdkh, sdkd, sdvb, sdvt, sdvh, sdvd, sdqb, sdqt, sdqh, sdqd,
                  sbb, sbh, sbq, sbk, sdbb, sdbh, sdbq, sdbk,
                  H, GROUP, T_Q, T_K, D, DV, qk_scale, pre_scale, window, causal_off,
                  ACT: tl.constexpr, JAGGED: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_KLEN: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                  FAST: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_D: tl.constexpr,
                  OUT_DK: tl.constexpr, OUT_DV: tl.constexpr, OUT_DQ: tl.constexpr,
                  DBIAS: tl.constexpr, DB_SUM_Q: tl.constexpr, DB_SUM_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The body both backward kernels share: one block of keys of one K/V head, its query
    tiles walked over the GROUP query heads; dK/dV accumulated and stored, dQ / dbias
    added atomically when OUT_DQ / DBIAS."""
    HKV = H // GROUP
    pid_n, b, hk = _split_pid(T_K, HKV, BLOCK_N)
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
    dk = tl.zeros([BLOCK_N, BLOCK_D if OUT_DK else 16], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV if OUT_DV else 16], dtype=tl.float32)
    lo, mid, full, hi = _q_range(start_n, q_len, k_len, window, causal_off, HAS_WINDOW, CAUSAL,
                                 BLOCK_M, BLOCK_N)

    # One flat loop per region over (query head of the group, query tile): a loop nested in
    # a GROUP loop kept dK/dV out of the pipeliner's reach (spills at GQA on sm_90 and sm_100).
    q_b = Q + b64 * sqb + q_start * sqt
    do_b = DO + b64 * sdob + q_start * sdot
    bias_b = BIAS + b64 * sbb
    dq_b = DQ + b64 * sdqb + q_start * sdqt
    db_b = DB + b64 * sdbb
    if HAS_WINDOW or CAUSAL:
        dk, dv = _dkdv_region(dk, dv, k, v, q_b, do_b, bias_b, dq_b, db_b, hk, GROUP, lo, mid, offs_n, offs_m,
                              offs_d, offs_dv, q_len, k_len, D, DV, sqh, sqt, sqd, sdoh, sdot, sdod, sbh, sbq,
                              sbk, sdqh, sdqt, sdqd, sdbh, sdbq, sdbk, qk_scale, pre_scale, window, causal_off,
                              ACT, FAST, HAS_WINDOW, CAUSAL, HAS_BIAS, DOT_FP32, EVEN_D, True, True, OUT_DK,
                              OUT_DV, OUT_DQ, DBIAS, DB_SUM_Q, DB_SUM_K, BLOCK_M)
    dk, dv = _dkdv_region(dk, dv, k, v, q_b, do_b, bias_b, dq_b, db_b, hk, GROUP, mid, full, offs_n, offs_m,
                          offs_d, offs_dv, q_len, k_len, D, DV, sqh, sqt, sqd, sdoh, sdot, sdod, sbh, sbq,
                          sbk, sdqh, sdqt, sdqd, sdbh, sdbq, sdbk, qk_scale, pre_scale, window, causal_off,
                          ACT, FAST, HAS_WINDOW, CAUSAL, HAS_BIAS, DOT_FP32, EVEN_D, False, False, OUT_DK,
                          OUT_DV, OUT_DQ, DBIAS, DB_SUM_Q, DB_SUM_K, BLOCK_M)
    dk, dv = _dkdv_region(dk, dv, k, v, q_b, do_b, bias_b, dq_b, db_b, hk, GROUP, full, hi, offs_n, offs_m,
                          offs_d, offs_dv, q_len, k_len, D, DV, sqh, sqt, sqd, sdoh, sdot, sdod, sbh, sbq,
                          sbk, sdqh, sdqt, sdqd, sdbh, sdbq, sdbk, qk_scale, pre_scale, window, causal_off,
                          ACT, FAST, HAS_WINDOW, CAUSAL, HAS_BIAS, DOT_FP32, EVEN_D, True, False, OUT_DK,
                          OUT_DV, OUT_DQ, DBIAS, DB_SUM_Q, DB_SUM_K, BLOCK_M)

    dk = dk * (pre_scale * qk_scale)
    dv = dv * qk_scale
    if JAGGED:
        row_mask = col_ok[:, None]
    else:
        row_mask = offs_n[:, None] < T_K
    if OUT_DK:
        tl.store(DK + b64 * sdkb + (k_start + offs_n[:, None]) * sdkt + hk * sdkh + offs_d[None, :] * sdkd,
                 dk.to(DK.dtype.element_ty), mask=row_mask & (offs_d[None, :] < D))
    if OUT_DV:
        tl.store(DV_ + b64 * sdvb + (k_start + offs_n[:, None]) * sdvt + hk * sdvh + offs_dv[None, :] * sdvd,
                 dv.to(DV_.dtype.element_ty), mask=row_mask & (offs_dv[None, :] < DV))


@triton.jit
def gdpa_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV_, QOFF, KOFF, QLEN, KLEN, BIAS,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    sdob, sdot, sdoh, sdod,
    sdkb, sdkt, sdkh, sdkd,
    sdvb, sdvt, sdvh, sdvd,
    sbb, sbh, sbq, sbk,
    H, GROUP, T_Q, T_K, D, DV,
    qk_scale, pre_scale, window, causal_off,
    ACT: tl.constexpr, JAGGED: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_KLEN: tl.constexpr,
    HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    FAST: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_D: tl.constexpr,
    OUT_DK: tl.constexpr, OUT_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dK, dV for one block of keys of one K/V head, summed over its GROUP query heads
    (the first launch of the two-launch backward; :func:`gdpa_bwd_dq_kernel` is the second).

    Grid: (cdiv(T_K, BLOCK_N) * B * Hkv,). Works on transposed tiles (keys as rows).
    OUT_DK / OUT_DV select the outputs: both (4 GEMMs per tile), or one per launch for
    large head sizes (d = 256), where dK and dV together do not fit in registers.
    """
    _bwd_kv_block(Q, K, V, DO, DK, DV_, Q, Q, QOFF, KOFF, QLEN, KLEN, BIAS,
                  sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sdob, sdot, sdoh, sdod,
                  sdkb, sdkt, sdkh, sdkd, sdvb, sdvt, sdvh, sdvd, 0, 0, 0, 0,
                  sbb, sbh, sbq, sbk, 0, 0, 0, 0,
                  H, GROUP, T_Q, T_K, D, DV, qk_scale, pre_scale, window, causal_off,
                  ACT, JAGGED, HAS_QLEN, HAS_KLEN, HAS_WINDOW, CAUSAL, HAS_BIAS, FAST, DOT_FP32, EVEN_D,
                  OUT_DK, OUT_DV, False, 0, False, False, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)


@triton.jit
def gdpa_bwd_fused_kernel(
    Q, K, V, DO, DK, DV_, DQ, DB, QOFF, KOFF, QLEN, KLEN, BIAS,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    sdob, sdot, sdoh, sdod,
    sdkb, sdkt, sdkh, sdkd,
    sdvb, sdvt, sdvh, sdvd,
    sdqb, sdqt, sdqh, sdqd,
    sbb, sbh, sbq, sbk,
    sdbb, sdbh, sdbq, sdbk,
    H, GROUP, T_Q, T_K, D, DV,
    qk_scale, pre_scale, window, causal_off,
    ACT: tl.constexpr, JAGGED: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_KLEN: tl.constexpr,
    HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    FAST: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_D: tl.constexpr,
    OUT_DK: tl.constexpr, OUT_DV: tl.constexpr, OUT_DQ: tl.constexpr,
    DBIAS: tl.constexpr, DB_SUM_Q: tl.constexpr, DB_SUM_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """The one-launch backward: per block of keys of one K/V head and each query tile of
    its GROUP query heads, S = QK^T, act(S), dV += act(S)^T dO, dP = dO V^T,
    dS = dP * act'(S), dK += dS^T Q and dQ += dS K: five GEMM-units per score element
    (the two-launch backward recomputes S and dP for dQ: seven).

    Grid: (cdiv(T_K, BLOCK_N) * B * Hkv,). dQ goes into ``DQ``, an fp32 accumulator the
    caller zero-fills, by atomic adds, unscaled (the caller multiplies by ``pre_scale *
    qk_scale`` as it casts to q's dtype); the order of the adds, so the last bits of dQ, may
    differ run to run. With DBIAS != 0 the bias gradient too (see :func:`_dq_tile`; stored
    when DBIAS == 1, full-shape bias, every element visited once; atomic when 2). d = 256:
    two launches of this kernel (OUT_DK + OUT_DQ + dbias, then OUT_DV), six GEMM-units.
    """
    _bwd_kv_block(Q, K, V, DO, DK, DV_, DQ, DB, QOFF, KOFF, QLEN, KLEN, BIAS,
                  sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sdob, sdot, sdoh, sdod,
                  sdkb, sdkt, sdkh, sdkd, sdvb, sdvt, sdvh, sdvd, sdqb, sdqt, sdqh, sdqd,
                  sbb, sbh, sbq, sbk, sdbb, sdbh, sdbq, sdbk,
                  H, GROUP, T_Q, T_K, D, DV, qk_scale, pre_scale, window, causal_off,
                  ACT, JAGGED, HAS_QLEN, HAS_KLEN, HAS_WINDOW, CAUSAL, HAS_BIAS, FAST, DOT_FP32, EVEN_D,
                  OUT_DK, OUT_DV, OUT_DQ, DBIAS, DB_SUM_Q, DB_SUM_K, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)


@triton.jit
def _dq_tile(dq, q, do, k_base, v_base, bias_base, db_base, offs_m, start_n, offs_n, offs_d, offs_dv,
             q_len, k_len, D, DV, skt, skd, svt, svd, sbq, sbk, sdbq, sdbk,
             qk_scale, pre_scale, window, causal_off,
             ACT: tl.constexpr, FAST: tl.constexpr, HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr,
             HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
             DBIAS: tl.constexpr, DB_SUM_Q: tl.constexpr, DB_SUM_K: tl.constexpr):
    """One key tile of dQ. DBIAS (with HAS_BIAS): also the bias gradient of the tile,
    ``qk_scale * act'(s) * dP`` (0 where masked): 1 stores it (the bias has the full
    [B, H, Tq, Tk] shape, every element is visited once), 2 adds it atomically to an fp32
    buffer (a bias broadcast over B or H); DB_SUM_Q / DB_SUM_K: the bias is broadcast over
    queries / keys, the tile is summed over that axis first."""
    cols = start_n + offs_n
    col_ok = cols < k_len
    kt = _load_tile(k_base + cols[None, :] * skt + offs_d[:, None] * skd, col_ok[None, :],
                    offs_d[:, None] < D, MASKED, EVEN_D)
    vt = _load_tile(v_base + cols[None, :] * svt + offs_dv[:, None] * svd, col_ok[None, :],
                    offs_dv[:, None] < DV, MASKED, EVEN_D)
    s = _dot(q, kt, DOT_FP32) * pre_scale
    if HAS_BIAS:
        s += tl.load(bias_base + offs_m[:, None] * sbq + cols[None, :] * sbk,
                     mask=(offs_m[:, None] < q_len) & col_ok[None, :], other=0.0).to(tl.float32)
    if MASKED and (HAS_WINDOW or CAUSAL):
        keep = _keep(offs_m[:, None], cols[None, :], window, causal_off, HAS_WINDOW, CAUSAL)
        s = tl.where(keep, s, 0.0)
    dp = _dot(do, vt, DOT_FP32)
    ds = _act_grad(s, ACT, FAST) * dp
    if MASKED and (HAS_WINDOW or CAUSAL):
        ds = tl.where(keep, ds, 0.0)
    if HAS_BIAS and DBIAS != 0:
        # rows past q_len and keys past k_len have dP == 0 (dO, V loaded as 0): ds is 0 there
        dbt = ds * qk_scale
        if DB_SUM_Q and DB_SUM_K:
            tl.atomic_add(db_base, tl.sum(tl.sum(dbt, axis=1), axis=0))
        elif DB_SUM_Q:
            tl.atomic_add(db_base + cols * sdbk, tl.sum(dbt, axis=0), mask=col_ok)
        elif DB_SUM_K:
            tl.atomic_add(db_base + offs_m * sdbq, tl.sum(dbt, axis=1), mask=offs_m < q_len)
        else:
            db_ptrs = db_base + offs_m[:, None] * sdbq + cols[None, :] * sdbk
            db_ok = (offs_m[:, None] < q_len) & col_ok[None, :]
            if DBIAS == 1:
                tl.store(db_ptrs, dbt.to(db_base.dtype.element_ty), mask=db_ok)
            else:
                tl.atomic_add(db_ptrs, dbt, mask=db_ok)
    return dq + _dot(ds.to(kt.dtype), tl.trans(kt), DOT_FP32)


@triton.jit
def gdpa_bwd_dq_kernel(
    Q, K, V, DO, DQ, QOFF, KOFF, QLEN, KLEN, BIAS, DB,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    sdob, sdot, sdoh, sdod,
    sdqb, sdqt, sdqh, sdqd,
    sbb, sbh, sbq, sbk,
    sdbb, sdbh, sdbq, sdbk,
    H, GROUP, T_Q, T_K, D, DV,
    qk_scale, pre_scale, window, causal_off,
    ACT: tl.constexpr, JAGGED: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_KLEN: tl.constexpr,
    HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    FAST: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_D: tl.constexpr,
    DBIAS: tl.constexpr, DB_SUM_Q: tl.constexpr, DB_SUM_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dQ for one block of query rows of one head. Grid: (cdiv(T_Q, BLOCK_M) * B * H,).

    With DBIAS != 0 also the bias gradient ``dbias[b, h, i, j] = qk_scale * act'(s_ij) *
    dP_ij`` (see :func:`_dq_tile`) into ``DB`` (strides ``sdb*``, 0 for broadcast dims).
    Score tiles the loop skips (fully masked, past the lengths) are not written: the
    caller zero-fills ``DB``.
    """
    pid_m, b, h = _split_pid(T_Q, H, BLOCK_M)
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
    bias_base = BIAS + b64 * sbb + h * sbh
    db_base = DB + b64 * sdbb + h * sdbh
    lo, mid, hi = _kv_range(start_m, q_len, k_len, window, causal_off, HAS_WINDOW, CAUSAL, BLOCK_M, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, mid, BLOCK_N):
        dq = _dq_tile(dq, q, do, k_base, v_base, bias_base, db_base, offs_m, start_n, offs_n, offs_d,
                      offs_dv, q_len, k_len, D, DV, skt, skd, svt, svd, sbq, sbk, sdbq, sdbk, qk_scale,
                      pre_scale, window, causal_off, ACT, FAST, HAS_WINDOW, CAUSAL, HAS_BIAS, DOT_FP32,
                      EVEN_D, False, DBIAS, DB_SUM_Q, DB_SUM_K)
    for start_n in range(mid, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, k_base, v_base, bias_base, db_base, offs_m, start_n, offs_n, offs_d,
                      offs_dv, q_len, k_len, D, DV, skt, skd, svt, svd, sbq, sbk, sdbq, sdbk, qk_scale,
                      pre_scale, window, causal_off, ACT, FAST, HAS_WINDOW, CAUSAL, HAS_BIAS, DOT_FP32,
                      EVEN_D, True, DBIAS, DB_SUM_Q, DB_SUM_K)

    dq = dq * (pre_scale * qk_scale)
    if JAGGED:
        o_mask = row_ok[:, None] & (offs_d[None, :] < D)
    else:
        o_mask = (offs_m[:, None] < T_Q) & (offs_d[None, :] < D)
    tl.store(DQ + b64 * sdqb + (q_start + offs_m[:, None]) * sdqt + h * sdqh + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=o_mask)
