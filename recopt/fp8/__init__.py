"""LoKA-style FP8: probe, recipes, metrics, dispatch, the FP8 linear module, Mods.

The graph passes that use these live in :mod:`recopt.passes.fp8`
(``fp8``, ``no_bias``, ``blocknorm``, ``hardswish``, ``fp8_mods``).
"""
from .dispatch import (MIN_SPEEDUP, Candidate, MeasurementCache, SiteDecision, default_candidates, load_decisions,
                       predict_speedup, save_decisions)
from .gemm import fallbacks, reset_fallbacks
from .linear import FP8Linear, fp8_linear
from .metrics import DEFAULT_THRESHOLDS, METRICS, Metric, all_errors, register_metric
from .mods import BlockNorm, apply_blocknorm, apply_hardswish, apply_no_bias
from .probe import ActivationStats, ModuleProbe, WeightStats, collect_graph_stats, measure_overhead
from .recipes import RECIPES, Recipe, dequantize, fake_quantize, get_recipe, quantize, reference_gemm
from .scaled import scaled_gemm
from .timing import SiteTiming, environment, time_site

__all__ = [
    "MIN_SPEEDUP", "Candidate", "MeasurementCache", "SiteDecision", "default_candidates", "load_decisions",
    "predict_speedup", "save_decisions", "FP8Linear", "fp8_linear", "DEFAULT_THRESHOLDS", "METRICS", "Metric",
    "all_errors", "register_metric", "BlockNorm", "apply_blocknorm", "apply_hardswish", "apply_no_bias",
    "ActivationStats", "ModuleProbe", "WeightStats", "collect_graph_stats", "measure_overhead", "RECIPES",
    "Recipe", "dequantize", "fake_quantize", "get_recipe", "quantize", "reference_gemm", "scaled_gemm",
    "fallbacks", "reset_fallbacks", "SiteTiming", "environment", "time_site",
]
