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


# ----------------------------------------------------------------------------- the speed guard

GUARD_FLOOR = 0.05  # smallest slow-down the guard acts on, whatever the measured noise band


def _edge_batches(args: tuple) -> dict:
    """``{"example": args, "batch 1": args sliced to one row}``; the slice only where every
    tensor argument shares the example's leading (batch) size and it is above 1."""
    out = {"example": args}
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    sizes = {int(a.shape[0]) for a in tensors if a.dim() > 0}
    if tensors and all(a.dim() > 0 for a in tensors) and len(sizes) == 1 and sizes.pop() > 1:
        out["batch 1"] = tuple(a[:1] if isinstance(a, torch.Tensor) else a for a in args)
    return out


def _time_pair(original, candidate, args: tuple, seconds: float, min_rounds: int = 8) -> dict:
    """Interleaved, shuffled timing of original / candidate / original again on ``args``.

    Wall clock (CUDA: after synchronising). Not the process's CPU time: with
    more than one thread, OpenMP workers spin-wait after each parallel region
    and that CPU time dwarfs the work (measured 8 ms for a 20 µs model); the
    thread's own CPU time misses the workers' work.
    """
    cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    clock = time.perf_counter
    fns = {"original": lambda: original(*args), "candidate": lambda: candidate(*args),
           "original again": lambda: original(*args)}
    samples = {k: [] for k in fns}
    for f in fns.values():
        f()
        f()
    order, rng = list(fns), random.Random(0)
    t_end, rounds = time.perf_counter() + seconds, 0
    while rounds < min_rounds or time.perf_counter() < t_end:
        rng.shuffle(order)
        for k in order:
            if cuda:
                torch.cuda.synchronize()
            t0 = clock()
            fns[k]()
            if cuda:
                torch.cuda.synchronize()
            samples[k].append(clock() - t0)
        rounds += 1
    med = {k: statistics.median(v) for k, v in samples.items()}
    # Clock ticks can round a tiny model's time to 0: treat that as "not measurable" (no verdict).
    if min(med.values()) <= 0:
        return {"speedup": 1.0, "noise": 1.0, "original_ms": 0.0, "candidate_ms": 0.0, "rounds": rounds}
    return {"speedup": med["original"] / med["candidate"], "noise": med["original again"] / med["original"],
            "original_ms": med["original"] * 1e3, "candidate_ms": med["candidate"] * 1e3, "rounds": rounds}


def _slower(original, candidate, args: tuple, seconds: float) -> tuple:
    """(slower?, timings): slower only when two separate measurements both put the candidate
    below ``1 - max(noise band, GUARD_FLOOR)`` — one unlucky measurement never drops a pass."""
    runs = []
    for _ in range(2):
        r = _time_pair(original, candidate, args, seconds)
        r["threshold"] = 1.0 - max(abs(1.0 - r["noise"]), GUARD_FLOOR)
        runs.append(r)
        if r["speedup"] >= r["threshold"]:
            return False, runs
    return True, runs


def speed_guard(optimized, inputs: Any, reoptimize, *, seconds: float = 0.25):
    """``optimize(..., measure="guard")``: never hand back something slower than the model here.

    Times ``optimized`` against its original at the example inputs and at
    batch 1 (interleaved in a shuffled order, medians, wall clock; ``seconds``
    per measurement). Where it is slower beyond the noise band (two separate
    measurements, see :func:`_slower`), each pass that changed the graph is
    dropped in turn — ``reoptimize(pass_names)`` rebuilds the model without it
    (capture and verification again) — and the first variant that is not
    slower at those batches is returned; with every pass dropped, the captured
    graph alone. What happened is in ``report.measured["guard"]``: the timings
    per batch and, per dropped pass, reason ``not_faster_on_target`` with the
    speed-ups with and without it; ``report.notes`` says it in words.

    Timed in eval mode without grad (inference), the mode restored afterwards;
    a separate train graph is not timed. Cost: ~2 × ``seconds`` per batch
    (≈ 0.5–1 s) when nothing is slower; a re-optimize per tried pass when
    something is.
    """
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    batches = _edge_batches(args)
    mods = [m for m in (optimized.original, optimized) if isinstance(m, torch.nn.Module)]

    def check(candidate):
        slow, timings = {}, {}
        with torch.no_grad(), eval_mode_restored(mods[0]), eval_mode_restored(candidate):
            for name, a in batches.items():
                is_slow, runs = _slower(optimized.original, candidate, a, seconds)
                timings[name] = runs
                if is_slow:
                    slow[name] = runs[-1]["speedup"]
        return slow, timings

    slow, timings = check(optimized)
    guard = {"batches": list(batches), "timings": timings, "slower_at": slow, "dropped": []}
    result, found = optimized, False
    if slow:
        pipeline = [p.name for p in optimized.report.passes]
        applied = [p.name for p in optimized.report.passes if p.status == "applied"]
        tried = []
        for name in applied + [None]:   # None: every pass dropped
            keep = [p for p in pipeline if p != name] if name is not None else []
            candidate = reoptimize(keep)
            c_slow, c_timings = check(candidate)
            tried.append({"without": name or "every pass", "slower_at": c_slow})
            if not c_slow:
                dropped = [name] if name is not None else applied
                guard["dropped"] = [{"pass": d, "reason_code": "not_faster_on_target",
                                     "speedup_with": slow, "timings_without": c_timings} for d in dropped]
                result, found = candidate, True
                break
        guard["tried"] = tried
    if slow and not found:
        result = candidate  # every variant was slower: the captured graph alone (no pass) is the last one
        result.report.notes.append(
            f"speed guard: slower at {', '.join(slow)} ({min(slow.values()):.2f}x) with every variant tried; "
            "returned the captured graph without passes")
    elif guard["dropped"]:
        names = ", ".join(d["pass"] for d in guard["dropped"])
        result.report.notes.append(
            f"speed guard: dropped {names} (not_faster_on_target): with it the model ran "
            f"{min(slow.values()):.2f}x the original at {', '.join(slow)}; without it, not slower")
    report = result.report
    measure_speedup(result, args, repeats=10, min_seconds=seconds)
    report.measured["guard"] = guard
    return result
