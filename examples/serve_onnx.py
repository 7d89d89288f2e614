"""Serve a recopt-exported ONNX model with onnxruntime alone: no recopt, no torch.

Two steps:

1. Prepare (needs recopt + torch; once, anywhere)::

       python examples/serve_onnx.py prepare --out /tmp/recopt_serve [--model kunlun] [--train-steps 200]

   trains a small model on ml-latest-small for a few steps, optimizes it,
   exports ``/tmp/recopt_serve/kunlun.onnx`` (parity-checked) and writes a
   test batch ``/tmp/recopt_serve/batch.npz``.

2. Serve (needs only numpy + onnxruntime)::

       python examples/serve_onnx.py serve --model /tmp/recopt_serve/kunlun.onnx --batch /tmp/recopt_serve/batch.npz

   reads the manifest embedded in the model, checks the batch against its
   input names/dtypes, scores the batch, prints click probabilities, AUC
   and log loss, and confirms that torch was never imported.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _serve(model_path: str, batch_path: str, providers=None, show: int = 5) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(model_path, providers=providers or ["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    manifest = json.loads(meta["recopt.manifest"]) if "recopt.manifest" in meta else None
    batch = np.load(batch_path)
    feeds = {}
    for inp in sess.get_inputs():
        if inp.name not in batch:
            raise SystemExit(f"{batch_path} has no array {inp.name!r}; it has {sorted(batch.files)}")
        feeds[inp.name] = batch[inp.name]
    if manifest is not None:
        for spec in manifest["inputs"]:
            got = str(feeds[spec["name"]].dtype)
            if got != spec["dtype"]:
                raise SystemExit(f"input {spec['name']!r} is {got}, the model expects {spec['dtype']}")
    t0 = time.perf_counter()
    (logits,) = sess.run(None, feeds)
    ms = (time.perf_counter() - t0) * 1e3
    probs = 1.0 / (1.0 + np.exp(-logits))
    out = {"provider": sess.get_providers()[0], "batch_size": int(logits.shape[0]), "latency_ms": ms,
           "probs": probs}
    print(f"model      {model_path}")
    if manifest is not None:
        passes = [p["name"] for p in manifest["passes"] if p["status"] == "applied"]
        print(f"manifest   recopt {manifest['recopt_version']}, torch {manifest['torch_version']}, "
              f"target {(manifest.get('target') or {}).get('name')}, passes applied {passes}")
        print(f"           dynamic dims {manifest['dynamic_dims'] and list(manifest['dynamic_dims'])}")
    print(f"provider   {out['provider']}")
    print(f"scored     {out['batch_size']} examples in {ms:.1f} ms")
    print("first probabilities:", np.array2string(probs[:show], precision=4))
    if "labels" in batch.files:
        y = batch["labels"].astype(np.float64)
        p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
        out["log_loss"] = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
        out["auc"] = _auc(y, logits.astype(np.float64))
        print(f"labels     AUC {out['auc']:.4f}, log loss {out['log_loss']:.4f} (base rate {y.mean():.3f})")
    out["torch_imported"] = "torch" in sys.modules
    print(f"torch imported: {out['torch_imported']}")
    return out


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    """Rank AUC (ties averaged); nan if the batch has one class only."""
    pos, neg = y.sum(), len(y) - y.sum()
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _prepare(args) -> None:
    from recopt.export.serving import prepare_movielens_demo  # the only recopt/torch import, in prepare mode

    out = prepare_movielens_demo(args.out, data_dir=args.data_dir, model=args.model,
                                 batch_size=args.batch_size, train_steps=args.train_steps, progress=True)
    print(f"wrote {out['model']} and {out['batch']}")
    print(f"serve with: python {sys.argv[0]} serve --model {out['model']} --batch {out['batch']}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="train briefly, optimize and export a model; write a test batch")
    p.add_argument("--out", default="/tmp/recopt_serve")
    p.add_argument("--model", default="kunlun", choices=["kunlun", "interformer", "dlrm"])
    p.add_argument("--data-dir", default=None, help="folder holding ml-latest-small (default: recopt's data dir)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--train-steps", type=int, default=200)
    s = sub.add_parser("serve", help="score the batch with onnxruntime only")
    s.add_argument("--model", required=True)
    s.add_argument("--batch", required=True)
    s.add_argument("--provider", action="append", help="onnxruntime execution provider (repeatable)")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        _prepare(args)
    else:
        _serve(args.model, args.batch, providers=args.provider)


if __name__ == "__main__":
    main()
