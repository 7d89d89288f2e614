"""``python -m recopt.fp8._compile_worker ARCH NAME...``: compile FP8 kernel specs for ``sm_ARCH``, print JSON.

Run in a child process with ``TRITON_INTERPRET=0`` (triton picks interpreter or
compiler when a kernel is decorated). Per spec: ``ok``, the error, dynamic
shared memory (bytes) and, from ``cuobjdump --dump-resource-usage`` (shipped in
the triton wheel), registers, stack and local memory (spills).
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile


def _usage(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if not m:
        return {"usage_error": out[-500:]}
    return dict(zip(("registers", "stack", "static_shared", "local"), map(int, m.groups())))


def main(argv) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .kernel_specs import fp8_kernel_specs

    arch, names = int(argv[0]), set(argv[1:])
    out = []
    for s in fp8_kernel_specs():
        if names and s["name"] not in names:
            continue
        fn = getattr(importlib.import_module(s["module"]), s["attr"])
        sig = dict(s["signature"], **{k: "constexpr" for k in s["constexprs"]})
        res = {"name": s["name"], "arch": arch}
        try:
            k = triton.compile(ASTSource(fn, sig, s["constexprs"]), target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": s["num_warps"]})
            res.update(ok=True, shared=int(k.metadata.shared), **_usage(k.asm["cubin"]))
        except Exception as e:  # reported per spec; the test fails on it
            res.update(ok=False, error=f"{type(e).__name__}: {str(e)[-800:]}")
        out.append(res)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
