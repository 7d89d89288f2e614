"""The main job in one script: optimize a real recommendation model and time it.

Loads MovieLens (ml-latest-small, from ../shared/data or $RECOPT_DATA_DIR),
builds the bundled Kunlun and InterFormer models, runs recopt.optimize on a
real batch, prints each report, checks the outputs match the original, and
times eager vs optimized side by side (median of alternating runs).

Then the serving view, what optimize + export buys on the machine at hand
(no GPU needed): each optimized model is exported to ONNX (parity-checked,
signed and verified on load), and eager PyTorch, recopt, torch.compile and
onnxruntime are timed side by side in one run, interleaved, at batch 1 and
batch 256, with the same thread count for PyTorch and onnxruntime.

    make demo                      # or: python examples/demo.py [--models kunlun] [--batch 256]
    python examples/demo.py --compile --serve-threads 1   # add torch.compile (minutes to compile on 2 cores)
"""
import argparse
import os
import sys
import tempfile
import time
import warnings

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
    ap.add_argument("--serve-batches", type=int, nargs="*", default=[1, 256],
                    help="batch sizes for the export/serving comparison (none: skip it)")
    ap.add_argument("--serve-repeats", type=int, default=10)
    ap.add_argument("--compile", action="store_true",
                    help="add torch.compile to the serving comparison (it compiles once per batch size: "
                         "minutes on a small CPU, so it is off by default)")
    ap.add_argument("--serve-threads", type=int, default=None,
                    help="threads for PyTorch and onnxruntime in the serving comparison (default: torch's)")
    a = ap.parse_args()
    for flag, value, low in (("--batch", a.batch, 1), ("--seq-len", a.seq_len, 1), ("--repeats", a.repeats, 1),
                             ("--serve-repeats", a.serve_repeats, 1)):
        if value < low:
            ap.error(f"{flag} must be at least {low}, got {value}")
    if a.serve_threads is not None and a.serve_threads < 1:
        ap.error(f"--serve-threads must be at least 1, got {a.serve_threads}")
    if any(b < 1 for b in a.serve_batches):
        ap.error(f"--serve-batches must be positive, got {a.serve_batches}")

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
        if a.serve_batches:
            serve(name, model, opt, inputs, data, a)
    if a.serve_batches:
        print("\nserving summary (median ms per call; speed-up vs eager PyTorch, same threads):")
        for row in SUMMARY:
            print("  " + row)


SUMMARY = []


def _inputs_at(data, batch, like):
    """A real test batch of ``batch`` rows (repeated when the test split is smaller)."""
    b = next(data.test.batches(batch)).inputs()
    if b[0].shape[0] < batch:
        reps = -(-batch // b[0].shape[0])
        b = tuple(torch.cat([t] * reps)[:batch] for t in b)
    return tuple(t.to(x.dtype) for t, x in zip(b, like))


def serve(name, model, opt, inputs, data, a):
    """Export ``opt`` to ONNX, then time eager / recopt / torch.compile / onnxruntime side by side."""
    threads = a.serve_threads or torch.get_num_threads()
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _serve(name, model, opt, inputs, data, a, threads)
    finally:
        torch.set_num_threads(torch_threads)


def _serve(name, model, opt, inputs, data, a, threads):
    import onnxruntime as ort

    rx = recopt.export
    key = os.urandom(32)  # a throwaway HMAC key: the server accepts only what this pipeline signed
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"{name}.onnx")
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = rx.export(opt, inputs, path, n_random_inputs=1, sign_key=key)
        worst = max(r["rel"] for r in res.manifest["parity"]["runs"])
        print(f"\nexported {name} to ONNX in {time.perf_counter() - t0:.1f} s "
              f"({os.path.getsize(path) / 1e6:.1f} MB, parity: max relative difference {worst:.1e})")
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        sess = rx.load(path, verify_key=key, session_options=so)
        print(f"loaded back: signature verified, {sess.provider}, {threads} thread(s) for PyTorch and onnxruntime")
        compiled = torch.compile(model) if a.compile else None
        if compiled is None:
            print("torch.compile: not timed (run with --compile; it compiles for minutes per batch size on 2 cores)")
        for batch in a.serve_batches:
            x = _inputs_at(data, batch, inputs)
            feeds = {n: t.numpy() for n, t in zip(sess.input_names, x)}
            variants = [Variant("eager PyTorch", lambda: model(*x)), Variant("recopt", lambda: opt(*x))]
            if compiled is not None:
                t0 = time.perf_counter()
                try:
                    with torch.no_grad():
                        compiled(*x)
                    print(f"torch.compile warm-up (compilation) at batch {batch}: {time.perf_counter() - t0:.1f} s")
                    variants.append(Variant("torch.compile", lambda: compiled(*x)))
                except Exception as e:  # named, not hidden: the row is left out and the reason printed
                    print(f"torch.compile failed at batch {batch} and is left out: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}")
            variants.append(Variant("onnxruntime", lambda: sess.session.run(None, feeds)))
            with torch.no_grad():
                got = torch.from_numpy(sess.session.run(None, feeds)[0])
                diff = (got - model(*x)).abs().max().item()
                print(f"\n{name}, batch {batch} (max |onnxruntime - eager| {diff:.1e}):")
                r = compare(variants, repeats=a.serve_repeats, warmup=2, progress=False)
            print(r.table())
            cells = ", ".join(f"{v.name} failed" if v.error else
                              f"{v.name} {v.median_s * 1e3:.2f} ms ({1.0 / v.ratio_vs_first:.2f}x)" for v in r.variants)
            SUMMARY.append(f"{name:<12} batch {batch:<4} {cells}")


if __name__ == "__main__":
    main()
