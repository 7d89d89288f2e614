"""Pluggable error metrics for an FP8 GEMM output against a high-precision reference.

Each metric maps ``(out, ref)`` to a float where *lower is safer*
(SQNR is reported negated by :func:`error_of` for thresholding, but
:func:`sqnr_db` itself returns dB, higher is better).

Why not LoKA's raw MERE with τ = 0.2: outputs near zero dominate a mean of
element-wise relative errors, so one e4m3 GEMM on N(0,1) data already gives
MERE ≈ 0.3 while its normwise error is ≈ 0.035 (a calibration
warning about LoKA's probe metric). recopt's ``mere`` therefore declares its denominator rule:

    MERE_floor = mean_{m,n} |out − ref| / max(|ref|, floor),
    floor = FLOOR_FRAC · RMS(ref)          (FLOOR_FRAC = 0.1)

i.e. relative error where |ref| is large, absolute error in units of a tenth
of the output's RMS where it is near zero. The thresholds in
:data:`DEFAULT_THRESHOLDS` were calibrated on known-good inputs (see
:func:`recopt.fp8.dispatch.calibrate_thresholds` and docs/fp8.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

FLOOR_FRAC = 0.1


def _pair(out: torch.Tensor, ref: torch.Tensor) -> tuple:
    if out.shape != ref.shape:
        raise ValueError(f"out has shape {tuple(out.shape)} but ref has {tuple(ref.shape)}")
    return out.detach().double(), ref.detach().double()


def normwise_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖_F / ‖ref‖_F (0 when both are zero)."""
    o, r = _pair(out, ref)
    den = float(r.norm())
    num = float((o - r).norm())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 20·log10(‖ref‖/‖out − ref‖) in dB (higher is better)."""
    e = normwise_rel_error(out, ref)
    return math.inf if e == 0 else -20.0 * math.log10(e)


def median_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """median_{m,n} |out − ref| / |ref| over elements with ref ≠ 0."""
    o, r = _pair(out, ref)
    nz = r != 0
    if not bool(nz.any()):
        return 0.0
    return float(((o - r).abs()[nz] / r.abs()[nz]).median())


def mere(out: torch.Tensor, ref: torch.Tensor, floor_frac: float = FLOOR_FRAC) -> float:
    """Mean element-wise relative error with the declared floor (module docstring)."""
    o, r = _pair(out, ref)
    rms = float(r.pow(2).mean().sqrt()) if r.numel() else 0.0
    floor = max(floor_frac * rms, 1e-30)
    return float(((o - r).abs() / r.abs().clamp_min(floor)).mean())


def mere_raw(out: torch.Tensor, ref: torch.Tensor, eps: float = 1e-7) -> float:
    """LoKA's literal MERE with a 1e-7 guard; reported only, never thresholded by default."""
    o, r = _pair(out, ref)
    return float(((o - r).abs() / (r.abs() + eps)).mean())


@dataclass(frozen=True)
class Metric:
    """An error metric: ``fn(out, ref) -> float``; ``higher_is_better`` for SQNR-like ones."""

    name: str
    fn: Callable
    higher_is_better: bool = False
    description: str = ""


METRICS: dict = {
    "normwise": Metric("normwise", normwise_rel_error, description="‖Δ‖_F/‖ref‖_F"),
    "sqnr": Metric("sqnr", sqnr_db, higher_is_better=True, description="SQNR in dB"),
    "median_re": Metric("median_re", median_rel_error, description="median |Δ|/|ref|"),
    "mere": Metric("mere", mere, description=f"mean |Δ|/max(|ref|, {FLOOR_FRAC}·RMS(ref))"),
    "mere_raw": Metric("mere_raw", mere_raw, description="mean |Δ|/(|ref|+1e-7) (LoKA literal)"),
}

# Calibrated on a known-good model (`python benchmarks/fp8_bench.py --calibrate`: an MLP tower
# 256→512→256→256 trained 60 steps on N(0,1) + Student-t(3) inputs, probed every 5 steps; every
# site × {tensorwise, rowwise, blockwise} × {forward, dgrad, wgrad}). Worst values there:
# normwise 0.066, SQNR 23.6 dB, median RE 0.059, MERE_floor 0.130. τ = 2.5 × worst
# (SQNR: worst − 8 dB), rounded: a site must be ~2.5× worse than any known-good GEMM to fail.
DEFAULT_THRESHOLDS: dict = {
    "normwise": 0.15,
    "sqnr": 16.0,
    "median_re": 0.15,
    "mere": 0.33,
    "mere_raw": math.inf,
}


def register_metric(metric: Metric, threshold: float, replace: bool = False) -> None:
    """Add a metric (and its default threshold) usable by name in the fp8 pass."""
    if metric.name in METRICS and not replace:
        raise ValueError(f"a metric named {metric.name!r} exists; pass replace=True")
    METRICS[metric.name] = metric
    DEFAULT_THRESHOLDS[metric.name] = threshold


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise ValueError(f"unknown error metric {name!r}; valid metrics: {', '.join(METRICS)}")
    return METRICS[name]


def all_errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Every registered metric's value: {name: float}."""
    return {name: m.fn(out, ref) for name, m in METRICS.items()}


def is_safe(value: float, metric: str, threshold: float) -> bool:
    """Whether ``value`` of ``metric`` passes ``threshold`` (direction-aware)."""
    m = get_metric(metric)
    if value != value:  # NaN
        return False
    return value > threshold if m.higher_is_better else value < threshold
