"""Is ``optimize(target="cpu")`` faster than the model on this CPU? Per pass, per batch.

For each model (the bundled InterFormer, Kunlun, DLRM and four public-style
models written the way users write them: a SASRec-style sequential
recommender on ``nn.TransformerEncoder``, a DLRM-style
``EmbeddingBag`` + MLP + dot-interaction model, a DIN-style target-attention
model and an AutoInt-style model with hand-written multi-head self-attention
over its fields) and each batch size
(1, 64, 512 by default), these variants are timed **in one process,
interleaved** (round-robin A B C A B C …), after warm-up, with the same
thread count (``--threads``, default 1), and compared by the median:

- ``model``: the plain model, ``torch.no_grad()``, eval mode;
- ``model again``: the same model as a second variant — its ratio to
  ``model`` is the run-to-run noise band of that row (the order of the
  variants is shuffled every round, so no variant always runs first);
- ``<pass> only``: ``optimize(target="cpu", passes=[<pass>], backend="eager")``
  for each pass of the CPU target's default pipeline;
- ``default``: ``optimize(model, x, target="cpu")`` exactly as a user calls it
  (the target's default passes and backend);
- ``all eager`` / ``all inductor``: the default passes with ``backend="eager"`` /
  ``"inductor"`` (``--inductor all``, the default; ``--inductor none`` skips
  Inductor);
- ``--inductor each`` adds every pass alone under Inductor and
  ``model inductor`` (``torch.compile(model)``) for context; Inductor compiles
  once per batch size (tens of seconds each on 2 cores), hence not the default.

Inductor variants compile during their warm-up call; the compile seconds are
printed per model and kept in the JSON (``compile_s``), not in the timings.

Speed-ups are ``median(model) / median(variant)``; > 1 is faster. Every
variant's output is checked against the model's. Prints a markdown table
(paste into docs/benchmarks.md) and writes JSON with ``--json``.

    python benchmarks/cpu_speed.py                 # full (Inductor compiles dominate the time)
    python benchmarks/cpu_speed.py --clock cpu     # on a shared machine: this thread's CPU time
    python benchmarks/cpu_speed.py --quick         # CI smoke: DLRM-style + InterFormer, batch 1 and 8, no Inductor
    python benchmarks/cpu_speed.py --models kunlun --batches 1 --inductor none --threads 2
    python benchmarks/cpu_speed.py --site          # one GDPA site: the model's ops vs the emitted call
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import recopt  # noqa: E402
from recopt.passes.registry import default_pipeline  # noqa: E402

# ----------------------------------------------------------------------------- public-style models


class SeqRecTransformer(nn.Module):
    """SASRec-style next-item scorer on ``nn.TransformerEncoder`` (public-style, not a recopt model).

    ``forward(item_ids [B,T] long, lengths [B] long, candidates [B] long) -> logits [B]``.
    """

    def __init__(self, n_items=5000, d=64, heads=2, layers=2, max_len=50, ff=128):
        super().__init__()
        self.item = nn.Embedding(n_items, d, padding_idx=0)
        self.pos = nn.Embedding(max_len, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, item_ids, lengths, candidates):
        T = item_ids.shape[1]
        pos = torch.arange(T, device=item_ids.device)
        pad = pos[None, :] >= lengths[:, None]
        h = self.item(item_ids) + self.pos(pos)[None]
        h = self.encoder(h, src_key_padding_mask=pad)
        last = (lengths - 1).clamp(min=0)
        user = self.norm(h[torch.arange(h.shape[0], device=h.device), last])
        return (user * self.item(candidates)).sum(-1)


class DLRMStyle(nn.Module):
    """DLRM-style CTR model (public-style): bottom MLP, EmbeddingBag tables, pairwise dot
    interaction, top MLP. ``forward(dense [B,13], ids [B,n_tables,bag] long) -> logits [B]``."""

    def __init__(self, n_dense=13, tables=(1000, 500, 200, 100, 50, 20), d=16, bag=3):
        super().__init__()
        self.bag = bag
        self.bottom = nn.Sequential(nn.Linear(n_dense, 64), nn.ReLU(), nn.Linear(64, d), nn.ReLU())
        self.emb = nn.ModuleList(nn.EmbeddingBag(n, d, mode="sum") for n in tables)
        f = len(tables) + 1
        self.register_buffer("iu", torch.triu_indices(f, f, offset=1), persistent=False)
        self.top = nn.Sequential(nn.Linear(d + f * (f - 1) // 2, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, dense, ids):
        x = self.bottom(dense)
        feats = [x] + [e(ids[:, i]) for i, e in enumerate(self.emb)]
        z = torch.stack(feats, dim=1)
        inter = torch.bmm(z, z.transpose(1, 2))[:, self.iu[0], self.iu[1]]
        return self.top(torch.cat([x, inter], dim=1)).squeeze(-1)


class DINStyle(nn.Module):
    """DIN-style target attention (public-style): each history item is weighted by a small MLP
    over ``[h, t, h - t, h * t]`` (no softmax, as in DIN), masked by the history length,
    sum-pooled, then an MLP over ``[user, pooled, target]``.
    ``forward(hist [B,T] long, lengths [B] long, target [B] long, user [B] long) -> logits [B]``.
    """

    def __init__(self, n_items=5000, n_users=1000, d=32, att_hidden=36, hidden=(128, 64)):
        super().__init__()
        self.item = nn.Embedding(n_items, d, padding_idx=0)
        self.user = nn.Embedding(n_users, d)
        self.att = nn.Sequential(nn.Linear(4 * d, att_hidden), nn.Sigmoid(), nn.Linear(att_hidden, 1))
        self.mlp = nn.Sequential(nn.Linear(3 * d, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]),
                                 nn.ReLU(), nn.Linear(hidden[1], 1))

    def forward(self, hist, lengths, target, user):
        h = self.item(hist)                                  # [B, T, d]
        t = self.item(target)[:, None, :].expand_as(h)       # [B, T, d]
        w = self.att(torch.cat([h, t, h - t, h * t], dim=-1)).squeeze(-1)   # [B, T]
        keep = torch.arange(hist.shape[1], device=hist.device)[None, :] < lengths[:, None]
        pooled = (w.masked_fill(~keep, 0.0).unsqueeze(-1) * h).sum(1)
        return self.mlp(torch.cat([self.user(user), pooled, self.item(target)], dim=-1)).squeeze(-1)


class AutoIntStyle(nn.Module):
    """AutoInt-style interacting layers (public-style): field embeddings, then per layer a
    hand-written multi-head self-attention over the fields (``softmax(q kᵀ) v``, no scale, as in
    AutoInt) with a residual projection and ReLU, then a linear head.
    ``forward(ids [B,F] long, dense [B,n_dense]) -> logits [B]``.
    """

    def __init__(self, fields=(1000, 500, 200, 100, 50, 20, 10, 7), n_dense=4, d=16, heads=2, layers=2):
        super().__init__()
        self.emb = nn.ModuleList(nn.Embedding(n, d) for n in fields)
        self.dense = nn.Linear(1, d)
        self.heads = heads
        self.q = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(layers))
        self.k = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(layers))
        self.v = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(layers))
        self.res = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(layers))
        self.out = nn.Linear((len(fields) + n_dense) * d, 1)

    def forward(self, ids, dense):
        x = torch.cat([torch.stack([e(ids[:, i]) for i, e in enumerate(self.emb)], 1),
                       self.dense(dense.unsqueeze(-1))], dim=1)          # [B, F, d]
        B, Fn, d = x.shape
        H = self.heads
        for q, k, v, r in zip(self.q, self.k, self.v, self.res):
            qh = q(x).view(B, Fn, H, d // H).transpose(1, 2)
            kh = k(x).view(B, Fn, H, d // H).transpose(1, 2)
            vh = v(x).view(B, Fn, H, d // H).transpose(1, 2)
            a = torch.softmax(qh @ kh.transpose(-2, -1), dim=-1) @ vh       # [B, H, F, d/H]
            x = torch.relu(a.transpose(1, 2).reshape(B, Fn, d) + r(x))
        return self.out(x.flatten(1)).squeeze(-1)


# ----------------------------------------------------------------------------- model registry


def _movielens_like_spec(seq: int):
    from recopt.data import FeatureSpec

    return FeatureSpec(n_dense=31, sparse_cardinalities=(611, 9743, 20, 14), seq_feature_tables=(1, 2),
                       max_seq_len=seq, event_names=("liked", "not_liked"),
                       sparse_names=("user_id", "movie_id", "genre", "release_decade"))


@dataclass
class ModelCase:
    name: str
    kind: str  # "bundled" | "public-style"
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], tuple]  # (batch, seed) -> inputs


def _bundled(name: str, seq: int) -> ModelCase:
    from recopt.data import example_batch
    from recopt.models import build_model

    spec = _movielens_like_spec(seq)
    return ModelCase(name, "bundled", lambda: build_model(name, spec),
                     lambda b, seed: example_batch(spec, b, seed=seed).inputs())


def _seqrec_inputs(b: int, seed: int, T: int = 20, n_items: int = 5000) -> tuple:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (b,), generator=g)
    if b >= 2:
        lengths[0] = 1  # a length-1 history
    ids = torch.randint(1, n_items, (b, T), generator=g)
    ids = ids.masked_fill(torch.arange(T)[None, :] >= lengths[:, None], 0)
    return ids, lengths, torch.randint(1, n_items, (b,), generator=g)


def _dlrm_style_inputs(b: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(b, 13, generator=g)
    ids = torch.stack([torch.randint(0, n, (b, 3), generator=g) for n in (1000, 500, 200, 100, 50, 20)], dim=1)
    return dense, ids


def _din_style_inputs(b: int, seed: int, T: int = 30, n_items: int = 5000) -> tuple:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (b,), generator=g)
    if b >= 2:
        lengths[0], lengths[1] = 0, 1  # an empty and a length-1 history
    hist = torch.randint(1, n_items, (b, T), generator=g)
    hist = hist.masked_fill(torch.arange(T)[None, :] >= lengths[:, None], 0)
    return hist, lengths, torch.randint(1, n_items, (b,), generator=g), torch.randint(0, 1000, (b,), generator=g)


def _autoint_style_inputs(b: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randint(0, n, (b,), generator=g) for n in (1000, 500, 200, 100, 50, 20, 10, 7)], 1)
    return ids, torch.randn(b, 4, generator=g)


def model_cases(seq: int) -> dict:
    return {
        "interformer": _bundled("interformer", seq),
        "kunlun": _bundled("kunlun", seq),
        "dlrm": _bundled("dlrm", seq),
        "seqrec_transformer": ModelCase("seqrec_transformer", "public-style", SeqRecTransformer, _seqrec_inputs),
        "dlrm_style": ModelCase("dlrm_style", "public-style", DLRMStyle, _dlrm_style_inputs),
        "din_style": ModelCase("din_style", "public-style", DINStyle, _din_style_inputs),
        "autoint_style": ModelCase("autoint_style", "public-style", AutoIntStyle, _autoint_style_inputs),
    }


# ----------------------------------------------------------------------------- timing


@dataclass
class Row:
    model: str
    kind: str
    batch: int
    threads: int
    model_ms: float
    noise: float  # median(model again) / median(model)
    speedup: dict = field(default_factory=dict)  # variant -> model_ms / variant_ms
    ms: dict = field(default_factory=dict)
    rounds: int = 0
    max_abs_diff: dict = field(default_factory=dict)
    compile_s: dict = field(default_factory=dict)


CLOCKS = {
    # Wall time: what a user waits for. Noisy when other processes share the cores.
    "wall": time.perf_counter,
    # CPU time of this thread: with --threads 1 all compute runs on it, and time spent
    # descheduled (other processes on a shared machine) is not counted. Cache and
    # memory-bandwidth contention still are.
    "cpu": time.thread_time,
}


def _interleaved(fns: dict, min_rounds: int, max_rounds: int, seconds: float, clock=time.perf_counter) -> tuple:
    """Round-robin timing until ``seconds`` have passed (at least ``min_rounds``); medians in ms.

    The order within each round is shuffled (fixed seed): in a fixed order the
    first variant of a round pays for whatever the last one left in the caches
    (seen as a 0.8 "noise" ratio between two timings of one model).
    """
    samples = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    t_end = time.perf_counter() + seconds
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() < t_end):
        rng.shuffle(order)
        for k in order:
            f = fns[k]
            t0 = clock()
            f()
            samples[k].append(clock() - t0)
        rounds += 1
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}, rounds


def _max_diff(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return max((_max_diff(x, y) for x, y in zip(a, b)), default=0.0)
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def bench_model(case: ModelCase, batches, threads: int, inductor: str, seconds: float,
                min_rounds: int, example_batch: int = 8, log=print, clock: str = "wall") -> list:
    torch.manual_seed(0)
    model = case.build().eval()
    example = case.inputs(example_batch, 0)
    passes = default_pipeline("cpu")
    variants: dict = {}
    opt_kw = dict(target="cpu", n_random_inputs=1)
    variants["default"] = recopt.optimize(model, example, **opt_kw)
    for p in passes:
        variants[f"{p} only"] = recopt.optimize(model, example, passes=[p], backend="eager", **opt_kw)
    variants["all eager"] = recopt.optimize(model, example, backend="eager", **opt_kw)
    if inductor in ("all", "each"):
        variants["all inductor"] = recopt.optimize(model, example, backend="inductor", **opt_kw)
    if inductor == "each":
        variants["model inductor"] = torch.compile(model)
        for p in passes:
            variants[f"{p} only inductor"] = recopt.optimize(model, example, passes=[p], backend="inductor",
                                                             **opt_kw)
    default_backend = variants["default"].report.backend
    rows = []
    for b in batches:
        x = case.inputs(b, 1)
        fns = {"model": lambda: model(*x), "model again": lambda: model(*x)}
        fns.update({k: (lambda m=m: m(*x)) for k, m in variants.items()})
        row = Row(case.name, case.kind, b, threads, 0.0, 0.0)
        with torch.no_grad():
            want = model(*x)
            for k, f in fns.items():
                t0 = time.perf_counter()
                out = f()  # warm-up (and compile, for Inductor variants)
                row.compile_s[k] = time.perf_counter() - t0
                row.max_abs_diff[k] = _max_diff(out, want)
                for _ in range(2):
                    f()
            ms, rounds = _interleaved(fns, min_rounds, 400, seconds, CLOCKS[clock])
        row.model_ms, row.rounds = ms["model"], rounds
        row.noise = ms["model again"] / ms["model"]
        row.ms = ms
        row.speedup = {k: ms["model"] / v for k, v in ms.items() if k not in ("model", "model again")}
        rows.append(row)
        slow_first = {k: round(v, 1) for k, v in row.compile_s.items() if v > 1.0}
        if slow_first:
            log(f"  {case.name} b={b}: first call (compile) seconds: {slow_first}")
        log(f"  {case.name} b={b}: model {ms['model']:.3f} ms, noise {row.noise:.2f}, "
            + ", ".join(f"{k} {v:.2f}x" for k, v in row.speedup.items())
            + f"  ({rounds} rounds, default backend {default_backend})")
    return rows


# ----------------------------------------------------------------------------- one GDPA site


def site_cost(repeats: int = 15, calls: int = 2000, clock: str = "cpu", log=print) -> dict:
    """µs per call of one pointwise attention site (``[1,2,20,16]``, silu, scaled): the ops the
    model ran vs the lean per-site function the eager backend binds vs the generic ``gdpa()``.

    Interleaved in a shuffled order, ``calls`` calls per sample, medians of ``repeats``.
    This is why the gdpa pass leaves such sites alone on the cpu target (``not_faster_on_target``).
    """
    import torch.nn.functional as F

    from recopt.ops.gdpa import gdpa
    from recopt.ops.gdpa_site import specialize

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g) for _ in range(3))
    site = specialize(dict(activation="silu", qk_scale=0.05), [])
    fns = {"model ops": lambda: F.silu(q @ k.transpose(-2, -1)) * 0.05 @ v,
           "lean site function": lambda: site(q, k, v),
           "gdpa()": lambda: gdpa(q, k, v, activation="silu", qk_scale=0.05)}
    want = fns["model ops"]()
    for name, f in fns.items():
        torch.testing.assert_close(f(), want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    tick = CLOCKS[clock]
    samples = {n: [] for n in fns}
    order, rng = list(fns), random.Random(0)
    with torch.no_grad():
        for f in fns.values():
            for _ in range(100):
                f()
        for _ in range(repeats):
            rng.shuffle(order)
            for n in order:
                f = fns[n]
                t0 = tick()
                for _ in range(calls):
                    f()
                samples[n].append((tick() - t0) / calls * 1e6)
    med = {n: statistics.median(v) for n, v in samples.items()}
    for n, us in med.items():
        log(f"  {n:20s} {us:7.2f} µs/call ({us / med['model ops']:.2f}x the model's ops)")
    return med


# ----------------------------------------------------------------------------- output


def markdown_table(rows: list) -> str:
    cols = []
    for r in rows:
        for k in r.speedup:
            if k not in cols:
                cols.append(k)
    head = ["model", "batch", "model ms", "noise (model/model)"] + [f"{c} ×" for c in cols]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r.model} ({r.kind})", str(r.batch), f"{r.model_ms:.3f}", f"{r.noise:.2f}"]
        cells += [f"{r.speedup[c]:.2f}" if c in r.speedup else "-" for c in cols]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def noise_band(rows: list) -> float:
    """The largest |1 - median(model again)/median(model)| over the rows."""
    return max((abs(1.0 - r.noise) for r in rows), default=float("nan"))


def summary(rows: list) -> list:
    """One line per (variant) with the worst speed-up and whether it clears the noise band."""
    band = noise_band(rows)
    lines = []
    for v in ("default", "all eager", "all inductor"):
        vals = [(r.speedup[v], r.model, r.batch) for r in rows if v in r.speedup]
        if not vals:
            continue
        worst = min(vals)
        verdict = "≥ 1.0× everywhere" if worst[0] >= 1.0 else (
            f"below 1.0× but within the noise band (±{band:.2f})" if worst[0] >= 1.0 - band else "SLOWER than the model")
        lines.append(f"{v}: worst {worst[0]:.2f}× ({worst[1]}, batch {worst[2]}) — {verdict}")
    return lines


def run(models, batches, threads: int = 1, inductor: str = "all", seconds: float = 2.0, min_rounds: int = 10,
        seq: int = 20, log=print, clock: str = "wall") -> list:
    if clock == "cpu" and threads != 1:
        raise SystemExit("--clock cpu measures this thread's CPU time: use it with --threads 1")
    cases = model_cases(seq)
    unknown = sorted(set(models) - set(cases))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {sorted(cases)}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = []
        for name in models:
            log(f"{name}:")
            rows += bench_model(cases[name], batches, threads, inductor, seconds, min_rounds, log=log, clock=clock)
    finally:  # called as a library (the smoke test), it must not leave the process on other threads
        torch.set_num_threads(before)
    return rows


def main(argv: Optional[list] = None) -> list:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--batches", nargs="+", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every variant (default 1)")
    ap.add_argument("--inductor", choices=("none", "all", "each"), default=None,
                    help="Inductor variants: none, all passes together (default), or each pass alone too")
    ap.add_argument("--seconds", type=float, default=None, help="timing budget per (model, batch) point")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time (default) or this thread's CPU time (shared machines; --threads 1)")
    ap.add_argument("--quick", action="store_true", help="CI smoke test: small models and batches, no Inductor")
    ap.add_argument("--json", default=None)
    ap.add_argument("--site", action="store_true",
                    help="only time one GDPA site: the model's ops vs the lean site function vs gdpa()")
    args = ap.parse_args(argv)
    if args.site:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        print(f"one pointwise GDPA site, 1 thread, {args.clock} clock:")
        try:
            return site_cost(clock=args.clock)
        finally:
            torch.set_num_threads(before)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("RECOPT_QUIET", "1")
    if args.quick:
        models = args.models or ["dlrm_style", "interformer"]
        batches = args.batches or [1, 8]
        inductor = args.inductor or "none"
        seconds, min_rounds = (args.seconds if args.seconds is not None else 0.3), 5
    else:
        models = args.models or list(model_cases(20))
        batches = args.batches or [1, 64, 512]
        inductor = args.inductor or "all"
        seconds, min_rounds = (args.seconds if args.seconds is not None else 2.0), 10
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} thread(s), {args.clock} clock; default CPU passes: {default_pipeline('cpu')}", flush=True)
    rows = run(models, batches, args.threads, inductor, seconds, min_rounds,
               log=lambda s: print(s, flush=True), clock=args.clock)
    print()
    print(markdown_table(rows))
    print()
    print(f"noise band: ±{noise_band(rows):.2f} (largest |1 - model/model| over the rows; two timings of "
          f"the same model, interleaved)")
    for line in summary(rows):
        print(line)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        meta = {"torch": torch.__version__, "threads": args.threads, "clock": args.clock, "cpu_count": os.cpu_count(),
                "machine": platform.machine(), "processor": platform.processor(),
                "noise_band": noise_band(rows), "passes": default_pipeline("cpu")}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": [r.__dict__ for r in rows]}, f, indent=2)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
