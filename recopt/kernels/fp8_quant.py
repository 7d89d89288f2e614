"""Triton kernel: (optional BlockNorm) → row-wise scale → cast to FP8 e4m3, in one pass.

One program handles one row of ``x`` (M×N): it loads the row once, applies
the parameter-free block RMS norm (``NORM``; blocks of ``NB`` features,
``y = x / sqrt(mean_block(x²) + eps)``), takes the row's amax, writes the
e4m3 values ``q = sat(y / s)`` with ``s = max(amax, 1e-12) / 448`` and the
fp32 scale ``s``, and (``WRITE_Y``) the normalized row in ``y``'s dtype for
other consumers. So the activation quantization of the next GEMM costs no
extra memory round trip.

Values are rounded to the e4m3 grid (round to nearest even) in fp32 before
the cast: the cast is then exact, and the result does not depend on the
CPU interpreter's fp8 conversion (triton 3.6's interpreter drops the
exponent carry when a mantissa rounds up, e.g. 126.2 → 64).

Launcher and reference: :mod:`recopt.fp8.fused_quant`.
"""
import triton
import triton.language as tl

E4M3_MAX = tl.constexpr(448.0)  # constexpr: plain globals do not compile inside @jit


@triton.jit
def _round_to_e4m3_grid(v):
    # Normal range (|v| >= 2^-6): keep 3 mantissa bits, round half to even, carry into the exponent.
    bits = v.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1
    rounded = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
    # Subnormal range: multiples of 2^-9; adding 1.5·2^23 rounds to an integer (RNE).
    magic = 12582912.0
    sub = ((v * 512.0 + magic) - magic) / 512.0
    return tl.where(tl.abs(v) >= 0.015625, rounded, sub)


@triton.jit
def blocknorm_quant_rowwise_kernel(
    x_ptr, q_ptr, scale_ptr, y_ptr,
    stride_xm, stride_qm, stride_ym,
    eps,
    NBLK: tl.constexpr, NB: tl.constexpr, NBLK_P2: tl.constexpr, NB_P2: tl.constexpr,
    NORM: tl.constexpr, WRITE_Y: tl.constexpr,
):
    row = tl.program_id(0)
    blk = tl.arange(0, NBLK_P2)[:, None]
    col = tl.arange(0, NB_P2)[None, :]
    mask = (blk < NBLK) & (col < NB)
    offs = blk * NB + col
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        ms = tl.sum(x * x, axis=1) / NB
        y = x * (1.0 / tl.sqrt(ms + eps))[:, None]
    else:
        y = x
    if WRITE_Y:
        tl.store(y_ptr + row * stride_ym + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    amax = tl.max(tl.max(tl.abs(y), axis=1), axis=0)
    scale = tl.maximum(amax, 1e-12) / E4M3_MAX
    raw = y / scale
    v = tl.minimum(tl.maximum(raw, -E4M3_MAX), E4M3_MAX)
    v = _round_to_e4m3_grid(v)
    # min/max and the interpreter's fp8 conversion drop NaN: write 0x7F (e4m3fn NaN) where the value is
    # NaN, so a row holding an inf (scale inf, inf/inf) or a NaN gives NaN outputs as eager's are
    # inf/NaN, not a silently finite row.
    bits = v.to(q_ptr.dtype.element_ty).to(tl.uint8, bitcast=True)
    bits = tl.where(raw != raw, 0x7F, bits).to(tl.uint8)
    tl.store(q_ptr + row * stride_qm + offs, bits.to(q_ptr.dtype.element_ty, bitcast=True), mask=mask)
    tl.store(scale_ptr + row, scale)
