"""``@triton.jit`` helpers shared by the attention kernels: program ids, sequence bounds,
tile loads, positional masks and the dot whose precision the dtype decides.

Kernels only (no Python policy). Conventions are those of :mod:`recopt.kernels.gdpa`:
dense ``[B, H, T, d]`` tensors with optional per-sample lengths or jagged ``values
[sum T_b, H, d]`` + ``offsets``; the grid flattened to axis 0 (CUDA's y axis stops at
65,535). :mod:`recopt.kernels.gdpa_softmax` uses these; :mod:`recopt.kernels.gdpa`
still carries its own copies (to be switched over when its backward rewrite lands).
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
