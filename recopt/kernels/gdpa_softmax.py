"""Triton kernels of softmax GDPA: online-softmax (flash-style) forward, backward.

Kernels only; shapes, configs and dispatch live in ``recopt.ops``. The
addressing, grids and masks are those of :mod:`recopt.kernels.gdpa` (dense
``[B, H, T, d]`` with optional lengths, or jagged ``values [sum T_b, H, d]`` +
``offsets``; arbitrary strides, 0 for broadcast; grid flattened to axis 0;
GQA by ``GROUP`` query heads per K/V head); the shared helpers live in
:mod:`recopt.kernels._common`. Only tiles that hold a kept score run: key tiles
past a sample's key length, query tiles past its query length and tiles outside
the window/causal band are skipped, and tiles fully inside the lengths and the
band run without masks (tests/test_gdpa_softmax_tiles.py traces them).

Semantics, per sample b, head h, query row i (those of
:func:`recopt.ops.gdpa_ref.softmax_attention` with ``masked_rows`` "zero" or,
with ``DEAD_NAN``, "nan"/"uniform")::

    s_ij = pre_scale * q_i.k_j + bias[b,h,i,j]            (fp32)
    s_ij = -inf  if j >= kv_len[b], |i - j| > WINDOW, or j > i + causal_off
    o_i  = qk_scale * sum_j softmax_j(s_i.) v_j           (rows i >= q_len[b]: 0)

A row whose every score is -inf ("dead") gives 0 and no gradient, except with
``DEAD_NAN``, where a row that has kept keys but whose bias is -inf on all of
them gives NaN (and NaN gradients), as a model's own softmax does. A row with
no kept key at all is always 0 here: the op layer fills it (mean of v, or NaN)
with plain torch ops so its gradient is exactly the reference's.

The forward saves, per row, the running max ``M`` (in log2 units) and the
reciprocal ``1/L`` of the sum ``L`` of ``exp2(s·log2e - M)`` separately, not
their log-sum-exp: with a finite fill such as ``-1e9`` a fully-masked row has
``M ≈ -1.4e9``, where an fp32 log-sum-exp cannot hold the ``log2(L)`` term (ulp
128) and the backward would recompute probabilities of 1 instead of ``1/L``
(the failure of SDPA's fused backward that docs/gdpa.md describes). Saving
``1/L`` (one division per row, in the forward's epilogue) leaves the backward a
multiply per score element, no reciprocal. Dead rows store ``M = +inf``,
``1/L = 1`` so the backward recomputes p = 0 for them.

Backward: ``D_i = sum_c dO_ic O_ic`` (:func:`gdpa_softmax_bwd_pre_kernel`),
then ``dS = P ∘ (qk_scale · dO Vᵀ - D)``; dK/dV per key block (walks query
tiles, sums the GROUP query heads; no atomics) and dQ per query block (walks
key tiles), recomputing the scores from Q, K and the saved ``M``, ``1/L``.
"""
import triton
import triton.language as tl

from recopt.kernels._common import _dot, _keep, _kv_range, _load_tile, _q_range, _seq_bounds, _split_pid

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _row_has_key(rows, k_len, window, causal_off, HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr):
    """Per query row (position in the sample): does any key survive lengths, window and causal?"""
    lo = rows * 0
    hi = rows * 0 + k_len - 1
    if HAS_WINDOW:
        lo = tl.maximum(rows - window, 0)
        hi = tl.minimum(hi, rows + window)
    if CAUSAL:
        hi = tl.minimum(hi, rows + causal_off)
    return lo <= hi


