"""Launch signatures of the attention kernels, as compile-check specs.

:mod:`recopt.kernels.compile_check` compiles a kernel from a
:class:`~recopt.kernels.compile_check.KernelSpec`: the runtime argument types,
the constexpr values and the arguments Triton sees as multiples of 16. A
launch with contiguous tensors specializes the same way everywhere: pointers
are 16-byte aligned, strides of 1 become constexpr 1, other strides and the
head sizes are multiples of 16. :class:`SpecBuilder` writes those rules once;
the GDPA launchers (pointwise and softmax) describe their kernels with it.

Imports nothing from recopt at module level (the compile check loads the
providers in child processes; ``KernelSpec`` is imported when a spec is built).
"""
from __future__ import annotations

from typing import Iterable

import torch

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class SpecBuilder:
    """Collects one kernel's signature, constexprs and divisibility, in argument order.

    ``dtype``: the element type of the tensors (``*bf16`` pointers for bf16...).
    A name given both a runtime type and a constexpr value is a constexpr.
    """

    def __init__(self, dtype: torch.dtype):
        self.ty = TYPES[dtype]
        self.sig: dict = {}
        self.const: dict = {}
        self.div: list = []

    def pointers(self, names: Iterable[str], ty: str = "") -> "SpecBuilder":
        """Pointer arguments (16-byte aligned: divisible); element type ``ty`` (``"fp32"``,
        ``"i64"``) or the builder's dtype."""
        for n in names:
            self.sig[n] = f"*{ty or self.ty}"
            self.div.append(n)
        return self

    def strides(self, groups: Iterable[str]) -> "SpecBuilder":
        """Stride groups such as ``"sqb sqt sqh sqd"``: the last (the contiguous head dim or
        key axis) is constexpr 1, the others ``i32`` multiples of 16 (a jagged batch stride
        of 0 is divisible too)."""
        for group in groups:
            names = group.split()
            self.ints(names[:-1], divisible=True)
            self.const[names[-1]] = 1
        return self

    def ints(self, names: Iterable[str], divisible: bool = False) -> "SpecBuilder":
        for n in names:
            self.sig[n] = "i32"
            if divisible:
                self.div.append(n)
        return self

    def floats(self, names: Iterable[str]) -> "SpecBuilder":
        for n in names:
            self.sig[n] = "fp32"
        return self

    def constexprs(self, **values) -> "SpecBuilder":
        self.const.update(values)
        return self

    def divisible(self, *names: str) -> "SpecBuilder":
        """Mark runtime arguments divisible by 16 (e.g. a stride-0 batch stride)."""
        self.div.extend(names)
        return self

    def attention_scalars(self, d: int, gqa: bool) -> "SpecBuilder":
        """The shape and mask scalars every GDPA kernel takes: ``H, T_Q, T_K, D, DV, window,
        causal_off`` (``D``, ``DV`` divisible from d = 16), ``GROUP`` (constexpr 1 unless
        ``gqa``), ``qk_scale`` and ``pre_scale``."""
        self.ints(("H", "T_Q", "T_K", "D", "DV", "window", "causal_off"))
        if d >= 16:
            self.divisible("D", "DV")
        if gqa:
            self.ints(("GROUP",))
        else:
            self.const["GROUP"] = 1
        return self.floats(("qk_scale", "pre_scale"))

    def build(self, name: str, module: str, attr: str, num_warps: int, num_stages: int, tags: dict):
        from recopt.kernels.compile_check import KernelSpec

        sig = {n: t for n, t in self.sig.items() if n not in self.const}
        div = tuple(n for n in dict.fromkeys(self.div) if n not in self.const)
        return KernelSpec(name=name, module=module, attr=attr, signature=sig, constexprs=dict(self.const),
                          num_warps=num_warps, num_stages=num_stages, divisible=div, tags=dict(tags))
