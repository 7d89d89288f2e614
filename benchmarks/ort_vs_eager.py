"""ONNX Runtime (CPU) vs eager PyTorch (CPU) latency for InterFormer and Kunlun, batch 1 / 64 / 512.

For each model: build it for a MovieLens-shaped feature spec (the models'
default, CPU-sized configs), ``recopt.optimize(target="cpu",
backend="eager")``, ``recopt.export.export`` to ONNX (parity-checked), then
time in one process, same threads for both (``--threads``, default 1):

- eager: the original model, ``torch.no_grad()``;
- recopt eager: the optimized graph run eagerly (what ``optimize`` returns);
- ORT: ``recopt.export.load`` → onnxruntime CPUExecutionProvider.

Median of ``--reps`` timed calls after warm-up. Prints a table and writes
JSON (``--json``). Usage::

    python benchmarks/ort_vs_eager.py [--batches 1 64 512] [--seq 20] [--json out.json]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import tempfile
import time
import warnings

import torch


def movielens_like_spec(seq: int):
    """The shape of recopt.data.load_movielens(max_seq_len=seq).spec, without reading the CSVs."""
    from recopt.data import FeatureSpec

    return FeatureSpec(n_dense=31, sparse_cardinalities=(611, 9743, 20, 14), seq_feature_tables=(1, 2),
                       max_seq_len=seq, event_names=("liked", "not_liked"),
                       sparse_names=("user_id", "movie_id", "genre", "release_decade"))


def _median_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_model(name: str, batches, seq: int, threads: int, workdir: str) -> list:
    import onnxruntime as ort

    import recopt
    rx = importlib.import_module("recopt.export")
    from recopt.data import example_batch
    from recopt.models import build_model

    spec = movielens_like_spec(seq)
    torch.manual_seed(0)
    model = build_model(name, spec).eval()
    example = example_batch(spec, 8, seed=0).inputs()
    opt = recopt.optimize(model, example, target="cpu", backend="eager")
    path = os.path.join(workdir, f"{name}.onnx")
    t0 = time.perf_counter()
    res = rx.export(opt, example, path)
    export_s = time.perf_counter() - t0
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = rx.load(path, session_options=so)
    rows = []
    for b in batches:
        inputs = example_batch(spec, b, seed=1).inputs()
        feeds = {n: t.numpy() for n, t in zip(sess.input_names, inputs)}
        reps = 50 if b <= 8 else (20 if b <= 64 else 8)
        with torch.no_grad():
            eager = _median_ms(lambda: model(*inputs), reps)
            opt_eager = _median_ms(lambda: opt.graph_module(*inputs), reps)
            want = model(*inputs)
        ort_ms = _median_ms(lambda: sess.session.run(None, feeds), reps)
        got = torch.from_numpy(sess.session.run(None, feeds)[0])
        rows.append({
            "model": name, "batch": b, "seq": seq, "eager_ms": eager, "recopt_eager_ms": opt_eager,
            "ort_ms": ort_ms, "eager_over_ort": eager / ort_ms,
            "max_abs_diff": float((got - want).abs().max()),
            "passes_applied": [p["name"] for p in res.manifest["passes"] if p["status"] == "applied"],
            "export_s": export_s,
        })
        r = rows[-1]
        print(f"{name:12s} {b:6d} {r['eager_ms']:10.2f} {r['recopt_eager_ms']:12.2f} {r['ort_ms']:9.2f} "
              f"{r['eager_over_ort']:9.2f}x  {r['max_abs_diff']:.1e}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["interformer", "kunlun"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64, 512])
    ap.add_argument("--seq", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for both runtimes (1 is the fair setting on a shared machine)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("RECOPT_QUIET", "1")
    torch.set_num_threads(args.threads)
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, seq {args.seq}")
    print(f"{'model':12s} {'batch':>6s} {'eager ms':>10s} {'recopt eager':>12s} {'ORT ms':>9s} {'eager/ORT':>10s}  max|diff|")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models:
            rows += bench_model(name, args.batches, args.seq, args.threads, d)
    if args.json:
        meta = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "threads": args.threads,
                "cpu_count": os.cpu_count(), "machine": platform.machine()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