@triton.jit
def _scores(q, kt, bias_base, rows, cols, q_len, k_len, sbq, sbk, pre_log2, window, causal_off,
            HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
            DOT_FP32: tl.constexpr, MASKED: tl.constexpr):
    """Score tile in log2 units, [rows, cols] = q @ kt (kt: [d, cols]); -inf where masked.
    MASKED: the tile may hold keys past k_len or positions outside the window/causal band."""
    s = _dot(q, kt, DOT_FP32) * pre_log2
    if HAS_BIAS:
        s += tl.load(bias_base + rows[:, None] * sbq + cols[None, :] * sbk,
                     mask=(rows[:, None] < q_len) & (cols[None, :] < k_len), other=0.0).to(tl.float32) * _LOG2E
    if MASKED:
        keep = _keep(rows[:, None], cols[None, :], window, causal_off, HAS_WINDOW, CAUSAL)
        keep = keep & (cols[None, :] < k_len)
        s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_base, v_base, bias_base, offs_m, start_n, offs_n, offs_d, offs_dv,
              q_len, k_len, D, DV, skt, skd, svt, svd, sbq, sbk, pre_log2, window, causal_off,
              HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
              DOT_FP32: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of the online softmax: rescale the running (acc, l) by exp2(m_old - m_new)."""
    cols = start_n + offs_n
    col_ok = cols < k_len
    kt = _load_tile(k_base + cols[None, :] * skt + offs_d[:, None] * skd, col_ok[None, :],
                    offs_d[:, None] < D, MASKED, EVEN_D)
    s = _scores(q, kt, bias_base, offs_m, cols, q_len, k_len, sbq, sbk, pre_log2, window, causal_off,
                HAS_WINDOW, CAUSAL, HAS_BIAS, DOT_FP32, MASKED)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # all scores so far -inf: subtract 0 instead (exp2(-inf - -inf) would be NaN)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    vb = _load_tile(v_base + cols[:, None] * svt + offs_dv[None, :] * svd, col_ok[:, None],
                    offs_dv[None, :] < DV, MASKED, EVEN_D)
    acc = acc * alpha[:, None] + _dot(p.to(vb.dtype), vb, DOT_FP32)
    return acc, m_new, l_i


@triton.jit
def gdpa_softmax_fwd_kernel(
    Q, K, V, O, M, L, QOFF, KOFF, QLEN, KLEN, BIAS,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    sob, sot, soh, sod,
    smb, smt, smh,
    sbb, sbh, sbq, sbk,
    H, GROUP, T_Q, T_K, D, DV,
    qk_scale, pre_scale, window, causal_off,
    JAGGED: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_KLEN: tl.constexpr,
    HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, DEAD_NAN: tl.constexpr,
    DOT_FP32: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """o = qk_scale · softmax(s) v, plus the row statistics M (log2 units) and 1/L.

    Grid: (cdiv(T_Q, BLOCK_M) * B * H,). M and L are fp32, addressed like a
    tensor with strides (smb, smt, smh) — dense [B, H, T_Q], jagged [H, N].
    """
    pid_m, b, h = _split_pid(T_Q, H, BLOCK_M)
    hk = h // GROUP
    q_start, q_len = _seq_bounds(QOFF, QLEN, b, T_Q, JAGGED, HAS_QLEN)
    k_start, k_len = _seq_bounds(KOFF, KLEN, b, T_K, JAGGED, HAS_KLEN)
    start_m = pid_m * BLOCK_M
    b64 = b.to(tl.int64)
    pre_log2 = pre_scale * _LOG2E

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < q_len

    q = tl.load(Q + b64 * sqb + (q_start + offs_m[:, None]) * sqt + h * sqh + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + b64 * skb + k_start * skt + hk * skh
    v_base = V + b64 * svb + k_start * svt + hk * svh
    bias_base = BIAS + b64 * sbb + h * sbh
    lo, mid, hi = _kv_range(start_m, q_len, k_len, window, causal_off, HAS_WINDOW, CAUSAL, BLOCK_M, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + float("-inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(lo, mid, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, bias_base, offs_m, start_n, offs_n,
                                  offs_d, offs_dv, q_len, k_len, D, DV, skt, skd, svt, svd, sbq, sbk,
                                  pre_log2, window, causal_off,
                                  HAS_WINDOW, CAUSAL, HAS_BIAS, DOT_FP32, EVEN_D, False)
    for start_n in range(mid, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, bias_base, offs_m, start_n, offs_n,
                                  offs_d, offs_dv, q_len, k_len, D, DV, skt, skd, svt, svd, sbq, sbk,
                                  pre_log2, window, causal_off,
                                  HAS_WINDOW, CAUSAL, HAS_BIAS, DOT_FP32, EVEN_D, True)

    dead = (m_i == float("-inf")) | (row_ok == 0)
    # 1/L once per row (l_i >= 1 on a live row: its max term is exp2(0)); the backward
    # multiplies by it, no division per score element
    if DEAD_NAN:
        # kept keys, all with a -inf bias: NaN, as the model's softmax (M = -inf, 1/L = inf make
        # the backward NaN too); rows with no kept key at all stay 0 (filled by the op layer)
        nan_row = (m_i == float("-inf")) & row_ok & _row_has_key(offs_m, k_len, window, causal_off,
                                                                  HAS_WINDOW, CAUSAL)
        dead = dead & (nan_row == 0)
        l_inv = tl.where(dead, 1.0, tl.where(nan_row, float("inf"), 1.0 / l_i))
        m_out = tl.where(dead, float("inf"), m_i)
        o = tl.where(nan_row[:, None], float("nan"), acc * l_inv[:, None])
    else:
        l_inv = tl.where(dead, 1.0, 1.0 / l_i)
        m_out = tl.where(dead, float("inf"), m_i)
        o = acc * l_inv[:, None]
    o = tl.where(dead[:, None], 0.0, o * qk_scale)

    o_ptrs = O + b64 * sob + (q_start + offs_m[:, None]) * sot + h * soh + offs_dv[None, :] * sod
    st_ptrs = b64 * smb + (q_start + offs_m) * smt + h * smh
    if JAGGED:
        rows_out = row_ok
    else:
        rows_out = offs_m < T_Q
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=rows_out[:, None] & (offs_dv[None, :] < DV))
    tl.store(M + st_ptrs, m_out, mask=rows_out)
    tl.store(L + st_ptrs, l_inv, mask=rows_out)


@triton.jit
def gdpa_softmax_bwd_pre_kernel(
    O, DO, DELTA, sob, sot, soh, sod, sdob, sdot, sdoh, sdod, smb, smt, smh,
    H, T_Q, DV, QOFF, JAGGED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """DELTA_i = sum_c dO_ic · O_ic in fp32 (the softmax backward's row term). Grid as the forward."""
    pid_m, b, h = _split_pid(T_Q, H, BLOCK_M)
    q_start, q_len = _seq_bounds(QOFF, QOFF, b, T_Q, JAGGED, False)
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (offs_m < q_len)[:, None] & (offs_dv[None, :] < DV)
    rows = q_start + offs_m[:, None]
    o = tl.load(O + b64 * sob + rows * sot + h * soh + offs_dv[None, :] * sod, mask=ok, other=0.0)
    do = tl.load(DO + b64 * sdob + rows * sdot + h * sdoh + offs_dv[None, :] * sdod, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b64 * smb + (q_start + offs_m) * smt + h * smh, delta, mask=offs_m < q_len)


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, st_base, bias_base, offs_n, start_m, offs_m, offs_d, offs_dv,
               q_len, k_len, D, DV, sqt, sqd, sdot, sdod, smt, sbq, sbk,
               qk_scale, pre_log2, window, causal_off, M, LINV, DELTA,
               HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
               DOT_FP32: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr, MASK_POS: tl.constexpr,
               OUT_DK: tl.constexpr, OUT_DV: tl.constexpr):
    """One query tile, on transposed tiles (keys as rows). MASKED: bounds-checked loads of the
    query side; MASK_POS: the window/causal mask. Keys past k_len are zeroed at the end.
    OUT_DK / OUT_DV: which gradients this program accumulates. The forward saved 1/L, so
    p = exp2(s - M) * (1/L) costs one MUFU (the exp2) per element."""
    rows = start_m + offs_m
    row_ok = rows < q_len
    qt = _load_tile(q_base + rows[None, :] * sqt + offs_d[:, None] * sqd, row_ok[None, :],
                    offs_d[:, None] < D, MASKED, EVEN_D)
    st = _dot(k, qt, DOT_FP32) * pre_log2          # [BLOCK_N, BLOCK_M]
    if MASKED:  # rows past q_len: M = +inf gives p = 0
        m = tl.load(M + st_base + rows * smt, mask=row_ok, other=float("inf"))
    else:
        m = tl.load(M + st_base + rows * smt)
    if HAS_BIAS:
        st += tl.load(bias_base + rows[None, :] * sbq + offs_n[:, None] * sbk,
                      mask=row_ok[None, :] & (offs_n[:, None] < k_len), other=0.0).to(tl.float32) * _LOG2E
    if MASK_POS:
        keep = _keep(rows[None, :], offs_n[:, None], window, causal_off, HAS_WINDOW, CAUSAL)
        st = tl.where(keep, st, float("-inf"))
    if MASKED:
        l_inv = tl.load(LINV + st_base + rows * smt, mask=row_ok, other=1.0)
    else:
        l_inv = tl.load(LINV + st_base + rows * smt)
    pt = tl.math.exp2(st - m[None, :]) * l_inv[None, :]
    do = _load_tile(do_base + rows[:, None] * sdot + offs_dv[None, :] * sdod, row_ok[:, None],
                    offs_dv[None, :] < DV, MASKED, EVEN_D)
    if OUT_DV:
        dv += _dot(pt.to(do.dtype), do, DOT_FP32)
    if OUT_DK:
        if MASKED:
            delta = tl.load(DELTA + st_base + rows * smt, mask=row_ok, other=0.0)
        else:
            delta = tl.load(DELTA + st_base + rows * smt)
        dpt = _dot(v, tl.trans(do), DOT_FP32) * qk_scale     # [BLOCK_N, BLOCK_M]
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(qt.dtype), tl.trans(qt), DOT_FP32)
    return dk, dv


