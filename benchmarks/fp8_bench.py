"""FP8 (LoKA Probe/Mods/Dispatch) benchmark: everything side by side in one run.

Modes:

- default (GPU, ≤ 7 min on an H100): :func:`run_suite` — per GEMM shape of
  ANCHORS.md and mode (inference: forward; training: forward+backward), the
  real FP8 linear (recopt's op; torchao's float8 linear where installed)
  against ``F.linear`` in bf16, with the predicted speed-up and the decision
  the measurement gives; then the LoKA tower (BlockNorm → Linear → Hardswish)
  at M = 16384, d ∈ {1024, 4096}, inference and training, bf16 under
  torch.compile vs ``recopt.optimize(..., passes=["fp8"])``, and the issue's
  targets checked on those numbers. Writes ``--out`` (JSON).
- ``--dry-run``: the same code paths at tiny shapes on the CPU; no timings
  are reported as results.
- ``--overhead``: the probe's overhead on a training step (GPU or CPU).
- ``--calibrate``: the threshold calibration of recopt.fp8.metrics (CPU).
- ``--quality``: ml-latest-small training, bf16/fp32 vs simulated FP8, with
  and without the Mods (CPU or GPU); prints LogLoss/AUC per arm.

Usage: ``PYTHONPATH=. python benchmarks/fp8_bench.py [--dry-run|--calibrate|--quality] [--out f.json]``
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SHAPES = [(4096, 256, 256), (16384, 512, 512), (32768, 1024, 1024), (65536, 2048, 512), (16384, 4096, 4096)]
TINY_SHAPES = [(64, 32, 32), (128, 64, 48)]
# What ANCHORS.md measured on an H100 (FP8 with a separate activation quantization vs bf16).
ANCHOR_DECISIONS = {(4096, 256, 256): "bf16", (16384, 512, 512): "bf16", (32768, 1024, 1024): "bf16",
                    (65536, 2048, 512): "bf16", (16384, 4096, 4096): "fp8"}


def _bench(fn, device):
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e-3
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - t0) / 3


def _cpu_timer(fn):
    """Dry runs only: wall time of one call (the CPU numbers are not results)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def site_table(device: str, shapes, modes=("inference", "training"), lowering: str = "eager",
               deadline: float = math.inf, timer=None) -> list:
    """Per GEMM site (M, K, N) and mode: recopt's FP8 linear (rowwise; training: all three GEMMs), and
    torchao's float8 linear where installed, against ``F.linear`` in bf16 — each timed as it runs
    (forward, or forward+backward) in ``lowering``; plus Dispatch's predicted speed-up and its decision
    from the measurement (FP8 only above ``MIN_SPEEDUP``)."""
    from recopt import get_target
    from recopt.fp8 import dispatch as D
    from recopt.fp8.timing import time_site
    from recopt.fp8.torchao_backend import available as torchao_available

    target = get_target("h100")
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    cands = [("recopt:rowwise", "rowwise")]
    if device == "cuda" and torchao_available():
        cands += [("torchao:rowwise", None), ("torchao:tensorwise", None)]
    rows = []
    for (m, k, n) in shapes:
        for mode in modes:
            if time.time() > deadline:
                print(f"skipping {m}x{k}x{n} {mode}: time budget reached")
                continue
            row = {"kind": "site", "shape": [m, k, n], "mode": mode, "lowering": lowering, "device": device,
                   "predicted_speedup": D.predict_speedup(target, m, k, n, "forward", mode)}
            for label, recipe in cands:
                if label.startswith("recopt"):
                    roles = ("forward",) if mode == "inference" else ("forward", "dgrad", "wgrad")
                    cand = {"backend": "recopt", "recipes": {r: ("rowwise" if r in roles else "bf16")
                                                             for r in ("forward", "dgrad", "wgrad")}}
                else:
                    cand = {"backend": "torchao", "recipe": label.split(":")[1]}
                t = time_site(m, k, n, cand, mode=mode, lowering=lowering, device=device, dtype=dt,
                              bias=False, timer=timer or (_cpu_timer if device == "cpu" else None), rounds=3)
                row[label] = t.to_dict()
            best = max(((row[lb]["speedup"], lb) for lb, _ in cands), default=(0.0, ""))
            row["chosen"] = best[1] if best[0] > D.MIN_SPEEDUP else "bf16"
            row["chosen_speedup"] = best[0] if row["chosen"] != "bf16" else 1.0
            row["anchors_decision"] = ANCHOR_DECISIONS.get((m, k, n))
            rows.append(row)
    return rows


