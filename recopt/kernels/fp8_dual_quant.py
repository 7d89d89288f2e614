"""Triton kernels: quantize a 2-D tensor to FP8 row-wise AND column-wise, both copies in one pass.

The backward of an FP8 linear layer needs each operand twice: ``dY`` row-major
with one scale per row (the A operand of dgrad, reduction over N) and ``dYᵀ``
row-major with one scale per column of ``dY`` (the A operand of wgrad,
reduction over M); likewise ``W`` (forward B / dgrad B) and ``x`` (forward A /
wgrad B). Casting the transpose with ``.t().contiguous()`` first costs a bf16
round trip per copy; here:

1. :func:`dual_amax_kernel` reads ``x`` (R×C) once in BM×BC tiles and
   ``atomic_max``-es each tile's row and column |max| into ``row_amax`` (R)
   and ``col_amax`` (C) (both zero-initialised);
2. :func:`dual_quant_kernel` reads ``x`` once more and writes, from the same
   tile, ``q_row[r, c] = sat(x[r, c] / row_scale[r])`` (R×C) and
   ``q_col[c, r] = sat(x[r, c] / col_scale[c])`` (C×R, i.e. ``xᵀ``
   row-major) — the one kernel that writes both FP8 copies.

Values are rounded to the FP8 grid (round half to even, with the carry into
the exponent, subnormals included) in fp32 before the cast, so the cast is
exact and the CPU interpreter's fp8 conversion (which drops that carry in
triton 3.6) does not change the result. Every format constant is a
``tl.constexpr`` argument: a module-level Python float read inside a jitted
function does not compile for a GPU in triton 3.6.

Launcher and PyTorch reference: :mod:`recopt.fp8.dual_quant`.
"""
import triton
import triton.language as tl


@triton.jit
def _round_to_fp8_grid(v, MBITS: tl.constexpr, MIN_NORMAL: tl.constexpr, SUB_STEP_INV: tl.constexpr):
    # Normal range: keep MBITS mantissa bits of the fp32 value, round half to even, carry into the exponent.
    DROP: tl.constexpr = 23 - MBITS
    bits = v.to(tl.int32, bitcast=True)
    lsb = (bits >> DROP) & 1
    half_minus_one: tl.constexpr = (1 << (DROP - 1)) - 1
    keep_mask: tl.constexpr = -(1 << DROP)
    rounded = ((bits + half_minus_one + lsb) & keep_mask).to(tl.float32, bitcast=True)
    # Subnormal range: multiples of 1/SUB_STEP_INV; adding 1.5·2^23 rounds to an integer (RNE).
    magic = 12582912.0
    sub = ((v * SUB_STEP_INV + magic) - magic) / SUB_STEP_INV
    return tl.where(tl.abs(v) >= MIN_NORMAL, rounded, sub)


@triton.jit
def _fp8_with_nan(v, raw, out_ty: tl.constexpr):
    # ``v`` (already on the FP8 grid) cast to ``out_ty``, with 0x7F (NaN in e4m3fn and e5m2) wherever
    # ``raw`` is NaN: min/max and the interpreter's fp8 conversion drop NaN, and an inf/NaN slice must
    # give NaN GEMM outputs (as eager's are inf/NaN), never silently finite ones.
    bits = v.to(out_ty).to(tl.uint8, bitcast=True)
    bits = tl.where(raw != raw, 0x7F, bits).to(tl.uint8)
    return bits.to(out_ty, bitcast=True)


@triton.jit
def dual_amax_kernel(x_ptr, row_amax_ptr, col_amax_ptr, R, C, stride_xr,
                     BM: tl.constexpr, BC: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BM + tl.arange(0, BM)
    cols = pid_c * BC + tl.arange(0, BC)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a = tl.abs(x)
    tl.atomic_max(row_amax_ptr + rows, tl.max(a, axis=1), mask=rows < R)
    tl.atomic_max(col_amax_ptr + cols, tl.max(a, axis=0), mask=cols < C)


@triton.jit
def dual_quant_kernel(x_ptr, row_scale_ptr, col_scale_ptr, q_row_ptr, q_col_ptr, R, C,
                      stride_xr, stride_qr, stride_qc,
                      FMAX: tl.constexpr, MBITS: tl.constexpr, MIN_NORMAL: tl.constexpr,
                      SUB_STEP_INV: tl.constexpr, WRITE_ROW: tl.constexpr, WRITE_COL: tl.constexpr,
                      BM: tl.constexpr, BC: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BM + tl.arange(0, BM)
    cols = pid_c * BC + tl.arange(0, BC)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if WRITE_ROW:
        rs = tl.load(row_scale_ptr + rows, mask=rows < R, other=1.0)
        raw = x / rs[:, None]
        v = tl.minimum(tl.maximum(raw, -FMAX), FMAX)
        v = _round_to_fp8_grid(v, MBITS, MIN_NORMAL, SUB_STEP_INV)
        tl.store(q_row_ptr + rows[:, None] * stride_qr + cols[None, :],
                 _fp8_with_nan(v, raw, q_row_ptr.dtype.element_ty), mask=mask)
    if WRITE_COL:
        cs = tl.load(col_scale_ptr + cols, mask=cols < C, other=1.0)
        raw_c = x / cs[None, :]
        w = tl.minimum(tl.maximum(raw_c, -FMAX), FMAX)
        w = _round_to_fp8_grid(w, MBITS, MIN_NORMAL, SUB_STEP_INV)
        # q_col is xᵀ row-major: element (r, c) of the tile goes to q_col[c, r].
        tl.store(q_col_ptr + cols[None, :] * stride_qc + rows[:, None],
                 _fp8_with_nan(w, raw_c, q_col_ptr.dtype.element_ty), mask=mask)
