"""Measured speed-up of an optimized model over its original, on the machine it runs on.

A report that says a pass was *applied* does not say the model got faster
here: on the CPU a fused op can cost more than the ops it replaced. This
module times both, the way benchmarks/cpu_speed.py does — one process,
interleaved in a shuffled order each round, after warm-up, same
threads, medians, eval mode under ``torch.no_grad()`` with buffers restored
afterwards — and writes the result into the report beside the speed-up the
target's roofline predicts:

    opt = recopt.optimize(model, x, target="cpu", measure=True)
    opt.report.measured_speedup        # e.g. 1.07 (median original / median optimized)
    opt.report.measured                # times, noise band, batch, threads, device

``noise`` is the ratio of the two timings of the original model: a measured
speed-up inside ``1 ± |1 - noise|`` is not distinguishable from 1.0 on this
machine at this moment.
"""
from __future__ import annotations

import os
import platform
import random
import statistics
import time
from typing import Any, Optional

import torch

from .verify import eval_mode_restored


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _batch_of(args: tuple) -> Optional[int]:
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            return int(a.shape[0])
    return None


def measure_speedup(optimized, inputs: Any, *, repeats: int = 30, warmup: int = 3,
                    min_seconds: float = 0.0) -> dict:
    """Time ``optimized.original`` and ``optimized`` interleaved on ``inputs``; fill the report.

    Sets ``optimized.report.measured_speedup`` (median original time /
    median optimized time; > 1 is faster) and ``optimized.report.measured``
    (the times in ms, ``noise``, ``batch``, ``threads``, ``device``,
    ``repeats``) and returns that dict. At least ``repeats`` rounds, more
    until ``min_seconds`` have passed.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"measure_speedup needs repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    original = optimized.original
    cuda = torch.cuda.is_available() and any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    fns = {"original": lambda: original(*args), "optimized": lambda: optimized(*args),
           "original again": lambda: original(*args)}
    samples = {k: [] for k in fns}
    # The optimized model picks its graph by its own mode, so it (not its
    # current graph) is put in eval mode.
    mods = [m for m in (original, optimized) if isinstance(m, torch.nn.Module)]
    with torch.no_grad(), eval_mode_restored(mods[0] if mods else None), \
            eval_mode_restored(mods[1] if len(mods) > 1 else None):
        for f in fns.values():
            for _ in range(warmup):
                f()
        t_end = time.perf_counter() + min_seconds
        rounds = 0
        order = list(fns)
        rng = random.Random(0)
        while rounds < repeats or time.perf_counter() < t_end:
            rng.shuffle(order)  # no variant always runs first (cache effects bias the first)
            for k in order:
                f = fns[k]
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                f()
                if cuda:
                    torch.cuda.synchronize()
                samples[k].append(time.perf_counter() - t0)
            rounds += 1
    med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    result = {
        "speedup": med["original"] / med["optimized"],
        "original_ms": med["original"],
        "optimized_ms": med["optimized"],
        "noise": med["original again"] / med["original"],
        "batch": _batch_of(args),
        "threads": torch.get_num_threads(),
        "device": _device_name(),
        "repeats": rounds,
    }
    report = getattr(optimized, "report", None)
    if report is not None:
        report.measured_speedup = result["speedup"]
        report.measured = result
    return result
