"""Quality of Kunlun trained from scratch after recopt passes, on ml-latest-small.

Arms (same seed, same batches, same steps): the full-compute model; the
exact GDPA rewrite (must match: |ΔAUC| ≤ 0.001); CompSkip; CompSkip +
sliding window (architecture passes: AUC within 0.003 is the target).
Prints a table and writes JSON.

    PYTHONPATH=. python benchmarks/kunlun_passes_quality.py [--epochs 1] [--json out.json]
"""
import argparse
import json
import sys
import time

import torch

sys.path.insert(0, ".")
import recopt  # noqa: E402
from recopt.data import load_movielens  # noqa: E402
from recopt.models import build_model  # noqa: E402
from recopt.train import TrainConfig, seed_everything, train  # noqa: E402

ARMS = {
    "full": ([], None),
    "gdpa (exact)": (["gdpa"], None),
    "compskip": (["compskip"], None),
    "compskip+window16": (["compskip", "sliding_window"], {"sliding_window": {"window": 16}}),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    data = load_movielens()
    batch = next(data.train.batches(256))
    rows = []
    for arm in a.arms.split(","):
        passes, configs = ARMS[arm]
        seed_everything(a.seed)
        model = build_model("kunlun", data.spec)
        flops = None
        if passes:
            opt = recopt.optimize(model, batch.inputs(), target="cpu", passes=passes, configs=configs,
                                  backend="eager", n_random_inputs=0)
            bad = [p.name for p in opt.report.passes if p.status != "applied"]
            if bad:
                raise SystemExit(f"{arm}: passes not applied: {bad}\n{opt.report}")
            flops = (opt.report.flops_before, opt.report.flops_after)
            model = opt.graph_module
        t0 = time.perf_counter()
        res = train(model, data.train, data.test, TrainConfig(epochs=a.epochs, seed=a.seed, progress=False))
        m = res.metrics
        rows.append({"arm": arm, "auc": m.auc, "logloss": m.logloss, "ne": m.ne, "steps": res.steps,
                     "train_s": time.perf_counter() - t0, "flops_before_after": flops})
        print(f"{arm:<20} AUC {m.auc:.4f}  LogLoss {m.logloss:.4f}  NE {m.ne:.4f}  steps {res.steps}  "
              f"{rows[-1]['train_s']:.0f} s", flush=True)
    base = rows[0]["auc"] if rows and rows[0]["arm"] == "full" else None
    if base is not None:
        for r in rows[1:]:
            print(f"ΔAUC {r['arm']}: {r['auc'] - base:+.4f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "torch": torch.__version__, "seed": a.seed, "epochs": a.epochs}, f, indent=2)


if __name__ == "__main__":
    main()
