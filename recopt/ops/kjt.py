"""In-graph KeyedJaggedTensor builders of the ``sparse2d`` pass.

A graph rewritten by ``sparse2d`` calls these at run time to turn the
``nn.Embedding``/``nn.EmbeddingBag`` arguments it found into the
``KeyedJaggedTensor`` a TorchRec collection takes, and the collection's
output back into the ``nn.Embedding`` layout. Each is registered with
``torch.fx.wrap``, so a retrace keeps it as one leaf call. torchrec is
imported when a builder runs (the ``[rec]`` extra).
"""
from __future__ import annotations

from typing import List, Optional

import torch


@torch.fx.wrap
def build_bag_kjt(keys: List[str], inputs: List[torch.Tensor], offsets: List[Optional[torch.Tensor]],
                  include_last_offset: List[bool], weights: List[Optional[torch.Tensor]]):
    """A ``KeyedJaggedTensor`` from ``nn.EmbeddingBag``-style arguments, one entry per key.

    ``inputs[k]`` is either 1-D ids with ``offsets[k]`` (``[B]`` bag starts, or
    ``[B+1]`` when ``include_last_offset[k]``) or 2-D ``[B, L]`` ids with
    ``offsets[k] = None`` (B bags of L ids). ``weights[k]`` are per-id weights
    (all given or all None). Ids are cast to int64; every key must have the
    same number of bags B (the KJT's stride).
    """
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    values, lengths, ws = [], [], []
    for x, off, last, w in zip(inputs, offsets, include_last_offset, weights):
        if x.dim() == 2:
            values.append(x.reshape(-1).long())
            lengths.append(torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device))
            if w is not None:
                ws.append(w.reshape(-1))
            continue
        if last:
            n = off[-1]
            lens = off[1:] - off[:-1]
            x = x[:n]
            w = w[:n] if w is not None else None
        else:
            lens = torch.diff(off, append=torch.full((1,), x.numel(), dtype=off.dtype, device=off.device))
        values.append(x.long())
        lengths.append(lens.long())
        if w is not None:
            ws.append(w)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat(values), lengths=torch.cat(lengths),
        weights=torch.cat(ws) if ws else None)


@torch.fx.wrap
def build_sequence_kjt(keys: List[str], inputs: List[torch.Tensor]):
    """A ``KeyedJaggedTensor`` of stride 1: key k holds all of ``inputs[k]`` (any shape) as one list."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    device = inputs[0].device
    lengths = torch.tensor([x.numel() for x in inputs], dtype=torch.long, device=device)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat([x.reshape(-1).long() for x in inputs]), lengths=lengths)


@torch.fx.wrap
def unflatten_sequence_embedding(jt, indices: torch.Tensor) -> torch.Tensor:
    """``JaggedTensor`` values ``[N, D]`` → ``indices.shape + (D,)``, the ``nn.Embedding`` output."""
    values = jt.values()
    return values.reshape(tuple(indices.shape) + (values.shape[-1],))


# ----------------------------------------------------------------------------- site extraction