def print_site_table(rows):
    print("\nper-site FP8 vs bf16 F.linear (median ms per step; speed-up = bf16 / candidate)")
    for r in rows:
        cells = [f"{'×'.join(map(str, r['shape']))} {r['mode']}"]
        for key, v in r.items():
            if isinstance(v, dict) and "speedup" in v:
                cells.append(f"{key} {v['fp8_s'] * 1e3:.3f} ms ({v['speedup']:.2f}×, bf16 {v['bf16_s'] * 1e3:.3f} ms)")
        pred = r["predicted_speedup"]
        cells.append(f"predicted {pred:.2f}×" if pred else "predicted n/a")
        cells.append(f"chosen {r['chosen']}")
        print(" | ".join(cells))


class LokaTower(nn.Module):
    """The LoKA tower: ``depth`` × (BlockNorm → Linear(d, d) → Hardswish), then a head."""

    def __init__(self, d: int, depth: int = 2, block: int = 256):
        super().__init__()
        from recopt.fp8.mods import BlockNorm

        self.norms = nn.ModuleList(BlockNorm(d, block=block) for _ in range(depth))
        self.lins = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(depth))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        for norm, lin in zip(self.norms, self.lins):
            x = F.hardswish(lin(norm(x)))
        return self.head(x).squeeze(-1)


def tower(device: str, batch: int, d: int, depth: int = 2, modes=("inference", "training"), timer=None) -> list:
    """The tower in bf16 under torch.compile against ``recopt.optimize(passes=["fp8"])`` (Dispatch measuring
    on this GPU; inductor), per mode; CPU dry runs use eager and the predicted decisions."""
    import recopt
    from recopt.fp8.mods import BlockNorm
    from recopt.fp8.timing import default_timer, make_step

    dt = torch.bfloat16 if device == "cuda" else torch.float32
    timer = timer or (default_timer if device == "cuda" else _cpu_timer)
    out = []
    for mode in modes:
        torch.manual_seed(0)
        base = LokaTower(d, depth, block=256 if d % 256 == 0 else d).to(device, dt).train(mode == "training")
        x = torch.randn(batch, d, device=device, dtype=dt)
        opt = recopt.optimize(base, (x,), target="auto" if device == "cuda" else "h100", passes=["fp8"],
                              backend="inductor" if device == "cuda" else "eager", leaf_modules=[BlockNorm],
                              n_random_inputs=0,
                              configs={"fp8": {"mode": mode, "samples": 1, "max_eval_rows": 128,
                                               "lowering": "compile" if device == "cuda" else "eager",
                                               "recipes": ["tensorwise", "rowwise", "rowwise_gw_hp"]}})
        ref = torch.compile(base) if device == "cuda" else base
        sb, so = make_step(ref, x, mode), make_step(opt, x, mode)
        sb(), so()
        tb = sorted(timer(sb) for _ in range(3))[1]
        to = sorted(timer(so) for _ in range(3))[1]
        sites = opt.report.sites_for("fp8")
        row = {"kind": "tower", "batch": batch, "d": d, "depth": depth, "mode": mode, "device": device,
               "bf16_compiled_s": tb, "recopt_fp8_s": to, "speedup": tb / to,
               "fp8_sites": [(s.module_path, s.details.get("backend", ""), s.details.get("basis", ""))
                             for s in sites if s.status == "rewritten"],
               "kept_bf16": [(s.module_path, s.reason_code) for s in sites if s.status != "rewritten"]}
        print(f"tower M={batch} d={d} {mode}: bf16 compiled {tb * 1e3:.3f} ms, recopt fp8 {to * 1e3:.3f} ms "
              f"({row['speedup']:.2f}×; {len(row['fp8_sites'])} FP8 sites)")
        out.append(row)
    return out


