"""FLOPs per sample and training-step time before/after Kunlun's passes.

    PYTHONPATH=. python benchmarks/kunlun_passes.py                 # CPU, default configs + paper FLOPs
    PYTHONPATH=. python benchmarks/kunlun_passes.py --device cuda   # GPU (<= 6 min), writes JSON

FLOPs: recopt.costs.FlopCounter (torch.utils.flop_counter formulas) on the
captured graph, forward, per sample. Step time: forward + backward + Adam on
one fixed batch, median of --steps after warm-up, baseline and passed model
timed alternately in one process so the ratio is measured in one run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import recopt
from recopt.data import example_batch
from recopt.data.batch import FeatureSpec
from recopt.models import build_model, paper_config

PIPELINES = {
    "compskip": (["compskip"], None),
    "sliding_window": (["sliding_window"], {"sliding_window": {"window": 16}}),
    "compskip+window": (["compskip", "sliding_window"], {"sliding_window": {"window": 16}}),
    "hsp": (["hsp"], None),
}


def movielens_spec(max_seq_len: int) -> FeatureSpec:
    try:
        from recopt.data import load_movielens
        return load_movielens(max_seq_len=max_seq_len).spec
    except Exception:
        return FeatureSpec(n_dense=30, sparse_cardinalities=(611, 9743, 21, 14), seq_feature_tables=(1, 2),
                           max_seq_len=max_seq_len, event_names=("liked", "not_liked"))


def step_time(model, inputs, device, steps: int) -> float:
    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    y = torch.rand(inputs[0].shape[0], device=device)
    times = []
    for i in range(steps + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(*inputs), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_case(name, model, inputs, device, steps, time_it=True, nice=""):
    rows = []
    B = inputs[0].shape[0]
    for label, (passes, configs) in PIPELINES.items():
        if label == "hsp" and name == "kunlun" and model.config.summary == "hsp":
            continue
        opt = recopt.optimize(model.eval(), inputs, target="cpu", passes=passes, configs=configs, backend="eager",
                              n_random_inputs=0)
        f0, f1 = opt.report.flops_before / B, opt.report.flops_after / B
        statuses = {p.name: p.status for p in opt.report.passes}
        row = {"model": name + nice, "passes": label, "flops_before": f0, "flops_after": f1,
               "flops_change": (f1 - f0) / f0, "status": statuses}
        if time_it:
            dev_inputs = tuple(t.to(device) for t in inputs)
            base, new = model, opt.graph_module
            t_base, t_new = [], []
            for _ in range(2):  # alternate to share machine noise
                t_base.append(step_time(base, dev_inputs, device, steps))
                t_new.append(step_time(new, dev_inputs, device, steps))
            row["step_s_before"], row["step_s_after"] = min(t_base), min(t_new)
            row["speedup"] = row["step_s_before"] / row["step_s_after"]
        rows.append(row)
        print(_fmt(row), flush=True)
    return rows


def _fmt(r):
    s = (f"| {r['model']} | {r['passes']} | {r['flops_before']:,.0f} | {r['flops_after']:,.0f} | "
         f"{r['flops_change'] * 100:+.1f}% |")
    if "speedup" in r:
        s += f" {r['step_s_before'] * 1e3:.1f} ms | {r['step_s_after'] * 1e3:.1f} ms | {r['speedup']:.2f}x |"
    else:
        s += " - | - | - |"
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-paper", action="store_true")
    ap.add_argument("--flops-only", action="store_true", help="skip the step timings")
    ap.add_argument("--json", default="kunlun_passes.json")
    a = ap.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    print("| model | passes | FLOPs/sample before | after | change | step before | step after | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    spec = movielens_spec(a.seq_len)
    inputs = example_batch(spec, a.batch, seed=0).inputs()
    rows = []
    t = not a.flops_only
    rows += run_case("kunlun", build_model("kunlun", spec), inputs, device, a.steps, time_it=t)
    rows += run_case("kunlun", build_model("kunlun", spec, summary="pma"), inputs, device, a.steps, time_it=t,
                     nice=" (pma)")
    rows += run_case("interformer", build_model("interformer", spec), inputs, device, a.steps, time_it=t)
    if not a.no_paper:
        pspec = movielens_spec(1000)
        pin = example_batch(pspec, 2, seq_len=1000, seed=0).inputs()
        cfg = paper_config("kunlun")
        rows += run_case("kunlun", build_model("kunlun", pspec, cfg), pin, device, a.steps,
                         time_it=t and device.type == "cuda", nice=" paper T=1000 B=2")
    with open(a.json, "w") as f:
        json.dump({"device": str(device), "torch": torch.__version__, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
