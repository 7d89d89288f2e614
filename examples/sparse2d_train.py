"""Train recopt's DLRM with 2D sparse parallelism (T = L × G ranks) on MovieLens or synthetic data.

The model is written with plain ``nn.EmbeddingBag`` tables; the ``sparse2d``
pass gathers them into one TorchRec ``EmbeddingBagCollection`` and
``recopt.distributed.shard_2d`` shards it over each sharding group of L ranks,
replicated G = T / L times. Tables train with fused row-wise AdaGrad (the
momentum-scaled variant unless ``--no-momentum-scaling``); dense layers with
Adam, data parallel over all T ranks.

Launch (see examples/README.md)::

    # T local processes from Python (gloo on CPU):
    python examples/sparse2d_train.py --world-size 4 --sharding-group-size 2
    # the same job under torchrun:
    torchrun --nproc-per-node 4 examples/sparse2d_train.py --sharding-group-size 2
    # the single-process baseline (same global batch):
    python examples/sparse2d_train.py --single

Every rank reads its own 1/T slice of each global batch; rank 0 prints the
plan and the test AUC / LogLoss / NE.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import recopt  # noqa: E402
from recopt.data.batch import Batch  # noqa: E402
from recopt.models.dlrm import DLRM, DLRMConfig  # noqa: E402
from recopt.optim import MomentumScaledRowWiseAdagrad  # noqa: E402
from recopt.train.metrics import compute_metrics  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world-size", type=int, default=4, help="T: ranks started by the Python launcher")
    ap.add_argument("--sharding-group-size", type=int, default=2, help="L: ranks that shard one copy of the tables")
    ap.add_argument("--single", action="store_true", help="single-process baseline instead of 2D")
    ap.add_argument("--data", choices=("movielens", "synthetic"), default="movielens")
    ap.add_argument("--data-dir", default=os.environ.get("RECOPT_DATA_DIR"))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1024, help="global batch (split over T ranks)")
    ap.add_argument("--emb-lr", type=float, default=0.05, help="row-wise AdaGrad learning rate of the tables")
    ap.add_argument("--dense-lr", type=float, default=1e-3, help="Adam learning rate of the dense layers")
    ap.add_argument("--no-momentum-scaling", action="store_true", help="plain row-wise AdaGrad on each replica")
    ap.add_argument("--sync-every", type=int, default=1, help="k: replica sync every k steps")
    ap.add_argument("--timeout", type=float, default=120.0, help="process-group timeout (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write rank 0's result here")
    return ap.parse_args(argv)


def load_data(args):
    if args.data == "movielens":
        from recopt.data.movielens import load_movielens

        ds = load_movielens(args.data_dir)
        return ds.spec, ds.train, ds.test
    from recopt.data.synthetic import SyntheticConfig, SyntheticCTR

    # small on purpose: a smoke run that needs no download
    ds = SyntheticCTR(SyntheticConfig(n_dense=16, sparse_cardinalities=(5000, 2000, 500, 50),
                                      seq_feature_tables=(1,), event_names=("click",), max_seq_len=20),
                      n_train=16384, n_test=4096)
    return ds.spec, ds.train, ds.test


def slice_batch(batch: Batch, part: int, parts: int) -> Batch:
    n = batch.batch_size // parts
    return Batch(*(t[part * n:(part + 1) * n] for t in batch))


def eval_batches(test, parts: int, batch_size: int = 1024):
    """Test batches cut to a multiple of ``parts`` samples, so every rank gets the same number of
    same-sized slices (lookups are collectives); the single-process run evaluates the same samples."""
    for batch in test.batches(batch_size):
        n = batch.batch_size - batch.batch_size % parts
        if n:
            yield Batch(*(t[:n] for t in batch))


def base_rate(split) -> float:
    """Mean training label (normalises NE)."""
    if hasattr(split, "labels"):
        return float(split.labels.float().mean())
    return float(split.source.base_rate)


def build_model(spec, seed):
    torch.manual_seed(seed)
    return DLRM(spec, DLRMConfig())


def train_single(args):
    spec, train, test = load_data(args)
    model = build_model(spec, args.seed)
    tables = [p for n, p in model.named_parameters() if n.startswith("tables.")]
    dense = [p for n, p in model.named_parameters() if not n.startswith("tables.")]
    emb_opt = MomentumScaledRowWiseAdagrad(tables, lr=args.emb_lr)
    dense_opt = torch.optim.Adam(dense, lr=args.dense_lr)
    t0, steps = time.perf_counter(), 0
    for epoch in range(args.epochs):
        for batch in train.batches(args.batch_size, shuffle=True, seed=args.seed + epoch, drop_last=True):
            loss = F.binary_cross_entropy_with_logits(model(*batch.inputs()), batch.labels)
            emb_opt.zero_grad(), dense_opt.zero_grad()
            loss.backward()
            emb_opt.step(), dense_opt.step()
            steps += 1
    seconds = time.perf_counter() - t0
    model.eval()
    labels, logits = [], []
    with torch.no_grad():
        for b in eval_batches(test, args.world_size):
            labels.append(b.labels), logits.append(model(*b.inputs()))
    m = compute_metrics(torch.cat(labels), torch.cat(logits), base_rate=base_rate(train))
    return {"mode": "single", "steps": steps, "train_s": seconds, **m.as_dict()}


def train_rank(ctx, args):
    """One rank of the 2D job (called by recopt.distributed.launch or directly under torchrun)."""
    from recopt.distributed import shard_2d

    spec, train, test = load_data(args)
    T, rank = ctx.world_size, ctx.rank
    model = build_model(spec, args.seed)
    example = next(iter(train.batches(8)))
    sharded = shard_2d(model, example_inputs=example.inputs(), sharding_group_size=args.sharding_group_size,
                       lr=args.emb_lr, momentum_scaling=not args.no_momentum_scaling, sync_every=args.sync_every)
    if rank == 0:
        print(sharded.describe(args.batch_size // T), flush=True)
    dense_opt = torch.optim.Adam(sharded.dense_parameters(), lr=args.dense_lr)
    t0, steps = time.perf_counter(), 0
    for epoch in range(args.epochs):
        for batch in train.batches(args.batch_size, shuffle=True, seed=args.seed + epoch, drop_last=True):
            local = slice_batch(batch, rank, T)
            loss = F.binary_cross_entropy_with_logits(sharded(*local.inputs()), local.labels)
            loss.backward()                 # the tables update here (fused row-wise AdaGrad)
            sharded.maybe_sync()            # replica average of tables + AdaGrad state every k steps
            dense_opt.step()
            dense_opt.zero_grad()
            steps += 1
    sharded.sync()                          # leave the replicas identical before evaluating
    seconds = time.perf_counter() - t0
    labels, logits = [], []
    with torch.no_grad():
        for batch in eval_batches(test, T):
            b = slice_batch(batch, rank, T)
            labels.append(b.labels), logits.append(sharded(*b.inputs()))
    return {"labels": torch.cat(labels), "logits": torch.cat(logits), "steps": steps, "train_s": seconds,
            "base_rate": base_rate(train)}


def gather_metrics(results, args):
    labels = torch.cat([r["labels"] for r in results])
    logits = torch.cat([r["logits"] for r in results])
    m = compute_metrics(labels, logits, base_rate=results[0]["base_rate"])
    mode = f"2d T={len(results)} L={args.sharding_group_size}" + \
        (" no-momentum-scaling" if args.no_momentum_scaling else " momentum-scaled")
    return {"mode": mode, "steps": results[0]["steps"], "train_s": results[0]["train_s"], **m.as_dict()}


def main(argv=None):
    args = parse_args(argv)
    if args.single:
        out = train_single(args)
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:     # started by torchrun
        import torch.distributed as dist

        from recopt.distributed import init_from_env

        ctx = init_from_env(args.sharding_group_size, timeout_s=args.timeout)
        args.world_size = ctx.world_size
        res = train_rank(ctx, args)
        gathered = [None] * ctx.world_size
        dist.all_gather_object(gathered, res)
        dist.destroy_process_group()
        if ctx.rank != 0:
            return None
        out = gather_metrics(gathered, args)
    else:
        from recopt.distributed import launch

        results = launch(train_rank, args.world_size, (args,), sharding_group_size=args.sharding_group_size,
                         timeout_s=args.timeout, job_timeout_s=None)
        out = gather_metrics(results, args)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
