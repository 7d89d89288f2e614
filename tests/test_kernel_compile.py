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
        assert {s.tags["kernel"] for s in gd if arch in s.archs} == {"fwd", "dkdv", "dq", "fused"}
        fused = [s for s in gd if arch in s.archs and s.tags["kernel"] == "fused"]
        # the one-launch backward's tightest fits (every config: the slow test below): d 128 and
        # d 256's dK + dQ launch, with masks and the atomic bias gradient
        assert {s.tags["d"] for s in fused} >= {128, 256}
        assert any(s.tags["d"] == 256 and s.constexprs["OUT_DQ"] for s in fused)
        assert any(s.constexprs["DBIAS"] == 2 and s.constexprs["CAUSAL"] for s in fused)
    assert any(s.tags["variant"] == "all" for s in gd) and any(s.tags["variant"] == "causal" for s in gd)
    for arch in CC.ARCHS:   # the bias gradient (stored and atomic) in the dQ kernel, both archs
        dq = [s for s in gd if arch in s.archs and s.tags["kernel"] == "dq"]
        assert any(s.tags["variant"] == "dbias" for s in dq)
        assert any(s.tags["variant"] == "all" and s.constexprs["DBIAS"] == 2 for s in dq)


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


def _check(results):
    """Problems that fail the test: any compile error, shared-memory overflow or register spill
    (STACK or LOCAL > 0), for every kernel, variant, head size and arch."""
    return [f"{r.name}@sm_{r.arch}: {p}" for r in results for p in r.problems()]


def test_every_kernel_compiles_for_sm90_and_sm100_without_spills():
    res = CC.compile_specs(CC.collect_specs(level="ci"), workers=2)
    assert len(res) >= 100
    bad = _check(res)
    assert not bad, "\n".join(bad)
    assert all(r.stack == 0 and r.local == 0 for r in res)
    print(f"\n{len(res)} compiles, {sum(r.seconds for r in res):.0f} s of compile time")


@pytest.mark.slow
def test_full_cross_product_compiles():
    """Every kernel, every variant: no compile error, shared-memory overflow or spill (the
    softmax kernels too, since their known-spills list is gone)."""
    res = CC.compile_specs(CC.collect_specs(level="full"), workers=2)
    bad = _check(res)
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_one_launch_backward_compiles_at_every_config():
    """Every config the one-launch backward's launcher can pick (d 16..256, bf16 and fp32,
    the heaviest variant each serves, broadcast q, every activation at d 64 and 128), both
    archs: no compile error, shared memory within the limit, no spills."""
    from recopt.ops._gdpa_triton import fused_compile_specs

    res = CC.compile_specs(fused_compile_specs("all"), workers=2)
    assert len(res) >= 60
    bad = _check(res)
    assert not bad, "\n".join(bad)
