"""Compile-check specs of the FP8 Triton kernels (see recopt.kernels.compile_check).

Lists what :func:`recopt.fp8.fused_quant.blocknorm_quant` can launch: the
feature count ``N`` is a constexpr (``NBLK`` blocks of ``NB``), so each N the
models use is its own compile; every (norm, write_y) variant, bf16 and fp32
inputs, default launch options (4 warps).
"""
from __future__ import annotations


def _p2(v: int) -> int:
    return 1 << (max(int(v), 1) - 1).bit_length()


def compile_specs(level: str = "ci") -> list:
    from recopt.kernels.compile_check import KernelSpec

    full = level == "full"
    ns = (256, 512, 768, 1024, 2048, 4096, 8192, 16384) if full else (256, 4096)
    blocks = (64, 128, 256) if full else (256,)
    modes = ((True, True), (True, False), (False, True), (False, False)) if full else \
        ((True, True), (False, False))
    specs = []
    for n in ns:
        for block in [b for b in blocks if n % b == 0]:
            for x_ty in ("bf16", "fp32"):
                for norm, write_y in modes:
                    nblk = n // block
                    sig = {"x_ptr": f"*{x_ty}", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32",
                           "y_ptr": f"*{x_ty}" if write_y else "*fp8e4nv",
                           "stride_xm": "i32", "stride_qm": "i32", "stride_ym": "i32", "eps": "fp32"}
                    const = dict(NBLK=nblk, NB=block, NBLK_P2=_p2(nblk), NB_P2=_p2(block),
                                 NORM=norm, WRITE_Y=write_y)
                    specs.append(KernelSpec(
                        name=f"fp8_blocknorm_quant/{x_ty}/n{n}/b{block}/norm{int(norm)}/y{int(write_y)}",
                        module="recopt.kernels.fp8_quant", attr="blocknorm_quant_rowwise_kernel",
                        signature=sig, constexprs=const, num_warps=4, num_stages=3,
                        divisible=("x_ptr", "q_ptr", "scale_ptr", "y_ptr", "stride_xm", "stride_qm",
                                   "stride_ym"),
                        tags=dict(family="fp8", kernel="blocknorm_quant", n=n, block=block, dtype=x_ty)))
    return specs
