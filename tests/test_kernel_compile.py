"""Every Triton kernel compiles for sm_90 and sm_100 — on a CPU-only machine.

The CPU interpreter (TRITON_INTERPRET=1, how CI runs kernels) skips Triton's
code generator, so these tests compile ahead of time with the ptxas that ships
in the triton wheel, from a fresh TRITON_CACHE_DIR, in two child processes
(recopt.kernels.compile_check), and fail on a compile error, shared memory
over the 227 KB limit, or any register spill. What is compiled comes from the
launchers' own config functions (every config they can pick, every head size
16..256), so a new config cannot skip the check.
"""
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

from recopt.kernels import compile_check as CC  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _jit_kernels():
    """(module, name) of every public @triton.jit function in the package."""
    found = []
    for path in (ROOT / "recopt").rglob("*.py"):
        src = path.read_text()
        for m in re.finditer(r"@triton\.jit[^\n]*\n(?:@[^\n]*\n)*def (\w+)", src):
            if not m.group(1).startswith("_"):
                mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
                found.append((mod, m.group(1)))
    return found


def test_every_triton_kernel_is_in_the_compile_check():
    kernels = _jit_kernels()
    assert len(kernels) >= 4, kernels
    covered = {(s.module, s.attr) for s in CC.collect_specs()}
    missing = [k for k in kernels if k not in covered]
    assert not missing, f"Triton kernels without compile-check specs (add a provider to PROVIDERS): {missing}"


def test_ci_specs_cover_every_activation_head_size_and_arch():
    specs = CC.collect_specs()
    gd = [s for s in specs if s.tags.get("family") == "gdpa"]
    from recopt.ops.gdpa_ref import ACTIVATIONS
    assert {s.tags["act"] for s in gd} == set(ACTIVATIONS)
    assert {s.tags["d"] for s in gd} >= {16, 32, 64, 128, 256}
    for arch in CC.ARCHS:
        assert {s.tags["kernel"] for s in gd if arch in s.archs} == {"fwd", "dkdv", "dq"}
    assert any(s.tags["variant"] == "all" for s in gd) and any(s.tags["variant"] == "causal" for s in gd)


def test_problems_are_named():
    r = CC.CompileResult("k", 90, ok=True, registers=255, stack=16, local=0, shared=240000)
    probs = r.problems()
    assert any("shared memory 240000 B > 232448" in p for p in probs)
    assert any("spills" in p for p in probs)
    assert CC.CompileResult("k", 100, ok=True, registers=100, stack=0, local=0, shared=1000).problems() == []
    assert "compile error" in CC.CompileResult("k", 90, ok=False, error="boom").problems()[0]


