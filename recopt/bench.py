"""One benchmark runner for CPU and GPU: variants timed side by side.

Machines are noisy, so variants are timed in the same process, alternating
(round-robin: A B C A B C ...), after warm-up, and compared by the median.
On CUDA each sample is timed with CUDA events around the call; on the CPU
with ``time.perf_counter``. Ratios are against the first variant.

    from recopt.bench import Variant, compare
    res = compare([Variant("eager", f0), Variant("recopt", f1)], flops=2*M*N*K, target="h100")
    print(res.table()); res.to_json("out.json")
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from ._progress import progress_bar
from .targets import get_target


@dataclass
class Variant:
    """A named zero-argument callable to time."""

    name: str
    fn: Callable[[], Any]


@dataclass
class VariantResult:
    name: str
    median_s: float
    min_s: float
    p90_s: float
    samples: int
    ratio_vs_first: float = 1.0
    tflops: Optional[float] = None
    mfu: Optional[float] = None
    error: str = ""


@dataclass
class BenchResult:
    """Results of :func:`compare`, with the conditions they were measured under."""

    variants: list
    device: str
    torch_version: str
    repeats: int
    warmup: int
    flops: Optional[float] = None
    target: Optional[str] = None
    notes: list = field(default_factory=list)

    def table(self) -> str:
        rows = [("variant", "median ms", "min ms", "p90 ms", "speed-up vs " + self.variants[0].name, "TFLOP/s", "MFU")]
        for v in self.variants:
            if v.error:
                rows.append((v.name, "failed", "", "", "", "", v.error[:60]))
                continue
            rows.append((
                v.name, f"{v.median_s * 1e3:.3f}", f"{v.min_s * 1e3:.3f}", f"{v.p90_s * 1e3:.3f}",
                f"{1.0 / v.ratio_vs_first:.2f}x" if v.ratio_vs_first else "",
                f"{v.tflops:.1f}" if v.tflops is not None else "-",
                f"{v.mfu * 100:.1f}%" if v.mfu is not None else "-",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"({self.device}, torch {self.torch_version}, median of {self.repeats} alternating samples "
                     f"after {self.warmup} warm-up calls each)")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = asdict(self)
        return d

    def to_json(self, path: Optional[str] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import os
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _time_once(fn: Callable, cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(
    variants: Sequence[Variant],
    *,
    repeats: int = 20,
    warmup: int = 3,
    flops: Optional[float] = None,
    target: Any = None,
    progress: bool = True,
) -> BenchResult:
    """Time ``variants`` alternately; medians and ratios against the first.

    ``flops`` (per call) gives achieved TFLOP/s; with a GPU ``target`` (a
    name or Target) MFU against its dense bf16 peak. A variant that raises
    is reported as failed, the others still run.
    """
    if not variants:
        raise ValueError("compare() needs at least one variant")
    cuda = torch.cuda.is_available()
    tgt = get_target(target) if target is not None else None
    errors: dict = {}
    for v in progress_bar(variants, desc="warm-up", disable=not progress):
        try:
            for _ in range(warmup):
                v.fn()
            if cuda:
                torch.cuda.synchronize()
        except Exception as e:
            errors[v.name] = f"{type(e).__name__}: {e}"
    samples: dict = {v.name: [] for v in variants}
    live = [v for v in variants if v.name not in errors]
    for _ in progress_bar(range(repeats), desc="timing", total=repeats, disable=not progress):
        for v in live:
            samples[v.name].append(_time_once(v.fn, cuda))
    results = []
    base = None
    for v in variants:
        if v.name in errors:
            results.append(VariantResult(v.name, float("nan"), float("nan"), float("nan"), 0, 0.0, error=errors[v.name]))
            continue
        s = sorted(samples[v.name])
        med = statistics.median(s)
        base = base if base is not None else med
        r = VariantResult(v.name, med, s[0], s[min(len(s) - 1, int(0.9 * len(s)))], len(s), med / base)
        if flops:
            r.tflops = flops / med / 1e12
            if tgt is not None and tgt.peak_bf16_tflops and cuda and tgt.device == "cuda":
                r.mfu = r.tflops / tgt.peak_bf16_tflops
        results.append(r)
    notes = []
    if tgt is not None and tgt.device == "cuda" and not cuda:
        notes.append(f"target {tgt.name} is a GPU but no GPU is present: times are CPU times, MFU not meaningful")
    return BenchResult(results, _device_name(), torch.__version__, repeats, warmup, flops,
                       tgt.name if tgt else None, notes)
