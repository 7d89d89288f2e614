"""The softmax GDPA kernels compile for sm_90 and sm_100 (CPU only, ptxas from the triton wheel).

The CI-level specs (11 compiles) run inside tests/test_kernel_compile.py, which compiles
every provider's CI specs and fails on any spill; this file checks what those specs cover
(no compiling) and, under the ``slow`` marker, compiles every config the launcher can pick
at every head size 16..256 in bf16 (fp32: 32 and 64; the route keeps the reference above 64),
each with the heaviest variant it serves: no compile error, shared memory within 227 KB,
no spill except the known ones below (docs/kernels.md), which may not grow.
"""
import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from recopt.kernels import compile_check as CC  # noqa: E402
from recopt.ops import _gdpa_softmax_triton as S  # noqa: E402

# Known spills (STACK bytes, "name@sm_XX"), measured with triton 3.6.0 (ptxas 12.8,
# ptxas-blackwell 12.9): sm_100's dK/dV (masked variants) and a few small ones at d = 256
# and in the exact fp32 path (stack with few registers). A spill not listed, or one that
# grows, fails. fp32 above d = 64 is routed to the reference (24 B - 8 KB of stack).
KNOWN_SPILLS = {
    "gdpa_softmax_dkdv/light/bf16/d128/m16n128w8s2@sm_100": 288,
    "gdpa_softmax_dkdv/light/bf16/d16/m16n128w8s2@sm_100": 8,
    "gdpa_softmax_dkdv/all/bf16/d128/m16n128w8s2@sm_100": 688,
    "gdpa_softmax_dkdv/all/bf16/d64/m16n128w8s2@sm_100": 248,
    "gdpa_softmax_dkdv/all/bf16/d32/m16n128w8s2@sm_100": 56,
    "gdpa_softmax_dkdv[dk]/light/bf16/d256/m16n16w4s1@sm_90": 24,
    "gdpa_softmax_dkdv[dk]/light/bf16/d256/m16n16w4s1@sm_100": 24,
    "gdpa_softmax_dkdv/light/fp32/d64/m16n16w4s1@sm_90": 8,
    "gdpa_softmax_dkdv/all/fp32/d64/m16n16w4s1@sm_100": 32,
    "gdpa_softmax_dkdv/light/fp32/d32/m16n16w4s1@sm_90": 8,
    "gdpa_softmax_dkdv/light/fp32/d32/m16n16w4s1@sm_100": 8,
}


def test_ci_specs_cover_the_kernels_and_archs():
    specs = [s for s in CC.collect_specs() if s.tags.get("family") == "gdpa_softmax"]
    assert {s.attr for s in specs} == {"gdpa_softmax_fwd_kernel", "gdpa_softmax_bwd_dkdv_kernel",
                                       "gdpa_softmax_bwd_dq_kernel", "gdpa_softmax_bwd_pre_kernel"}
    for arch in (90, 100):
        assert {s.tags["kernel"] for s in specs if arch in s.archs} >= {"fwd", "dq"}
    assert any(s.tags["variant"] == "all" and s.tags["d"] == 128 for s in specs)
    assert len(specs) <= 12, "the CI compile check must stay small (<= 30 s added)"


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
                    if dtype == torch.float32 and d not in (32, 64):
                        continue      # fp32 above d = 64 runs the reference (softmax_route)
                    for outs in (S.dkdv_passes(d, d) if kind == "dkdv" else ((True, True),)):
                        s = dataclasses.replace(S._spec(kind, "all" if heavy else "light", d, dtype, cfg, outs),
                                                archs=(arch,))
                        if (s.name, arch) not in seen:
                            seen.add((s.name, arch))
                            specs.append(s)
    return specs


@pytest.mark.slow
def test_every_softmax_config_compiles():
    res = CC.compile_specs(_sweep_specs(), workers=2)
    bad = []
    for r in res:
        probs = r.problems()
        spill = max(r.stack, 0) + max(r.local, 0)
        key = f"{r.name}@sm_{r.arch}"
        if spill and key in KNOWN_SPILLS:
            if spill > KNOWN_SPILLS[key]:
                bad.append(f"{key}: spills grew to {spill} B (known: {KNOWN_SPILLS[key]} B)")
            probs = [p for p in probs if "spills" not in p]
        bad += [f"{r.name}@sm_{r.arch}: {p}" for p in probs]
    assert not bad, "\n".join(bad)
