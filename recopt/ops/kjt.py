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


#: How often :func:`build_bag_kjt` took the padded route (keys of one call with different numbers
#: of bags). Read it to see whether a served model pays for padding; reset it by assigning 0.
PADDED_CALLS = {"calls": 0}


@torch.fx.wrap
def build_bag_kjt(keys: List[str], inputs: List[torch.Tensor], offsets: List[Optional[torch.Tensor]],
                  include_last_offset: List[bool], weights: List[Optional[torch.Tensor]]):
    """A ``KeyedJaggedTensor`` from ``nn.EmbeddingBag``-style arguments, one entry per key.

    ``inputs[k]`` is either 1-D ids with ``offsets[k]`` (``[B]`` bag starts, or
    ``[B+1]`` when ``include_last_offset[k]``) or 2-D ``[B, L]`` ids with
    ``offsets[k] = None`` (B bags of L ids). ``weights[k]`` are per-id weights
    (all given or all None). Ids are cast to int64.

    One KJT has one stride, but the keys may receive different numbers of bags
    (a user-side table fed a batch of users, an item-side one a batch of
    candidates). The stride is then the largest count, each shorter key is
    padded at its end with empty bags (length 0, no ids, no weights), and
    :func:`take_bags` cuts each key's pooled output back to its own first
    ``B_k`` rows. Empty bags pool to zero and carry no gradient, so the kept
    rows and every weight gradient are those of ``nn.EmbeddingBag``; the cost
    is ``(max B - B_k)`` extra zero rows per key. Each padded call is counted in
    ``PADDED_CALLS["calls"]``.
    """
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    bags = [_bag_count(x, off, last) for x, off, last in zip(inputs, offsets, include_last_offset)]
    _check_offsets(keys, inputs, offsets, include_last_offset)
    stride = max(bags) if bags else 0
    if bags and min(bags) != stride:
        PADDED_CALLS["calls"] += 1
    values, lengths, ws = [], [], []
    for x, off, last, w, b in zip(inputs, offsets, include_last_offset, weights, bags):
        if x.dim() == 2:
            values.append(x.reshape(-1).long())
            lens = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
            if w is not None:
                ws.append(w.reshape(-1))
        else:
            if last:
                n = off[-1]
                lens = off[1:] - off[:-1]
                x = x[:n]
                w = w[:n] if w is not None else None
            elif b == 0:
                # no bags: the ids belong to none (nn.EmbeddingBag returns [0, D]); a KJT whose
                # values outrun its lengths crashes the collection's backward (segfault)
                lens = off[:0]
                x = x[:0]
                w = w[:0] if w is not None else None
            else:
                lens = torch.diff(off, append=torch.full((1,), x.numel(), dtype=off.dtype, device=off.device))
            values.append(x.long())
            if w is not None:
                ws.append(w)
        lens = lens.long()
        if b < stride:
            lens = torch.cat([lens, lens.new_zeros(stride - b)])
        lengths.append(lens)
    values, lengths = torch.cat(values), torch.cat(lengths)
    w = torch.cat(ws) if ws else None
    if stride == 0:
        # An empty batch: a stride-0 KJT breaks TorchRec's to_dict (IndexError); stated per key,
        # the collection returns [0, D] per feature, as nn.EmbeddingBag does.
        return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=w,
                                 stride_per_key_per_rank=[[0] for _ in keys])
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths, weights=w)


@torch.fx.wrap
def take_bags(pooled: torch.Tensor, input: torch.Tensor, offsets: Optional[torch.Tensor],
              include_last_offset: bool) -> torch.Tensor:
    """One key's ``[B, D]`` rows out of the collection's ``[stride, D]`` output.

    ``B`` is the key's own bag count from the same ``(input, offsets,
    include_last_offset)`` that :func:`build_bag_kjt` read; rows past it are the
    empty bags that call padded on. ``pooled`` itself when nothing was padded.
    """
    n = _bag_count(input, offsets, include_last_offset)
    return pooled if pooled.shape[0] == n else pooled[:n]


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
