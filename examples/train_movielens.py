"""Train and evaluate a recopt reference model on MovieLens ml-latest-small (CTR: rating >= 4).

    PYTHONPATH=. python examples/train_movielens.py --model kunlun --epochs 1
    PYTHONPATH=. python examples/train_movielens.py --model popularity
    PYTHONPATH=. python examples/train_movielens.py --model logreg --lr 1e-2

Models: interformer, kunlun, dlrm, dlrm_torchrec (needs ``pip install recopt[rec]``), and the
trivial baselines logreg (dense features only) and popularity (item's training like rate).
The data is read from ../shared/data (override with RECOPT_DATA_DIR). Prints AUC, LogLoss
and NE on the time-based test split, the parameter count and the training wall time;
``--json PATH`` also writes them as JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from recopt.data import load_movielens
from recopt.models import MODELS, build_model, count_parameters
from recopt.train import LogisticRegression, TrainConfig, compute_metrics, popularity_scores, seed_everything, train


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=sorted(MODELS) + ["logreg", "popularity"])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seq-len", type=int, default=50, help="history length kept per event type")
    ap.add_argument("--data-dir", default=None, help="directory containing ml-latest-small/")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    data = load_movielens(args.data_dir, max_seq_len=args.max_seq_len)
    load_s = time.perf_counter() - t0
    print(f"data: {len(data.train)} train / {len(data.test)} test examples, train base rate "
          f"{data.base_rate:.4f}, split at t={data.split_timestamp} ({load_s:.1f}s to load)")

    result = {"model": args.model, "seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size,
              "lr": args.lr, "max_seq_len": args.max_seq_len, "torch": torch.__version__,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
              "command": " ".join(["python", "examples/train_movielens.py"] + (argv or sys.argv[1:]))}
    if args.model == "popularity":
        labels, scores = popularity_scores(data.train, data.test)
        metrics = compute_metrics(labels, probs=scores, base_rate=data.base_rate)
        result.update(params=0, train_seconds=0.0, train_cpu_seconds=0.0, steps=0)
    else:
        seed_everything(args.seed)
        model = LogisticRegression(data.spec) if args.model == "logreg" else build_model(args.model, data.spec)
        cfg = TrainConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                          seed=args.seed, device=args.device, progress=not args.no_progress)
        res = train(model, data.train, data.test, cfg, base_rate=data.base_rate)
        metrics = res.metrics
        result.update(params=count_parameters(model), train_seconds=round(res.seconds, 1),
                      train_cpu_seconds=round(res.cpu_seconds, 1), steps=res.steps,
                      final_train_loss=res.final_loss)
    result.update(auc=metrics.auc, logloss=metrics.logloss, ne=metrics.ne, n_test=metrics.n)
    print(f"{args.model}: {metrics}  params {result['params']:,}  train {result['train_seconds']}s "
          f"(CPU {result['train_cpu_seconds']}s, {result['steps']} steps, load avg {_loadavg()})")
    result["load_average"] = _loadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
