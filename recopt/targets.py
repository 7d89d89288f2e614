"""Hardware targets: versioned, serialisable profiles that passes decide from.

A :class:`Target` is data. Passes read ``peak_bf16_tflops``, ``features`` and
so on; nothing inside a pass branches on the name of the device it runs on.
Only :func:`get_target("auto")` looks at the current machine, and it maps
what it finds to one of the profiles below.

Figures are dense (no 2:4 sparsity) peaks per GPU from the vendor's
datasheets, cited beside each profile.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

TARGET_SCHEMA_VERSION = 1

FEATURES = {
    "bf16": "bfloat16 tensor cores",
    "fp8": "FP8 (e4m3/e5m2) tensor cores",
    "tma": "Tensor Memory Accelerator (bulk async copies)",
    "wgmma": "warpgroup MMA (Hopper)",
    "tcgen05": "5th-generation tensor core instructions (Blackwell)",
    "cuda": "runs CUDA kernels (Triton path available)",
}


@dataclass(frozen=True)
class Target:
    """A hardware profile.

    Peaks are dense TFLOP/s per device; ``None`` means unknown (the CPU
    profile), in which case roofline-based decisions say they are not
    predicted. ``version`` changes when a profile's figures change, and is
    recorded in reports and export manifests.
    """

    name: str
    device: str  # "cuda" or "cpu"
    peak_bf16_tflops: Optional[float] = None
    peak_fp8_tflops: Optional[float] = None
    hbm_gbps: Optional[float] = None
    sm_count: Optional[int] = None
    memory_gib: Optional[float] = None
    features: frozenset = field(default_factory=frozenset)
    source: str = ""
    version: int = TARGET_SCHEMA_VERSION
    # The backend optimize() uses when none is given ("eager" or "inductor");
    # None: Inductor on GPUs, eager on CPUs (recopt.lower.default_backend).
    default_backend: Optional[str] = None

    def has(self, feature: str) -> bool:
        return feature in self.features

    def roofline_seconds(self, flops: float, bytes_moved: float, dtype: str = "bf16") -> Optional[float]:
        """max(compute time, memory time) at peak, or None if a peak is unknown."""
        peak = self.peak_fp8_tflops if dtype == "fp8" else self.peak_bf16_tflops
        if peak is None or self.hbm_gbps is None:
            return None
        return max(flops / (peak * 1e12), bytes_moved / (self.hbm_gbps * 1e9))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["features"] = sorted(self.features)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Target":
        d = dict(d)
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"unknown Target field(s) {unknown}; valid fields: {sorted(valid)}")
        d["features"] = frozenset(d.get("features", ()))
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "Target":
        return cls.from_dict(json.loads(text))


_GPU_FEATURES_HOPPER = frozenset({"bf16", "fp8", "tma", "wgmma", "cuda"})

PROFILES: dict[str, Target] = {
    # NVIDIA HGX B200 datasheet (8 GPUs: 36 PFLOPS BF16 and 72 PFLOPS FP8 with
    # sparsity, 64 TB/s HBM3e, 1.44 TB): per GPU dense 2.25 / 4.5 PFLOPS,
    # 8 TB/s, 180 GB. 148 SMs per the Blackwell architecture brief.
    "b200": Target(
        name="b200", device="cuda", peak_bf16_tflops=2250.0, peak_fp8_tflops=4500.0,
        hbm_gbps=8000.0, sm_count=148, memory_gib=180.0,
        features=frozenset({"bf16", "fp8", "tma", "tcgen05", "cuda"}),
        source="NVIDIA HGX B200 datasheet, per-GPU dense figures",
    ),
    # NVIDIA H100 SXM5 datasheet: 989 TFLOPS BF16, 1,979 TFLOPS FP8 (dense),
    # 3.35 TB/s HBM3, 80 GB; 132 SMs (Hopper whitepaper).
    "h100": Target(
        name="h100", device="cuda", peak_bf16_tflops=989.0, peak_fp8_tflops=1979.0,
        hbm_gbps=3350.0, sm_count=132, memory_gib=80.0, features=_GPU_FEATURES_HOPPER,
        source="NVIDIA H100 SXM5 datasheet, dense figures",
    ),
    # NVIDIA H200 SXM datasheet: same compute as H100 SXM, 4.8 TB/s HBM3e, 141 GB.
    "h200": Target(
        name="h200", device="cuda", peak_bf16_tflops=989.0, peak_fp8_tflops=1979.0,
        hbm_gbps=4800.0, sm_count=132, memory_gib=141.0, features=_GPU_FEATURES_HOPPER,
        source="NVIDIA H200 SXM datasheet, dense figures",
    ),
    # NVIDIA A100 SXM4 80GB datasheet: 312 TFLOPS BF16 (dense), no FP8,
    # 2,039 GB/s HBM2e; 108 SMs.
    "a100": Target(
        name="a100", device="cuda", peak_bf16_tflops=312.0, peak_fp8_tflops=None,
        hbm_gbps=2039.0, sm_count=108, memory_gib=80.0,
        features=frozenset({"bf16", "cuda"}),
        source="NVIDIA A100 SXM4 80GB datasheet, dense figures",
    ),
    # A generic CPU: no tensor-core peaks are assumed, so roofline decisions
    # for GPU features (FP8, Triton kernels) are never taken for it.
    # Default backend eager, chosen by benchmarks/cpu_speed.py (docs/benchmarks.md,
    # "CPU: optimize(target='cpu') vs the model"): with the default passes, eager
    # (lean generated forward) was >= 1.0x the model at batch 1/64/512 for every
    # benchmarked model, while backend="inductor" ranged from 0.55x (DLRM-style,
    # batch 1) to 1.55x (InterFormer, batch 1) and costs tens of seconds of
    # compilation (and a C++ compiler) per shape: opt in with backend="inductor".
    # device="cpu" also means "no fused GDPA kernel": the gdpa pass leaves sites that would
    # run the model's own ops alone here (not_faster_on_target, recopt/passes/gdpa/cpu.py).
    "cpu": Target(name="cpu", device="cpu", features=frozenset(), source="generic CPU (no peaks assumed)",
                  default_backend="eager"),
}


def available_targets() -> list[str]:
    return sorted(PROFILES) + ["auto"]


def detect_target() -> Target:
    """The profile of the current machine: the first CUDA device, else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return PROFILES["cpu"]
    name = torch.cuda.get_device_name(0).lower()
    for key in ("b200", "h200", "h100", "a100"):
        if key in name:
            return PROFILES[key]
    major, _ = torch.cuda.get_device_capability(0)
    # Unknown card: pick the profile of its architecture generation.
    if major >= 10:
        return PROFILES["b200"]
    if major == 9:
        return PROFILES["h100"]
    return PROFILES["a100"]


def get_target(target) -> Target:
    """Resolve a target name, a dict, or a :class:`Target` into a :class:`Target`."""
    if isinstance(target, Target):
        return target
    if isinstance(target, dict):
        return Target.from_dict(target)
    if not isinstance(target, str):
        raise TypeError(f"target must be a name, a dict or a recopt.Target, got {type(target).__name__}")
    key = target.lower()
    if key == "auto":
        return detect_target()
    if key not in PROFILES:
        raise ValueError(f"unknown target {target!r}; valid targets: {', '.join(available_targets())}")
    return PROFILES[key]