TARGETS = {  # issue 16 (H100): the tower's speed-up over bf16-compiled
    ("inference", 4096): 1.3, ("inference", 1024): 1.1, ("training", 4096): 1.2}


def check_targets(rows: list) -> list:
    """Plain-language verdicts for the issue's targets from measured rows (nothing is predicted here)."""
    out = []
    for r in rows:
        if r["kind"] == "tower":
            want = TARGETS.get((r["mode"], r["d"]))
            if want is not None:
                ok = r["speedup"] >= want or (r["d"] == 1024 and not r["fp8_sites"])
                out.append(f"tower d={r['d']} {r['mode']}: {r['speedup']:.2f}× (target ≥ {want}×"
                           f"{' or FP8 not chosen' if r['d'] == 1024 else ''}): {'met' if ok else 'NOT met'}")
        elif r["kind"] == "site" and r["chosen"] != "bf16" and r["chosen_speedup"] < 1.0:
            out.append(f"site {r['shape']} {r['mode']}: chosen {r['chosen']} is slower than bf16")
        elif r["kind"] == "site" and r["shape"] == [4096, 256, 256]:
            out.append(f"site 4096×256×256 {r['mode']}: {'stays bf16' if r['chosen'] == 'bf16' else 'NOT bf16'}")
    return out


def run_suite(device: str = "cuda", dry_run: bool = False, budget_s: float = 420.0) -> list:
    """Everything issue 16 asks to measure, as rows (dicts) for ``benchmarks/gpu_suite.py``.

    GPU: the per-site table at ANCHORS.md's shapes (eager lowering, both modes) and the tower at
    M = 16384, d ∈ {1024, 4096}, inference and training, vs bf16 under torch.compile. ``dry_run`` (or a
    CPU device) runs the same code at tiny shapes; its rows carry ``"dry_run": True`` and are not results.
    """
    start = time.time()
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run_suite('cuda') needs a CUDA device; use dry_run=True on a CPU")
    dry = dry_run or device == "cpu"
    shapes = TINY_SHAPES if dry else SHAPES
    rows = site_table(device, shapes, deadline=start + budget_s * 0.4)
    towers = [(64, 32)] if dry else [(16384, 1024), (16384, 4096)]
    for batch, d in towers:
        if time.time() - start > budget_s * 0.9:
            print(f"skipping tower d={d}: time budget reached")
            continue
        rows += tower(device, batch, d)
    for r in rows:
        r["dry_run"] = dry
        if device == "cuda":
            r["device_name"] = torch.cuda.get_device_name(0)
    return rows


def calibrate() -> dict:
    from recopt.fp8.dispatch import calibrate_thresholds
    from recopt.fp8.probe import ModuleProbe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 256))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    probe = ModuleProbe(model, interval=5)
    for _ in range(60):
        x = torch.cat([torch.randn(128, 256), torch.distributions.StudentT(3.0).sample((128, 256))])
        loss = (model(x) - x.flip(1)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe.remove()
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    res = calibrate_thresholds(probe.activations, weights, roles=("forward", "dgrad", "wgrad"))
    for k, v in res.items():
        print(f"{k:10s} worst {v['worst']:.4f}  ->  threshold {v['threshold']:.3f}")
    return res


def overhead(device: str) -> dict:
    from recopt.fp8.probe import ModuleProbe, measure_overhead

    torch.manual_seed(0)
    d = 1024 if device == "cuda" else 64
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(d, d), nn.ReLU())]).to(device)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(4096 if device == "cuda" else 256, d, device=device)

    def step():
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    probe = ModuleProbe(model, interval=100)
    res = measure_overhead(step, probe, steps=800 if device == "cuda" else 200)
    # A steadier estimate on a noisy machine: the cost of one statistics update per site, paid once
    # every `interval` steps, over the step time.
    from recopt.fp8.probe import ActivationStats

    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0].detach()))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    step()
    for h in hooks:
        h.remove()
    t0 = time.perf_counter()
    for _ in range(5):
        for name, x_in in inputs.items():
            ActivationStats(x_in.shape[-1]).update(x_in)
    update_s = (time.perf_counter() - t0) / 5
    res["update_s_all_sites"] = update_s
    res["estimated_overhead"] = update_s / probe.interval / res["plain_s"]
    print(f"probe overhead (interval 100): measured {res['overhead'] * 100:+.2f}% "
          f"({res['plain_s'] * 1e3:.3f} → {res['probed_s'] * 1e3:.3f} ms/step); from the update cost "
          f"({update_s * 1e3:.2f} ms per sampled step): {res['estimated_overhead'] * 100:.2f}%")
    return res


