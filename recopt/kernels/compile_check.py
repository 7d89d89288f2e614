"""Compile Triton kernels for real GPU targets on a machine without a GPU.

The CPU interpreter (``TRITON_INTERPRET=1``) runs a kernel's Python but skips
Triton's code generator, so a kernel can pass every interpreter test and still
not compile (a module-level float used inside ``@triton.jit`` is the classic
case). This module compiles kernels ahead of time with
``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget(...))``
— ptxas, ptxas-blackwell and cuobjdump ship in the triton wheel — and checks
the resource usage of the cubin:

- the compile succeeds (TTIR → TTGIR → LLVM → PTX → cubin);
- dynamic shared memory fits the target (:data:`SHARED_LIMIT`);
- no register spills: ``cuobjdump --dump-resource-usage`` reports STACK and
  LOCAL of 0.

What gets compiled is data: a :class:`KernelSpec` names a kernel by module
and attribute, its runtime argument types, its constexpr values and launch
options. Providers (``"module:function"`` strings in :data:`PROVIDERS`, each
returning a list of specs) enumerate what their launcher may pick; a new
kernel family adds one line there. Providers are looked up by name so this
module imports nothing above ``recopt.kernels``.

Compilation runs in child processes with ``TRITON_INTERPRET=0`` and a fresh
``TRITON_CACHE_DIR`` (the decorator decides interpreter vs compiler at import
time, so the parent's setting does not matter), ``workers`` at a time.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

# Max dynamic shared memory per block (bytes): 227 KB on sm_90 (H100/H200) and
# sm_100 (B200/GB200); CUDA C programming guide, "Features and technical
# specifications" (compute capabilities 9.0 and 10.0).
SHARED_LIMIT = {90: 232448, 100: 232448}
ARCHS = (90, 100)

PROVIDERS = [
    "recopt.ops._gdpa_triton:compile_specs",
    "recopt.ops._gdpa_softmax_triton:compile_specs",   # softmax GDPA (online softmax)
    "recopt.fp8.compile_specs:compile_specs",
    "recopt.fp8.kernel_specs:dual_quant_compile_specs",  # FP8 row+column quantizer (i16's branch)
]
# Providers whose module may be absent on a branch that predates it: skipped only when that
# exact module is missing. A kernel left unchecked that way still fails
# tests/test_kernel_compile.py, which requires every @triton.jit kernel in a spec.
OPTIONAL_PROVIDERS = frozenset({"recopt.fp8.kernel_specs:dual_quant_compile_specs"})


@dataclass(frozen=True)
class KernelSpec:
    """One compile: ``module.attr`` with these argument types and constexprs.

    ``signature`` maps every non-constexpr argument to a Triton type string
    (``"*bf16"``, ``"i32"``, ``"fp32"``). ``constexprs`` maps the others to
    values. ``archs``: the compute capabilities to compile it for. ``divisible`` names integer/pointer arguments the launcher sees as
    multiples of 16 (Triton specializes on this at launch; compiling with the
    same attributes gives the code a GPU runs). ``tags`` describe the spec for
    reports (kernel family, activation, variant, head size...).
    """

    name: str
    module: str
    attr: str
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    divisible: tuple = ()
    tags: dict = field(default_factory=dict)
    archs: tuple = ARCHS  # targets this spec is compiled for (a subset of the requested ones)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict) -> "KernelSpec":
        d = dict(d)
        d["divisible"] = tuple(d.get("divisible", ()))
        d["archs"] = tuple(d.get("archs", ARCHS))
        return KernelSpec(**d)


@dataclass
class CompileResult:
    """Outcome of one (spec, arch) compile. ``error`` is None on success."""

    name: str
    arch: int
    ok: bool
    error: Optional[str] = None
    registers: int = -1
    stack: int = -1
    local: int = -1
    shared: int = -1
    seconds: float = 0.0
    cubin_path: Optional[str] = None
    tags: dict = field(default_factory=dict)

    def problems(self) -> list:
        """What is wrong with this kernel on this arch (empty list: nothing)."""
        if not self.ok:
            return [f"compile error: {self.error}"]
        out = []
        limit = SHARED_LIMIT.get(self.arch)
        if limit is not None and self.shared > limit:
            out.append(f"shared memory {self.shared} B > {limit} B limit of sm_{self.arch}")
        if self.stack > 0 or self.local > 0:
            out.append(f"register spills: STACK {self.stack} B, LOCAL {self.local} B "
                       f"({self.registers} registers)")
        return out


def triton_bin(tool: str) -> str:
    """Path of a CUDA tool shipped in the triton wheel (ptxas, cuobjdump, nvdisasm)."""
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("triton is not installed; install the [gpu] extra to compile kernels")
    path = os.path.join(list(spec.submodule_search_locations)[0], "backends", "nvidia", "bin", tool)
    if not os.path.exists(path):
        raise RuntimeError(f"{tool} not found at {path}; this triton wheel does not ship the CUDA tools")
    return path


_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin_path: str) -> dict:
    """``{"registers", "stack", "static_shared", "local"}`` of the one kernel in a cubin."""
    out = subprocess.run([triton_bin("cuobjdump"), "--dump-resource-usage", cubin_path],
                         capture_output=True, text=True, check=True).stdout
    m = _USAGE.search(out)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump resource usage of {cubin_path}:\n{out}")
    reg, stack, shared, local = (int(x) for x in m.groups())
    return {"registers": reg, "stack": stack, "static_shared": shared, "local": local}


def _compile_one(spec: KernelSpec, arch: int, keep_dir: Optional[str]) -> CompileResult:
    """Compile in this process (which must not be interpreting)."""
    t0 = time.perf_counter()
    res = CompileResult(spec.name, arch, ok=False, tags=dict(spec.tags))
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = getattr(importlib.import_module(spec.module), spec.attr)
        if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
            raise RuntimeError(f"{spec.module}.{spec.attr} is not a compilable @triton.jit function "
                               "(TRITON_INTERPRET must be 0 in the compiling process)")
        sig = dict(spec.signature)
        for k in spec.constexprs:
            sig[k] = "constexpr"
        missing = [a for a in fn.arg_names if a not in sig]
        if missing:
            raise ValueError(f"spec {spec.name} gives no type or value for arguments {missing}")
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in spec.divisible}
        src = ASTSource(fn, sig, dict(spec.constexprs), attrs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
        d = keep_dir or tempfile.mkdtemp(prefix="recopt_cubin_")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"{re.sub(r'[^A-Za-z0-9_.-]', '_', spec.name)}.sm{arch}.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        use = resource_usage(path)
        res.ok = True
        res.registers, res.stack, res.local = use["registers"], use["stack"], use["local"]
        res.shared = int(k.metadata.shared) + use["static_shared"]
        res.cubin_path = path
    except Exception as e:  # reported per spec: one bad kernel must not hide the others
        msg = str(e).strip().splitlines()
        res.error = f"{type(e).__name__}: " + " | ".join(msg[-6:])[:2000]
    res.seconds = time.perf_counter() - t0
    return res


def _worker_main(argv: Sequence[str]) -> int:
    """Child process: read specs JSON from argv[0], write results JSON to argv[1]."""
    inp, outp, keep_dir = argv[0], argv[1], (argv[2] if len(argv) > 2 and argv[2] else None)
    with open(inp) as f:
        job = json.load(f)
    results = [dataclasses.asdict(_compile_one(KernelSpec.from_json(s), a, keep_dir))
               for s, a in job]
    with open(outp, "w") as f:
        json.dump(results, f)
    return 0


def collect_specs(providers: Optional[Iterable[str]] = None, level: str = "ci") -> list:
    """Every spec of every provider (``"module:function"``; ``function(level)`` → specs)."""
    specs = []
    for p in providers if providers is not None else PROVIDERS:
        mod, _, fn = p.partition(":")
        try:
            provider: Callable = getattr(importlib.import_module(mod), fn)
        except ModuleNotFoundError as e:
            if p in OPTIONAL_PROVIDERS and e.name == mod:
                continue
            raise RuntimeError(f"compile-check provider {p!r} cannot be loaded: {e}") from e
        except (ImportError, AttributeError) as e:
            raise RuntimeError(f"compile-check provider {p!r} cannot be loaded: {e}") from e
        specs.extend(provider(level))
    names = [(s.name, s.archs) for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"duplicate compile-check spec names: {sorted(dup)[:5]}")
    return specs


def compile_specs(specs: Sequence[KernelSpec], archs: Sequence[int] = ARCHS, workers: int = 2,
                  keep_dir: Optional[str] = None, timeout_s: float = 1800.0) -> list:
    """Compile every spec for every arch in ``workers`` child processes; list of CompileResult.

    Each child gets ``TRITON_INTERPRET=0`` and its own fresh ``TRITON_CACHE_DIR``.
    Jobs are dealt round-robin, most expensive kernels (largest tiles) first.
    """
    jobs = [(s.to_json(), a) for s in specs for a in archs if a in s.archs]
    jobs.sort(key=lambda j: -_cost(j[0]))
    workers = max(1, min(workers, len(jobs)))
    chunks = [jobs[i::workers] for i in range(workers)]
    tmp = tempfile.mkdtemp(prefix="recopt_compile_check_")
    procs = []
    for i, chunk in enumerate(chunks):
        inp, outp = os.path.join(tmp, f"in{i}.json"), os.path.join(tmp, f"out{i}.json")
        with open(inp, "w") as f:
            json.dump(chunk, f)
        env = dict(os.environ)
        env["TRITON_INTERPRET"] = "0"
        env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"triton_cache{i}_", dir=tmp)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "recopt.kernels.compile_check", "--worker", inp, outp, keep_dir or ""]
        procs.append((subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True), outp))
    results = []
    for p, outp in procs:
        log, _ = p.communicate(timeout=timeout_s)
        if p.returncode != 0 or not os.path.exists(outp):
            raise RuntimeError(f"compile-check worker failed (exit {p.returncode}):\n{log[-4000:]}")
        with open(outp) as f:
            results.extend(CompileResult(**r) for r in json.load(f))
    return results


def _cost(spec_json: dict) -> int:
    c = spec_json["constexprs"]
    return int(c.get("BLOCK_M", 1)) * int(c.get("BLOCK_N", 1)) * max(int(c.get("BLOCK_D", 1)), 1)


def failures(results: Iterable[CompileResult]) -> list:
    """``"name sm_XX: problem"`` lines for every result with a problem."""
    return [f"{r.name} sm_{r.arch}: {p}" for r in results for p in r.problems()]


def format_table(results: Iterable[CompileResult]) -> str:
    rows = ["| kernel spec | arch | regs | spill (stack/local) | shared B | s | status |",
            "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r.name, r.arch)):
        status = "ok" if not r.problems() else "; ".join(r.problems())
        rows.append(f"| {r.name} | sm_{r.arch} | {r.registers} | {r.stack}/{r.local} | {r.shared} | "
                    f"{r.seconds:.1f} | {status} |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--worker":
        return _worker_main(argv[1:])
    ap = argparse.ArgumentParser(description="Compile every registered Triton kernel for sm_90/sm_100 "
                                 "without a GPU and check shared memory and spills.")
    ap.add_argument("--level", default="ci", choices=("ci", "full"))
    ap.add_argument("--arch", type=int, action="append", help="90 and/or 100 (default both)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--filter", default="", help="only specs whose name contains this")
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args(argv)
    specs = [s for s in collect_specs(level=a.level) if a.filter in s.name]
    t0 = time.perf_counter()
    res = compile_specs(specs, archs=a.arch or ARCHS, workers=a.workers)
    print(format_table(res))
    bad = failures(res)
    print(f"\n{len(res)} compiles in {time.perf_counter() - t0:.1f} s, {len(bad)} problems")
    for b in bad:
        print("FAIL", b)
    if a.json:
        with open(a.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in res], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