@triton.jit
def _dkdv_region(dk, dv, k, v, q_b, do_b, st_b, bias_b, hk, GROUP, start, stop, offs_n, offs_m, offs_d,
                 offs_dv, q_len, k_len, D, DV, sqh, sqt, sqd, sdoh, sdot, sdod, smh, smt, sbh, sbq, sbk,
                 qk_scale, pre_log2, window, causal_off, M, LINV, DELTA,
                 HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 DOT_FP32: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr, MASK_POS: tl.constexpr,
                 OUT_DK: tl.constexpr, OUT_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query tiles [start, stop) of each of the GROUP query heads of K/V head hk as one flat
    loop (tile counter t and head g carried, no division): a tile loop nested in a head loop
    kept dK/dV out of the software pipeliner's reach and spilled (as in recopt.kernels.gdpa)."""
    n = tl.cdiv(stop - start, BLOCK_M)
    t = n * 0
    g = n * 0
    for _ in range(0, GROUP * n):
        h = hk * GROUP + g
        dk, dv = _dkdv_tile(dk, dv, k, v, q_b + h * sqh, do_b + h * sdoh, st_b + h * smh, bias_b + h * sbh,
                            offs_n, start + t * BLOCK_M, offs_m, offs_d, offs_dv, q_len, k_len, D, DV,
                            sqt, sqd, sdot, sdod, smt, sbq, sbk, qk_scale, pre_log2, window, causal_off,
                            M, LINV, DELTA, HAS_WINDOW, CAUSAL, HAS_BIAS, DOT_FP32, EVEN_D, MASKED, MASK_POS,
                            OUT_DK, OUT_DV)
        t += 1
        wrap = t == n
        g = tl.where(wrap, g + 1, g)
        t = tl.where(wrap, 0, t)
    return dk, dv


@triton.jit
def gdpa_softmax_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV_, M, L, DELTA, QOFF, KOFF, QLEN, KLEN, BIAS,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    sdob, sdot, sdoh, sdod,
    sdkb, sdkt, sdkh, sdkd,
    sdvb, sdvt, sdvh, sdvd,
    smb, smt, smh,
    sbb, sbh, sbq, sbk,
    H, GROUP, T_Q, T_K, D, DV,
    qk_scale, pre_scale, window, causal_off,
    JAGGED: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_KLEN: tl.constexpr,
    HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr, EVEN_D: tl.constexpr, OUT_DK: tl.constexpr, OUT_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dK, dV of one block of keys of one K/V head, summed over its GROUP query heads.
    Grid: (cdiv(T_K, BLOCK_N) * B * Hkv,). ``L`` holds the forward's 1/L. OUT_DK / OUT_DV
    select the outputs: both, or one per launch at d = 256 (two 64 x 256 fp32 accumulators
    do not fit in registers). Key blocks past k_len and query tiles past q_len are skipped."""
    HKV = H // GROUP
    pid_n, b, hk = _split_pid(T_K, HKV, BLOCK_N)
    q_start, q_len = _seq_bounds(QOFF, QLEN, b, T_Q, JAGGED, HAS_QLEN)
    k_start, k_len = _seq_bounds(KOFF, KLEN, b, T_K, JAGGED, HAS_KLEN)
    start_n = pid_n * BLOCK_N
    pre_log2 = pre_scale * _LOG2E

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

    q_b = Q + b64 * sqb + q_start * sqt
    do_b = DO + b64 * sdob + q_start * sdot
    st_b = b64 * smb + q_start * smt
    bias_b = BIAS + b64 * sbb
    if HAS_WINDOW or CAUSAL:
        dk, dv = _dkdv_region(dk, dv, k, v, q_b, do_b, st_b, bias_b, hk, GROUP, lo, mid, offs_n, offs_m,
                              offs_d, offs_dv, q_len, k_len, D, DV, sqh, sqt, sqd, sdoh, sdot, sdod, smh, smt,
                              sbh, sbq, sbk, qk_scale, pre_log2, window, causal_off, M, L, DELTA,
                              HAS_WINDOW, CAUSAL, HAS_BIAS, DOT_FP32, EVEN_D, True, True, OUT_DK, OUT_DV,
                              BLOCK_M)
    dk, dv = _dkdv_region(dk, dv, k, v, q_b, do_b, st_b, bias_b, hk, GROUP, mid, full, offs_n, offs_m,
                          offs_d, offs_dv, q_len, k_len, D, DV, sqh, sqt, sqd, sdoh, sdot, sdod, smh, smt,
                          sbh, sbq, sbk, qk_scale, pre_log2, window, causal_off, M, L, DELTA,
                          HAS_WINDOW, CAUSAL, HAS_BIAS, DOT_FP32, EVEN_D, False, False, OUT_DK, OUT_DV,
                          BLOCK_M)
    dk, dv = _dkdv_region(dk, dv, k, v, q_b, do_b, st_b, bias_b, hk, GROUP, full, hi, offs_n, offs_m,
                          offs_d, offs_dv, q_len, k_len, D, DV, sqh, sqt, sqd, sdoh, sdot, sdod, smh, smt,
                          sbh, sbq, sbk, qk_scale, pre_log2, window, causal_off, M, L, DELTA,
                          HAS_WINDOW, CAUSAL, HAS_BIAS, DOT_FP32, EVEN_D, True, False, OUT_DK, OUT_DV,
                          BLOCK_M)

    # keys past k_len were loaded as 0 but not masked in the scores: they get no gradient
    if JAGGED:
        row_mask = col_ok[:, None]
    else:
        row_mask = offs_n[:, None] < T_K
    if OUT_DK:
        dk = tl.where(col_ok[:, None], dk * pre_scale, 0.0)
        tl.store(DK + b64 * sdkb + (k_start + offs_n[:, None]) * sdkt + hk * sdkh + offs_d[None, :] * sdkd,
                 dk.to(DK.dtype.element_ty), mask=row_mask & (offs_d[None, :] < D))
    if OUT_DV:
        dv = tl.where(col_ok[:, None], dv * qk_scale, 0.0)
        tl.store(DV_ + b64 * sdvb + (k_start + offs_n[:, None]) * sdvt + hk * sdvh + offs_dv[None, :] * sdvd,
                 dv.to(DV_.dtype.element_ty), mask=row_mask & (offs_dv[None, :] < DV))


@triton.jit
def _dq_tile(dq, q, do, m, l_inv, delta, k_base, v_base, bias_base, offs_m, start_n, offs_n, offs_d, offs_dv,
             q_len, k_len, D, DV, skt, skd, svt, svd, sbq, sbk, qk_scale, pre_log2, window, causal_off,
             HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
             DOT_FP32: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr):
    cols = start_n + offs_n
    col_ok = cols < k_len
    kt = _load_tile(k_base + cols[None, :] * skt + offs_d[:, None] * skd, col_ok[None, :],
                    offs_d[:, None] < D, MASKED, EVEN_D)
    vt = _load_tile(v_base + cols[None, :] * svt + offs_dv[:, None] * svd, col_ok[None, :],
                    offs_dv[:, None] < DV, MASKED, EVEN_D)
    s = _scores(q, kt, bias_base, offs_m, cols, q_len, k_len, sbq, sbk, pre_log2, window, causal_off,
                HAS_WINDOW, CAUSAL, HAS_BIAS, DOT_FP32, MASKED)
    p = tl.math.exp2(s - m[:, None]) * l_inv[:, None]
    dp = _dot(do, vt, DOT_FP32) * qk_scale
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(kt.dtype), tl.trans(kt), DOT_FP32)


@triton.jit
def gdpa_softmax_bwd_dq_kernel(
    Q, K, V, DO, DQ, M, L, DELTA, QOFF, KOFF, QLEN, KLEN, BIAS,
    sqb, sqt, sqh, sqd,
    skb, skt, skh, skd,
    svb, svt, svh, svd,
    sdob, sdot, sdoh, sdod,
    sdqb, sdqt, sdqh, sdqd,
    smb, smt, smh,
    sbb, sbh, sbq, sbk,
    H, GROUP, T_Q, T_K, D, DV,
    qk_scale, pre_scale, window, causal_off,
    JAGGED: tl.constexpr, HAS_QLEN: tl.constexpr, HAS_KLEN: tl.constexpr,
    HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dQ of one block of query rows of one head. Grid: (cdiv(T_Q, BLOCK_M) * B * H,)."""
    pid_m, b, h = _split_pid(T_Q, H, BLOCK_M)
    hk = h // GROUP
    q_start, q_len = _seq_bounds(QOFF, QLEN, b, T_Q, JAGGED, HAS_QLEN)
    k_start, k_len = _seq_bounds(KOFF, KLEN, b, T_K, JAGGED, HAS_KLEN)
    start_m = pid_m * BLOCK_M
    pre_log2 = pre_scale * _LOG2E

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
    st = b64 * smb + (q_start + offs_m) * smt + h * smh
    m = tl.load(M + st, mask=row_ok, other=float("inf"))
    l_inv = tl.load(L + st, mask=row_ok, other=1.0)    # the forward saved 1/L
    delta = tl.load(DELTA + st, mask=row_ok, other=0.0)
    k_base = K + b64 * skb + k_start * skt + hk * skh
    v_base = V + b64 * svb + k_start * svt + hk * svh
    bias_base = BIAS + b64 * sbb + h * sbh
    lo, mid, hi = _kv_range(start_m, q_len, k_len, window, causal_off, HAS_WINDOW, CAUSAL, BLOCK_M, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, mid, BLOCK_N):
        dq = _dq_tile(dq, q, do, m, l_inv, delta, k_base, v_base, bias_base, offs_m, start_n, offs_n, offs_d,
                      offs_dv, q_len, k_len, D, DV, skt, skd, svt, svd, sbq, sbk, qk_scale, pre_log2, window,
                      causal_off, HAS_WINDOW, CAUSAL, HAS_BIAS, DOT_FP32, EVEN_D, False)
    for start_n in range(mid, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, m, l_inv, delta, k_base, v_base, bias_base, offs_m, start_n, offs_n, offs_d,
                      offs_dv, q_len, k_len, D, DV, skt, skd, svt, svd, sbq, sbk, qk_scale, pre_log2, window,
                      causal_off, HAS_WINDOW, CAUSAL, HAS_BIAS, DOT_FP32, EVEN_D, True)

    dq = dq * pre_scale
    if JAGGED:
        o_mask = row_ok[:, None] & (offs_d[None, :] < D)
    else:
        o_mask = (offs_m[:, None] < T_Q) & (offs_d[None, :] < D)
    tl.store(DQ + b64 * sdqb + (q_start + offs_m[:, None]) * sdqt + h * sdqh + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=o_mask)
