"""Time recopt's own pipeline (capture + passes + verification, no compile).

A 24-layer transformer-style recommendation tower (attention, FFN, norms,
an embedding bag), batch 16, sequence 32, d=64 by default. The pipeline runs
the model itself a few times (shape propagation, verification on the example
inputs and on the edge-case sets, mostly at batch 1-3, per pass that rewrites), so the
time includes that model compute; small inputs keep the measurement about
recopt's own overhead. Prints the median of
``--repeats`` runs of recopt.optimize(backend="eager") and the split into
capture and each pass; writes JSON with --json. Target: ≤ 2 s on a 2-core CPU.

    python benchmarks/pipeline_overhead.py [--layers 24] [--repeats 5] [--json out.json]
"""
import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, ".")
import recopt  # noqa: E402


class Layer(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, bias):
        B, T, D = x.size(0), x.size(1), x.size(2)
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q = q.reshape(B, T, self.heads, -1).transpose(1, 2)
        k = k.reshape(B, T, self.heads, -1).transpose(1, 2)
        v = v.reshape(B, T, self.heads, -1).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D / self.heads) + bias, dim=-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.ffn(self.norm2(x))


class Tower(nn.Module):
    def __init__(self, layers=24, d=64, heads=4, n_ids=1000):
        super().__init__()
        self.emb = nn.EmbeddingBag(n_ids, d, mode="sum")
        self.layers = nn.ModuleList(Layer(d, heads) for _ in range(layers))
        self.head = nn.Linear(d, 1)

    def forward(self, seq, lengths, ids, offsets):
        T = seq.size(1)
        mask = torch.arange(T)[None, :] < lengths[:, None]
        bias = torch.zeros_like(mask, dtype=seq.dtype).masked_fill(~mask, -1e4)[:, None, None, :]
        x = seq + self.emb(ids, offsets)[:, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        return torch.sigmoid(self.head(x.mean(1))).squeeze(-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    B, T, d = a.batch, a.seq, 64
    model = Tower(a.layers, d).eval()
    inputs = (torch.randn(B, T, d), torch.randint(1, T + 1, (B,)), torch.randint(0, 1000, (4 * B,)),
              torch.arange(0, 4 * B, 4))
    recopt.optimize(model, inputs, target="cpu", backend="eager")  # warm-up (imports, first-call costs)
    totals, captures, per_pass = [], [], {}
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        opt = recopt.optimize(model, inputs, target="cpu", backend="eager")
        totals.append(time.perf_counter() - t0)
        captures.append(opt.report.capture_s)
        for p in opt.report.passes:
            per_pass.setdefault(p.name, []).append(p.duration_s + p.verify_s)
    res = {
        "layers": a.layers, "graph_nodes": len(opt.graph_module.graph.nodes),
        "total_s_median": statistics.median(totals), "capture_s_median": statistics.median(captures),
        "per_pass_s_median": {k: statistics.median(v) for k, v in per_pass.items()},
        "torch": torch.__version__, "repeats": a.repeats, "batch": B, "seq": T,
        "sites_rewritten": len(opt.report.rewritten),
    }
    print(f"recopt pipeline on a {a.layers}-layer tower ({res['graph_nodes']} graph nodes), median of {a.repeats}:")
    print(f"  total   {res['total_s_median']:.3f} s   (target ≤ 2 s on a 2-core CPU)")
    print(f"  capture {res['capture_s_median']:.3f} s; {res['sites_rewritten']} sites rewritten; each pass that rewrote "
          f"was verified (outputs on {len(opt.report.verify_sets)} input sets, parameter gradients)")
    for k, v in res["per_pass_s_median"].items():
        print(f"  {k:<16}{v:.3f} s (pass + verification)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
