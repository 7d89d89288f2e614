"""Serving helpers on the recopt side: batches as ``.npz`` for a torch-free server, and a MovieLens demo.

A server that runs the exported ONNX model needs only onnxruntime and numpy
(``examples/serve_onnx.py``); these helpers prepare what it reads:

- :func:`save_batch_npz` writes model inputs (and optional labels) under the
  model's input names, so ``session.run(None, dict(npz))`` works as is;
- :func:`prepare_movielens_demo` trains a small recopt model on
  ml-latest-small for a few steps, optimizes it, exports it to ONNX
  (with parity) and writes a test batch beside it.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

BATCH_INPUTS = ("dense", "sparse_ids", "seq_ids", "seq_lengths", "seq_times")


def save_batch_npz(path: str, inputs: Sequence, input_names: Sequence[str] = BATCH_INPUTS,
                   labels=None) -> str:
    """Write ``inputs`` (tensors or arrays, in forward order) to ``path`` keyed by ``input_names``."""
    if len(inputs) != len(input_names):
        raise ValueError(f"{len(inputs)} inputs but {len(input_names)} names {list(input_names)}")
    arrays = {n: _np(x) for n, x in zip(input_names, inputs)}
    if labels is not None:
        arrays["labels"] = _np(labels)
    np.savez(path, **arrays)
    return path


def _np(x) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def prepare_movielens_demo(out_dir: str, data_dir: Optional[str] = None, model: str = "kunlun",
                           batch_size: int = 256, train_steps: int = 200, max_seq_len: int = 20,
                           progress: bool = False) -> dict:
    """Train ``model`` briefly on ml-latest-small, optimize, export ``<out_dir>/<model>.onnx`` and
    write ``<out_dir>/batch.npz`` (the first ``batch_size`` test examples, with labels).

    Returns ``{"model": onnx path, "batch": npz path, "manifest": dict, "torch_logits": ndarray}``;
    ``torch_logits`` are the PyTorch model's scores on the batch, for comparison.
    """
    import torch

    from .. import optimize
    from ..data import load_movielens
    from ..models import build_model
    from ..train.loop import TrainConfig, train
    from . import export

    os.makedirs(out_dir, exist_ok=True)
    data = load_movielens(data_dir, max_seq_len=max_seq_len)
    torch.manual_seed(0)
    net = build_model(model, data.spec)
    if train_steps > 0:
        train(net, data.train, config=TrainConfig(max_steps=train_steps, batch_size=batch_size, device="cpu",
                                                  progress=progress))
    net.eval()
    batch = data.test.batch(np.arange(min(batch_size, len(data.test))))
    inputs = batch.inputs()
    opt = optimize(net, inputs, target="cpu", backend="eager")
    onnx_path = os.path.join(out_dir, f"{model}.onnx")
    res = export(opt, inputs, onnx_path, progress=progress)
    npz = save_batch_npz(os.path.join(out_dir, "batch.npz"), inputs, labels=batch.labels)
    with torch.no_grad():
        logits = net(*inputs).numpy()
    return {"model": onnx_path, "batch": npz, "manifest": res.manifest, "torch_logits": logits}
