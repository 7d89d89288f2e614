"""FP8 (LoKA Probe/Mods/Dispatch) benchmark: everything side by side in one run.

Modes:

- default (GPU, ≤ 6 min on an H100): for each GEMM shape of ANCHORS.md, times
  bf16, FP8 rowwise GEMM only, FP8 + separate activation quantization
  (torch.compile'd), and FP8 fed by recopt's fused BlockNorm→quantize Triton
  kernel (vs compiled bf16 BlockNorm + bf16 GEMM); prints predicted vs measured
  speed-ups and Dispatch's decision per shape and checks it never picks a
  shape measured slower than bf16. Then a GEMM-heavy tower (BlockNorm →
  Linear → Hardswish blocks) is timed for a compiled training step and
  inference, bf16 vs ``recopt.optimize(..., passes=["fp8"])``.
  Writes ``--out`` (JSON).
- ``--dry-run``: the same code paths at tiny shapes on the CPU; no timings
  are reported as results.
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


def gemm_table(device: str, shapes, deadline: float) -> list:
    from recopt import get_target
    from recopt.fp8 import dispatch as D
    from recopt.fp8.fused_quant import blocknorm_quant, block_rms_norm
    from recopt.fp8.recipes import E4M3, quantize

    target = get_target("h100")
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    quant_x = torch.compile(lambda t: quantize(t, E4M3, "rowwise", 1)) if device == "cuda" else \
        (lambda t: quantize(t, E4M3, "rowwise", 1))
    bn_bf16 = torch.compile(lambda t: block_rms_norm(t, 256 if t.shape[1] % 256 == 0 else t.shape[1])) \
        if device == "cuda" else (lambda t: block_rms_norm(t, t.shape[1]))
    rows = []
    for (m, k, n) in shapes:
        if time.time() > deadline:
            print(f"skipping {m}x{k}x{n}: time budget reached")
            break
        x = torch.randn(m, k, device=device, dtype=dt)
        w = torch.randn(n, k, device=device, dtype=dt) / math.sqrt(k)
        wt = w.t()
        xq, xs = quantize(x, E4M3, "rowwise", 1)
        wq, ws = quantize(wt, E4M3, "rowwise", 0)
        wq = wq.t().contiguous().t()
        out_dtype = torch.bfloat16 if device == "cuda" else torch.float32
        gemm8 = lambda: torch._scaled_mm(xq, wq, scale_a=xs, scale_b=ws, out_dtype=out_dtype)  # noqa: E731

        def sep():
            q, s = quant_x(x)
            return torch._scaled_mm(q, wq, scale_a=s, scale_b=ws, out_dtype=out_dtype)

        block = 256 if k % 256 == 0 else k

        def fused():
            q, s, _ = blocknorm_quant(x, block, norm=True, write_y=False)
            return torch._scaled_mm(q, wq, scale_a=s, scale_b=ws, out_dtype=out_dtype)

        def bf16_norm_gemm():
            return bn_bf16(x) @ wt

        t = {"bf16": _bench(lambda: x @ wt, device), "fp8_gemm_only": _bench(gemm8, device),
             "fp8_separate_quant": _bench(sep, device), "bf16_blocknorm_gemm": _bench(bf16_norm_gemm, device),
             "fp8_fused_blocknorm_quant": _bench(fused, device)}
        pred_sep = D.predict_speedup(target, m, k, n, input_fused=False)
        pred_fused = D.predict_speedup(target, m, k, n, input_fused=True)
        meas_sep = t["bf16"] / t["fp8_separate_quant"]
        meas_fused = t["bf16_blocknorm_gemm"] / t["fp8_fused_blocknorm_quant"]
        cand = D.Candidate("torch", "rowwise")
        dispatch_meas = D.measure_speedup("h100", m, k, n, cand, "forward", "inference", False) \
            if device == "cuda" else None
        rows.append({"shape": [m, k, n], "seconds": t, "predicted_speedup_separate": pred_sep,
                     "predicted_speedup_fused": pred_fused, "measured_speedup_separate": meas_sep,
                     "measured_speedup_fused": meas_fused, "dispatch_measured_speedup": dispatch_meas,
                     "decision_separate": "fp8" if (dispatch_meas or meas_sep) > D.MIN_SPEEDUP else "bf16",
                     "decision_predicted_separate": "fp8" if pred_sep > D.MIN_SPEEDUP else "bf16",
                     "decision_predicted_fused": "fp8" if pred_fused > D.MIN_SPEEDUP else "bf16",
                     "anchors_decision_separate": ANCHOR_DECISIONS.get((m, k, n))})
    return rows


def print_gemm_table(rows, device):
    unit = 1e6
    print(f"\nGEMMs ({device}); times in µs; speed-ups vs bf16 (fused: vs bf16 BlockNorm + bf16 GEMM)")
    hdr = ("M×K×N", "bf16", "fp8 only", "fp8+sep q", "bn+bf16", "fused bn-q+fp8", "pred sep", "meas sep",
           "pred fused", "meas fused", "decision", "ANCHORS")
    print(" | ".join(hdr))
    for r in rows:
        s = r["seconds"]
        print(" | ".join([
            "×".join(map(str, r["shape"])), f"{s['bf16'] * unit:.1f}", f"{s['fp8_gemm_only'] * unit:.1f}",
            f"{s['fp8_separate_quant'] * unit:.1f}", f"{s['bf16_blocknorm_gemm'] * unit:.1f}",
            f"{s['fp8_fused_blocknorm_quant'] * unit:.1f}", f"{r['predicted_speedup_separate']:.2f}",
            f"{r['measured_speedup_separate']:.2f}", f"{r['predicted_speedup_fused']:.2f}",
            f"{r['measured_speedup_fused']:.2f}", r["decision_separate"], str(r["anchors_decision_separate"])]))


class GemmTower(nn.Module):
    """A GEMM-heavy stack with the LoKA Mods applied; every Linear is fed by a BlockNorm, so its
    activation quantization fuses into the norm: x += W2·BN(hswish(W1·BN(x)))."""

    def __init__(self, d: int, depth: int):
        super().__init__()
        from recopt.fp8.mods import BlockNorm

        self.up = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(depth))
        self.down = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(depth))
        self.n1 = nn.ModuleList(BlockNorm(d) for _ in range(depth))
        self.n2 = nn.ModuleList(BlockNorm(d) for _ in range(depth))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        for up, down, n1, n2 in zip(self.up, self.down, self.n1, self.n2):
            x = x + down(n2(F.hardswish(up(n1(x)))))
        return self.head(x).squeeze(-1)


def end_to_end(device: str, batch: int, d: int, depth: int) -> dict:
    import recopt

    dt = torch.bfloat16 if device == "cuda" else torch.float32
    res = {"batch": batch, "d": d, "depth": depth}
    for mode in ("training", "inference"):
        torch.manual_seed(0)
        base = GemmTower(d, depth).to(device, dt)
        x = torch.randn(batch, d, device=device, dtype=dt)
        base.train(mode == "training")
        backend = "inductor" if device == "cuda" else "eager"
        # "auto": the GPU this runs on, so Dispatch measures instead of predicting.
        from recopt.fp8.mods import BlockNorm

        opt8 = recopt.optimize(base, (x,), target="auto" if device == "cuda" else "h100", passes=["fp8"],
                               backend=backend, leaf_modules=[BlockNorm], n_random_inputs=0,
                               configs={"fp8": {"mode": mode, "samples": 1, "max_eval_rows": 128,
                                                "recipes": ["tensorwise", "rowwise", "rowwise_gw_hp"]}})
        compiled_base = torch.compile(base) if device == "cuda" else base
        n8 = len(opt8.report.sites_for("fp8", "rewritten"))

        def step(m):
            if mode == "training":
                y = m(x)
                y.float().sum().backward()
            else:
                with torch.no_grad():
                    m(x)

        res[mode] = {"bf16_s": _bench(lambda: step(compiled_base), device),
                     "fp8_s": _bench(lambda: step(opt8), device), "fp8_sites": n8,
                     "sites": [(s.module_path, s.status, s.reason_code) for s in opt8.report.sites_for("fp8")]}
        res[mode]["speedup"] = res[mode]["bf16_s"] / res[mode]["fp8_s"]
        print(f"{mode}: bf16 {res[mode]['bf16_s'] * 1e3:.3f} ms, recopt fp8 {res[mode]['fp8_s'] * 1e3:.3f} ms "
              f"({res[mode]['speedup']:.2f}×, {n8} FP8 sites)")
    return res


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
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--model", default="dlrm")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default="", help="comma-separated subset of baseline,fp8,mods,mods+fp8")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop adding work after this many seconds")
    ap.add_argument("--out", default="fp8_bench.json")
    args = ap.parse_args(argv)
    start = time.time()
    result = {"torch": torch.__version__}
    if args.calibrate:
        result["calibration"] = calibrate()
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
        shapes = SHAPES if device == "cuda" else TINY_SHAPES
        result["gemms"] = gemm_table(device, shapes, start + args.budget_s * 0.5)
        print_gemm_table(result["gemms"], device)
        bad = [r["shape"] for r in result["gemms"] if r["decision_separate"] == "fp8"
               and r["measured_speedup_separate"] < 1.0]
        result["dispatch_never_slower"] = not bad
        print("Dispatch never picks a shape measured slower than bf16:", "yes" if not bad else f"NO: {bad}")
        result["probe_overhead"] = overhead(device)
        if args.dry_run or time.time() - start < args.budget_s * 0.6:
            e2e = [(16384, 4096, 2), (16384, 1024, 4)] if device == "cuda" else [(64, 32, 2)]
            result["end_to_end"] = [end_to_end(device, *cfg) for cfg in e2e
                                    if args.dry_run or time.time() - start < args.budget_s * 0.8]
        if args.dry_run:
            result["note"] = "dry run on CPU: timings exercise the code only and are not results"
    result["wall_s"] = time.time() - start
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