def test_module_level_float_in_jit_code_is_caught(tmp_path, monkeypatch):
    """The bug the interpreter hid: a plain global float inside @triton.jit does not compile."""
    (tmp_path / "recopt_cc_probe.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl
        SCALE = 0.5
        GOOD = tl.constexpr(0.5)

        @triton.jit
        def bad_kernel(X, N):
            x = tl.load(X + tl.arange(0, 16))
            tl.store(X + tl.arange(0, 16), x * SCALE)

        @triton.jit
        def good_kernel(X, N):
            x = tl.load(X + tl.arange(0, 16))
            tl.store(X + tl.arange(0, 16), x * GOOD)
    """))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    specs = [CC.KernelSpec(name=n, module="recopt_cc_probe", attr=n, signature={"X": "*fp32", "N": "i32"},
                           constexprs={}, num_warps=1, archs=(90,)) for n in ("bad_kernel", "good_kernel")]
    res = {r.name: r for r in CC.compile_specs(specs, archs=(90,), workers=2)}
    assert not res["bad_kernel"].ok and "SCALE" in res["bad_kernel"].error
    assert res["good_kernel"].ok and res["good_kernel"].problems() == [], res["good_kernel"].error


# OPEN WORK (issue #15): backward kernels that still spill, with the spill bytes
# (STACK + LOCAL) measured with triton 3.6.0 (ptxas 12.8 / 12.9-blackwell).
# They are the backward with GQA and/or jagged inputs, masks or a bias, and every
# d = 256 backward. A spill not listed here, or one that grows, fails the test;
# the forward kernels, the FP8 kernel and the dense backward at d <= 128 on
# sm_90 (the PFFN and self-attention paths) must not spill at all.
KNOWN_BACKWARD_SPILLS = {
    "gdpa_dkdv/gelu/all/bf16/d128/m16n64w4s2@sm_100": 288,
    "gdpa_dkdv/gelu/all/bf16/d128/m16n64w4s2@sm_90": 16,
    "gdpa_dkdv/gelu/all/bf16/d16/m32n64w4s3@sm_100": 8,
    "gdpa_dkdv/gelu/all/bf16/d64/m32n64w4s3@sm_100": 24,
    "gdpa_dkdv/gelu/all/fp32/d64/m16n32w4s1@sm_100": 8,
    "gdpa_dkdv/gelu/light/bf16/d128/m16n64w4s2@sm_100": 312,
    "gdpa_dkdv/gelu/light/bf16/d128/m32n64w4s2@sm_90": 88,
    "gdpa_dkdv/gelu/light/bf16/d16/m32n64w4s3@sm_100": 8,
    "gdpa_dkdv/gelu/light/bf16/d64/m64n64w4s3@sm_90": 72,
    "gdpa_dkdv[dk]/gelu/all/bf16/d256/m16n64w4s1@sm_100": 576,
    "gdpa_dkdv[dk]/gelu/light/bf16/d256/m16n64w4s1@sm_100": 40,
    "gdpa_dkdv[dk]/gelu/light/bf16/d256/m16n64w4s1@sm_90": 400,
    "gdpa_dkdv[dv]/gelu/all/bf16/d256/m16n64w4s1@sm_100": 280,
    "gdpa_dkdv[dv]/gelu/light/bf16/d256/m16n64w4s1@sm_90": 32,
    "gdpa_dq/gelu/light/bf16/d256/m128n32w8s1@sm_90": 200,
    "gdpa_dq/gelu/light/bf16/d256/m64n16w4s1@sm_90": 360,
}


def _check(results):
    """Problems that fail the test: any compile error or shared-memory overflow; any spill
    outside KNOWN_BACKWARD_SPILLS; a known spill that grew."""
    bad = []
    for r in results:
        probs = r.problems()
        spill = max(r.stack, 0) + max(r.local, 0)
        key = f"{r.name}@sm_{r.arch}"
        if spill and key in KNOWN_BACKWARD_SPILLS:
            if spill > KNOWN_BACKWARD_SPILLS[key]:
                bad.append(f"{key}: spills grew to {spill} B (known: {KNOWN_BACKWARD_SPILLS[key]} B)")
            probs = [p for p in probs if "spills" not in p]
        bad += [f"{key}: {p}" for p in probs]
    return bad


def test_every_kernel_compiles_for_sm90_and_sm100_without_spills():
    res = CC.compile_specs(CC.collect_specs(level="ci"), workers=2)
    assert len(res) >= 100
    bad = _check(res)
    assert not bad, "\n".join(bad)
    clean = [r for r in res if not r.name.startswith(("gdpa_dkdv", "gdpa_dq"))
             or (r.arch == 90 and ("/dense/" in r.name or "/causal/" in r.name or "/lengths/" in r.name)
                 and "/d256/" not in r.name)]
    assert clean and all(r.stack == 0 and r.local == 0 for r in clean)
    print(f"\n{len(res)} compiles, {sum(r.seconds for r in res):.0f} s of compile time")


@pytest.mark.slow
def test_full_cross_product_compiles():
    res = CC.compile_specs(CC.collect_specs(level="full"), workers=2)
    bad = [b for b in _check(res) if "spills" not in b]  # full level: errors and shared memory only
    assert not bad, "\n".join(bad)
