"""``@triton.jit`` helpers shared by the attention kernels: program ids, sequence bounds,
tile loads, positional masks, the tile ranges a block walks and the dot whose precision the
dtype decides.

Kernels only (no Python policy). Conventions are those of :mod:`recopt.kernels.gdpa`:
dense ``[B, H, T, d]`` tensors with optional per-sample lengths or jagged ``values
[sum T_b, H, d]`` + ``offsets``; the grid flattened to axis 0 (CUDA's y axis stops at
65,535). :mod:`recopt.kernels.gdpa` and :mod:`recopt.kernels.gdpa_softmax` both use them.
"""
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    """``a @ b`` with fp32 accumulation; DOT_FP32: operands upcast and multiplied in full fp32
    (IEEE, not TF32) — the fp32 path, and the CPU interpreter, whose triton 3.6 ``tl.dot`` on
    bf16 operands is wrong."""
    if DOT_FP32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _seq_bounds(OFF, LEN, b, T, JAGGED: tl.constexpr, HAS_LEN: tl.constexpr):
    """(start row, length) of sample b: from ``OFF[b], OFF[b+1]`` when jagged, else start 0
    and ``LEN[b]`` clamped to [0, T] (T without lengths)."""
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
def _keep(rows, cols, window, causal_off, HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr):
    """Positional mask of a score tile (rows and cols already broadcast to the tile's shape):
    ``|row - col| <= window`` and ``col <= row + causal_off``. Length masks are the caller's."""
    keep = rows == rows
    if HAS_WINDOW:
        diff = rows - cols
        keep = keep & (diff <= window) & (diff >= -window)
    if CAUSAL:
        keep = keep & (cols <= rows + causal_off)
    return keep


@triton.jit
def _split_pid(T, H, BLOCK: tl.constexpr):
    """(block index along the sequence, b, h) from a grid flattened to axis 0.

    Axis 0 holds cdiv(T, BLOCK) * B * H programs; the blocks of one (b, h) are adjacent,
    so they share K/V (or Q/dO) in L2.
    """
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(T, BLOCK)
    pid_bh = pid // n_blocks
    return pid % n_blocks, pid_bh // H, pid_bh % H


@triton.jit
def _load_tile(ptrs, bound_ok, d_ok, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a K/V/Q/dO tile; out-of-range elements read as 0. Interior tiles (not MASKED)
    of an even head size (EVEN_D: d == BLOCK_D) load without any predicate."""
    if MASKED:
        out = tl.load(ptrs, mask=bound_ok & d_ok, other=0.0)
    elif EVEN_D:
        out = tl.load(ptrs)
    else:
        out = tl.load(ptrs, mask=d_ok, other=0.0)
    return out


@triton.jit
def _kv_range(start_m, q_len, k_len, window, causal_off,
              HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles ``[lo, hi)`` that hold a kept score for the valid rows of the query block at
    ``start_m`` (none when the block starts past ``q_len``), and ``mid``: tiles in ``[lo, mid)``
    are inside the key length and fully kept for every row of the block (mask-free), tiles in
    ``[mid, hi)`` take the masks. The window/causal bounds use the block's last *valid* row,
    so a partial last block does not walk keys only its rows past ``q_len`` would see."""
    row_end = tl.minimum(start_m + BLOCK_M, q_len)     # one past the block's last valid row
    lo = k_len * 0
    hi = k_len
    mid = hi
    if HAS_WINDOW:
        lo = tl.maximum(start_m - window, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(hi, row_end + window)
        mid = lo
    if CAUSAL:
        hi = tl.minimum(hi, row_end + causal_off)
        if not HAS_WINDOW:
            # tile [n, n + BLOCK_N) is fully kept iff n + BLOCK_N - 1 <= start_m + causal_off
            mid = tl.maximum(start_m + causal_off + 1, 0) // BLOCK_N * BLOCK_N
    if start_m >= q_len:
        hi = lo
    hi = tl.maximum(hi, lo)
    mid = tl.minimum(mid, k_len // BLOCK_N * BLOCK_N)   # a partial last tile needs bounds checks
    mid = tl.minimum(tl.maximum(mid, lo), hi)
    return lo, mid, hi


@triton.jit
def _q_range(start_n, q_len, k_len, window, causal_off,
             HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query tiles a key block sees (dK/dV), as ``lo <= mid <= full <= hi``: ``[lo, mid)``
    need the positional mask, ``[mid, full)`` are interior (rows inside ``q_len``, fully kept),
    ``[full, hi)`` bounds-checked. Nothing when the block starts past ``k_len`` or no valid
    row sees it (the first row that does, ``start_n - window`` or ``start_n - causal_off``,
    is past ``q_len``)."""
    col_end = tl.minimum(start_n + BLOCK_N, k_len)     # one past the block's last valid key
    lo = q_len * 0
    hi = q_len
    mid = lo
    first = lo
    if HAS_WINDOW:
        first = start_n - window
        lo = tl.maximum(first, 0) // BLOCK_M * BLOCK_M
        hi = tl.minimum(hi, col_end + window)
        mid = hi
    if CAUSAL:
        # row i sees key j iff j <= i + causal_off: rows below start_n - causal_off see nothing
        first = tl.maximum(first, start_n - causal_off)
        lo = tl.maximum(lo, tl.maximum(start_n - causal_off, 0) // BLOCK_M * BLOCK_M)
        if not HAS_WINDOW:
            # all of [m, m + BLOCK_M) see the whole block iff m >= start_n + BLOCK_N - 1 - causal_off
            mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_off, 0), BLOCK_M) * BLOCK_M
    if (start_n >= k_len) | (first >= q_len):
        hi = lo
    hi = tl.maximum(hi, lo)
    mid = tl.minimum(tl.maximum(mid, lo), hi)
    full = tl.maximum(tl.minimum(hi, q_len // BLOCK_M * BLOCK_M), mid)
    return lo, mid, full, hi
