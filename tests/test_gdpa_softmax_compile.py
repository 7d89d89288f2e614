"""The softmax GDPA kernels compile for sm_90 and sm_100 without spills (CPU only, ptxas
from the triton wheel).

The CI-level specs (13 compiles) run inside tests/test_kernel_compile.py, which compiles
every provider's CI specs and fails on any spill; this file checks what those specs cover
(no compiling) and, under the ``slow`` marker, compiles every config the launcher can pick
at every head size 16..256 in bf16 (fp32: up to d = 64; the route keeps the reference
above), each with the heaviest variant it serves: no compile error, shared memory within
227 KB, and no spill at all (STACK and LOCAL 0) on either arch.
"""
import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from recopt.kernels import compile_check as CC  # noqa: E402
from recopt.ops import _gdpa_softmax_triton as S  # noqa: E402
from recopt.ops import gdpa_softmax as GS  # noqa: E402


def test_ci_specs_cover_the_kernels_and_archs():
    specs = [s for s in CC.collect_specs() if s.tags.get("family") == "gdpa_softmax"]
    assert {s.attr for s in specs} == {"gdpa_softmax_fwd_kernel", "gdpa_softmax_bwd_dkdv_kernel",
                                       "gdpa_softmax_bwd_dq_kernel", "gdpa_softmax_bwd_pre_kernel"}
    for arch in (90, 100):
        assert {s.tags["kernel"] for s in specs if arch in s.archs} >= {"fwd", "dkdv", "dq"}
        assert any(s.tags["kernel"] == "dkdv" and s.tags["variant"] == "all" and s.tags["d"] == 128
                   for s in specs if arch in s.archs), "the masked d = 128 dK/dV (it spilled on sm_100)"
    assert any(s.tags["variant"] == "all" and s.tags["d"] == 128 for s in specs)
    assert len(specs) <= 13, "the CI compile check must stay small (<= 30 s added)"


def test_fp32_limit_matches_the_route():
    """The compile checks skip fp32 above the head size the route sends to the kernels."""
    assert S.FP32_MAX_D == GS.MAX_HEAD_DIM_FP32


def test_launcher_configs_fit_shared_memory_and_warpgroups():
    for kind in ("fwd", "dkdv", "dq"):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for arch in (90, 100):
                for d, (bm, bn, warps, stages), heavy in S.launch_configs(kind, dtype, arch):
                    bd = max(16, 1 << (d - 1).bit_length())
                    elt = 4 if dtype == torch.float32 else 2
                    assert S.G._smem_estimate(bm, bn, bd, bd, stages, elt) <= S.G.SMEM_LIMIT
                    rows = bn if kind == "dkdv" else bm     # the A operand of the score GEMM
                    assert warps <= 4 * max(rows // 64, 1), (kind, d, bm, bn, warps)


def _sweep_specs():
    specs, seen = [], set()
    for arch in (90, 100):
        for dtype in (torch.bfloat16, torch.float32):
            for kind in ("fwd", "dkdv", "dq"):
                for d, cfg, heavy in S.launch_configs(kind, dtype, arch):
                    if dtype == torch.float32 and d > S.FP32_MAX_D:
                        continue      # fp32 above d = 64 runs the reference (softmax_route)
                    for outs in (S.dkdv_passes(d, d) if kind == "dkdv" else ((True, True),)):
                        s = dataclasses.replace(S._spec(kind, "all" if heavy else "light", d, dtype, cfg, outs),
                                                archs=(arch,))
                        if (s.name, arch) not in seen:
                            seen.add((s.name, arch))
                            specs.append(s)
            for d in S.G.HEAD_DIMS:     # the row-term kernel (64 x 256 spilled 40-56 B)
                specs.append(dataclasses.replace(S._spec("pre", "jagged", d, dtype, S._pre_config_gpu(d)),
                                                 archs=(arch,)))
    return specs


@pytest.mark.slow
def test_every_softmax_config_compiles():
    res = CC.compile_specs(_sweep_specs(), workers=2)
    bad = [f"{r.name}@sm_{r.arch}: {p}" for r in res for p in r.problems()]
    assert not bad, "\n".join(bad)
    assert all(r.stack == 0 and r.local == 0 for r in res)
