"""The main job in one script: optimize a real recommendation model and time it.

Loads MovieLens (ml-latest-small, from ../shared/data or $RECOPT_DATA_DIR),
builds the bundled Kunlun and InterFormer models, runs recopt.optimize on a
real batch, prints each report, checks the outputs match the original, and
times eager vs optimized side by side (median of alternating runs).

    make demo                      # or: python examples/demo.py [--models kunlun] [--batch 256]
"""
import argparse
import sys
import time

import torch

sys.path.insert(0, ".")
import recopt  # noqa: E402
from recopt.bench import Variant, compare  # noqa: E402
from recopt.data import load_movielens  # noqa: E402
from recopt.models import build_model, count_parameters  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="kunlun,interformer")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--target", default="auto")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--html", default=None, help="write the last model's HTML report here")
    a = ap.parse_args()

    t0 = time.perf_counter()
    data = load_movielens(max_seq_len=a.seq_len)
    print(f"MovieLens CTR: {len(data.train)} train / {len(data.test)} test examples "
          f"({time.perf_counter() - t0:.1f} s to load)")
    batch = next(data.test.batches(a.batch))
    inputs = batch.inputs()

    for name in a.models.split(","):
        torch.manual_seed(0)
        model = build_model(name, data.spec).eval()
        print(f"\n=== {name}: {count_parameters(model) / 1e6:.2f} M parameters, batch {a.batch} ===")
        opt = recopt.optimize(model, inputs, target=a.target)
        print(opt.report)
        with torch.no_grad():
            diff = (opt(*inputs) - model(*inputs)).abs().max().item()
        print(f"max |optimized - original| on a real batch: {diff:.2e}")
        with torch.no_grad():
            res = compare([Variant("eager", lambda: model(*inputs)),
                           Variant("recopt", lambda: opt(*inputs))], repeats=a.repeats, warmup=2)
        print(res.table())
        if a.html:
            opt.report.to_html(a.html)
            print(f"HTML report: {a.html}")


if __name__ == "__main__":
    main()