def quality(steps: int, model_name: str, batch_size: int, seed: int = 0, arms_wanted=None) -> dict:
    import recopt
    from recopt.data.movielens import load_movielens
    from recopt.models import build_model
    from recopt.train.loop import TrainConfig, seed_everything, train

    ds = load_movielens(os.environ.get("RECOPT_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..",
                                                                          "shared", "data")))
    cfg = TrainConfig(epochs=100, max_steps=steps, batch_size=batch_size, seed=seed, progress=False,
                      device="auto")
    example = next(iter(ds.train.batches(batch_size))).inputs()
    arms = {"baseline": [], "fp8": ["fp8"], "mods": ["fp8_mods"], "mods+fp8": ["fp8_mods", "fp8"]}
    out = {}
    for arm, passes in arms.items():
        if arms_wanted and arm not in arms_wanted:
            continue
        seed_everything(seed)
        model = build_model(model_name, ds.train.spec).train()
        if passes:
            opt = recopt.optimize(model, example, target="h100", passes=passes, backend="eager",
                                  configs={"fp8": {"ignore_speed": True, "mode": "training", "samples": 2}}
                                  if "fp8" in passes else None)
            runner, params = opt, list(opt.parameters())
            n8 = len(opt.report.sites_for("fp8", "rewritten"))
        else:
            runner, params, n8 = model, list(model.parameters()), 0
        seed_everything(seed)
        t0 = time.time()
        r = train(runner, ds.train, ds.test, cfg, parameters=params)
        out[arm] = {"metrics": r.metrics.as_dict(), "steps": r.steps, "fp8_sites": n8, "seconds": time.time() - t0}
        print(f"{arm:9s} {r.metrics.as_dict()} fp8 sites={n8} ({time.time() - t0:.0f}s)")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU; exercises the code paths only")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--overhead", action="store_true", help="the probe's overhead on a training step")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--model", default="dlrm")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default="", help="comma-separated subset of baseline,fp8,mods,mods+fp8")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop adding work after this many seconds")
    ap.add_argument("--out", default="fp8_bench.json")
    args = ap.parse_args(argv)
    start = time.time()
    result = {"torch": torch.__version__}
    if args.calibrate:
        result["calibration"] = calibrate()
    elif args.overhead:
        result["probe_overhead"] = overhead("cuda" if torch.cuda.is_available() else "cpu")
    elif args.quality:
        result["quality"] = quality(args.steps, args.model, args.batch_size, args.seed,
                                    [a for a in args.arms.split(",") if a])
    else:
        device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
        if device == "cpu" and not args.dry_run:
            print("no CUDA device: use --dry-run (code paths only) or run on a GPU", file=sys.stderr)
            return 2
        if device == "cuda":
            result["device"] = torch.cuda.get_device_name(0)
        else:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        result["rows"] = run_suite(device, dry_run=args.dry_run, budget_s=args.budget_s)
        print_site_table([r for r in result["rows"] if r["kind"] == "site"])
        result["verdicts"] = check_targets(result["rows"]) if device == "cuda" else []
        for v in result["verdicts"]:
            print(v)
        if args.dry_run:
            result["note"] = "dry run on CPU: timings exercise the code only and are not results"
    result["wall_s"] = time.time() - start
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
