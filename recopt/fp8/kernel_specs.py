"""What the FP8 Triton kernels compile as on a GPU: argument types and constexprs per launcher variant.

Plain data for ahead-of-time compile checks (``triton.compile(ASTSource(fn,
signature, constexprs), target=GPUTarget("cuda", arch, 32))``) on machines
without a GPU: :func:`fp8_kernel_specs` lists every variant the launchers
(:func:`recopt.fp8.dual_quant.rowcol_quant`,
:func:`recopt.fp8.fused_quant.blocknorm_quant`) can pick for bf16 inputs;
:func:`dual_quant_compile_specs` wraps the row+column quantizer's variants as
``recopt.kernels.compile_check.KernelSpec`` for the shared compile-check
harness, where that module exists (its FP8 provider lists the BlockNorm
kernel itself).
"""
from __future__ import annotations

_FP8 = {"e4m3": ("*fp8e4nv", 448.0, 3, 2.0 ** -6, 512.0), "e5m2": ("*fp8e5", 57344.0, 2, 2.0 ** -14, 65536.0)}


def fp8_kernel_specs() -> list:
    """``[{"name", "module", "attr", "signature", "constexprs", "num_warps"}]`` for every FP8 kernel variant."""
    specs = [{
        "name": "fp8_dual_amax_bf16", "module": "recopt.kernels.fp8_dual_quant", "attr": "dual_amax_kernel",
        "signature": {"x_ptr": "*bf16", "row_amax_ptr": "*fp32", "col_amax_ptr": "*fp32", "R": "i32", "C": "i32",
                      "stride_xr": "i32"},
        "constexprs": {"BM": 64, "BC": 64}, "num_warps": 4}]
    for fmt, (ptr, fmax, mbits, min_normal, sub_inv) in _FP8.items():
        for rows, cols in ((True, True), (True, False), (False, True)):
            specs.append({
                "name": f"fp8_dual_quant_bf16_{fmt}_{'r' if rows else ''}{'c' if cols else ''}",
                "module": "recopt.kernels.fp8_dual_quant", "attr": "dual_quant_kernel",
                "signature": {"x_ptr": "*bf16", "row_scale_ptr": "*fp32", "col_scale_ptr": "*fp32", "q_row_ptr": ptr,
                              "q_col_ptr": ptr, "R": "i32", "C": "i32", "stride_xr": "i32", "stride_qr": "i32",
                              "stride_qc": "i32"},
                "constexprs": {"FMAX": fmax, "MBITS": mbits, "MIN_NORMAL": min_normal, "SUB_STEP_INV": sub_inv,
                               "WRITE_ROW": rows, "WRITE_COL": cols, "BM": 64, "BC": 64},
                "num_warps": 4})
    # The fused BlockNorm -> row-wise e4m3 kernel at the LoKA shapes (block 256; d = 1024, 4096) and as the
    # plain row quantizer of a K=4096 activation (one block of the whole row).
    for name, nblk, nb, norm in (("bn256_d1024", 4, 256, True), ("bn256_d4096", 16, 256, True),
                                 ("rowq_k4096", 1, 4096, False)):
        for write_y in ((True, False) if norm else (False,)):
            specs.append({
                "name": f"fp8_blocknorm_quant_{name}{'_y' if write_y else ''}",
                "module": "recopt.kernels.fp8_quant", "attr": "blocknorm_quant_rowwise_kernel",
                "signature": {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32",
                              "y_ptr": "*bf16" if write_y else "*fp8e4nv", "stride_xm": "i32", "stride_qm": "i32",
                              "stride_ym": "i32", "eps": "fp32"},
                "constexprs": {"NBLK": nblk, "NB": nb, "NBLK_P2": nblk, "NB_P2": nb, "NORM": norm,
                               "WRITE_Y": write_y},
                "num_warps": 4})
    return specs


def dual_quant_compile_specs(level: str = "ci") -> list:
    """The row+column quantizer's specs as the shared harness's ``KernelSpec``."""
    from ..kernels.compile_check import KernelSpec  # the harness; absent before it lands

    return [KernelSpec(name=s["name"], module=s["module"], attr=s["attr"], signature=s["signature"],
                       constexprs=s["constexprs"], num_warps=s["num_warps"],
                       tags={"family": "fp8", "kernel": s["attr"]})
            for s in fp8_kernel_specs() if s["module"].endswith("fp8_dual_quant")]
