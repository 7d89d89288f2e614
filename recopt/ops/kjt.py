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

    bags = [_bag_count(x, off, last) for x, off, last in zip(inputs, offsets, include_last_offset)]
    if len(set(bags)) > 1:
        # One KJT has one stride: keys with different bag counts would be split at the wrong places
        # (each key reading some of the next key's bags) and pooled silently wrong.
        raise ValueError(
            "sparse2d: the lookups " + ", ".join(f"{k!r} ({b} bags)" for k, b in zip(keys, bags))
            + " were gathered into one TorchRec collection because the example gave them the same number "
            "of bags, but this batch does not: one KeyedJaggedTensor needs the same batch size for every "
            "key. Optimize with an example where these lookups have different batch sizes (the pass then "
            "puts them in separate collections), or leave the sparse2d pass out.")
    _check_offsets(keys, inputs, offsets, include_last_offset)
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
    values, lengths = torch.cat(values), torch.cat(lengths)
    w = torch.cat(ws) if ws else None
    if bags and bags[0] == 0:
        # An empty batch: a stride-0 KJT breaks TorchRec's to_dict (IndexError); stated per key,
        # the collection returns [0, D] per feature, as nn.EmbeddingBag does.
        return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=w,
                                 stride_per_key_per_rank=[[0] for _ in keys])
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths, weights=w)


def _bag_count(x: torch.Tensor, off: Optional[torch.Tensor], last: bool) -> int:
    if x.dim() == 2:
        return int(x.shape[0])
    return int(off.shape[0]) - (1 if last else 0)


def _check_offsets(keys: List[str], inputs: List[torch.Tensor], offsets: List[Optional[torch.Tensor]],
                   include_last_offset: List[bool]) -> None:
    """Raise where ``nn.EmbeddingBag`` raises on these offsets (one host sync for all keys).

    Lengths from bad offsets (not starting at 0, decreasing, past the end) would otherwise be
    negative or misplaced; eager refuses such offsets, so the rewritten graph must too.
    """
    checks, names = [], []
    for k, x, off, last in zip(keys, inputs, offsets, include_last_offset):
        if x.dim() == 2 or off is None or off.numel() == 0:
            continue
        checks += [off[0] != 0, (off[1:] < off[:-1]).any(), off[-1] > x.numel()]
        names += [f"{k!r}: offsets[0] has to be 0", f"{k!r}: offsets must not decrease",
                  f"{k!r}: offsets[-1] can not be greater than the input's length {x.numel()}"]
    if not checks:
        return
    bad = torch.stack([c.reshape(()) for c in checks])
    if bool(bad.any()):
        raise RuntimeError("sparse2d lookup: " + "; ".join(n for n, b in zip(names, bad.tolist()) if b)
                           + " (nn.EmbeddingBag refuses these offsets too)")


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
