"""The FP8 Triton kernels compile for sm_90 (H100) and sm_100 (B200) without spills — no GPU needed.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs
the whole pipeline down to a cubin with the ptxas shipped in the triton wheel;
``cuobjdump`` gives registers, stack and local memory. The interpreter tests
cannot catch a kernel that does not compile (issue 13: a module-level float in
``fp8_quant.py``), this does. Each arch compiles in a child process with
``TRITON_INTERPRET=0`` and a fresh cache.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_LIMIT = 232448  # bytes of dynamic shared memory per block on sm_90 and sm_100


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    procs = {}
    for arch in (90, 100):
        env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT,
                   TRITON_CACHE_DIR=str(tmp_path_factory.mktemp(f"triton_cache_{arch}")))
        procs[arch] = subprocess.Popen([sys.executable, "-m", "recopt.fp8._compile_worker", str(arch)], cwd=ROOT,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for arch, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, f"compile worker for sm_{arch} failed:\n{stderr[-3000:]}"
        for r in json.loads(stdout.strip().splitlines()[-1]):
            out[(r["name"], arch)] = r
    return out


def _check(r):
    assert r["ok"], f"{r['name']} does not compile for sm_{r['arch']}: {r.get('error')}"
    assert r["shared"] <= SHARED_LIMIT, f"{r['name']} needs {r['shared']} B shared memory on sm_{r['arch']}"
    assert r["stack"] == 0 and r["local"] == 0, f"{r['name']} spills on sm_{r['arch']}: {r}"


@pytest.mark.parametrize("arch", [90, 100])
def test_dual_quant_kernels_compile_without_spills(compiled, arch):
    names = [n for (n, a) in compiled if a == arch and n.startswith("fp8_dual")]
    assert len(names) == 7  # amax + 3 (row/col/both) × 2 formats
    for n in names:
        _check(compiled[(n, arch)])


def _e4m3_max_is_a_plain_float() -> bool:
    # Issue 13's compile bug: kernels/fp8_quant.py reads a module-level Python float inside @jit.
    # The fix (a tl.constexpr) is on engineer i15's branch; until it is merged this test is an
    # expected failure, and as soon as the constant is a constexpr it must pass.
    import ast

    src = open(os.path.join(ROOT, "recopt", "kernels", "fp8_quant.py")).read()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "E4M3_MAX" for t in node.targets):
            return isinstance(node.value, ast.Constant)
    return False


@pytest.mark.xfail(_e4m3_max_is_a_plain_float(), strict=True,
                   reason="kernels/fp8_quant.py: E4M3_MAX is a plain float (issue 13; fixed on branch i15)")
@pytest.mark.parametrize("arch", [90, 100])
def test_blocknorm_quant_kernel_compiles_without_spills(compiled, arch):
    names = [n for (n, a) in compiled if a == arch and n.startswith("fp8_blocknorm")]
    assert len(names) == 5
    for n in names:
        _check(compiled[(n, arch)])


def test_specs_match_the_kernels_signatures():
    """Every spec names each kernel argument once, as a runtime type or a constexpr."""
    import importlib

    from recopt.fp8.kernel_specs import fp8_kernel_specs

    for s in fp8_kernel_specs():
        fn = getattr(importlib.import_module(s["module"]), s["attr"])
        assert sorted(fn.arg_names) == sorted([*s["signature"], *s["constexprs"]]), s["name"]
