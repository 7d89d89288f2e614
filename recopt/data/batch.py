"""The one batch format every recopt model and data source agrees on.

A model's forward takes the first five fields, positionally, tensors only (so
``torch.fx.symbolic_trace`` sees five placeholders)::

    model(dense, sparse_ids, seq_ids, seq_lengths, seq_times) -> logits [B]

Shapes (B batch, E event types, T max sequence length, C per-item sequence
feature columns):

==============  ================  =========  ==========================================
field           shape             dtype      meaning
==============  ================  =========  ==========================================
dense           [B, n_dense]      float32    standardized dense features
sparse_ids      [B, n_sparse]     int64      column f indexes table f: 0 <= id < card[f]
seq_ids         [B, E, T, C]      int64      behaviour sequence of event type e, newest
                                             first; column c indexes table
                                             ``spec.seq_feature_tables[c]``
seq_lengths     [B, E]            int64      valid length of each sequence, 0 <= len <= T
seq_times       [B, E, T]         float32    age of each event in seconds (query time
                                             minus event time, >= 0)
labels          [B]               float32    0/1 click / like label
==============  ================  =========  ==========================================

Positions ``t >= seq_lengths[b, e]`` are padding: their values are
unspecified (sources write 0) and models must build masks from the lengths,
never trust the padding values. Sequences are stored newest first, so the
``K`` most recent events are ``seq_ids[:, e, :K]`` and truncating to a shorter
window keeps the most recent events.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Tuple

import torch


class Batch(NamedTuple):
    dense: torch.Tensor
    sparse_ids: torch.Tensor
    seq_ids: torch.Tensor
    seq_lengths: torch.Tensor
    seq_times: torch.Tensor
    labels: torch.Tensor

    def inputs(self) -> Tuple[torch.Tensor, ...]:
        """The five model inputs, in forward-signature order (labels excluded)."""
        return (self.dense, self.sparse_ids, self.seq_ids, self.seq_lengths, self.seq_times)

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in self))

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class FeatureSpec:
    """Static description of a data source, enough to size every model.

    ``seq_feature_tables[c]`` names the sparse table that sequence column ``c``
    looks up (e.g. the history's movie ids share the candidate movie table), so
    models can share embeddings between the candidate and the history.
    """

    n_dense: int
    sparse_cardinalities: Tuple[int, ...]
    seq_feature_tables: Tuple[int, ...]
    max_seq_len: int
    event_names: Tuple[str, ...] = ("event",)
    sparse_names: Tuple[str, ...] = field(default=())

    def __post_init__(self):
        if self.n_dense < 0:
            raise ValueError(f"FeatureSpec.n_dense must be >= 0, got {self.n_dense}")
        if not self.sparse_cardinalities:
            raise ValueError("FeatureSpec needs at least one sparse feature")
        for c in self.seq_feature_tables:
            if not 0 <= c < len(self.sparse_cardinalities):
                raise ValueError(
                    f"seq_feature_tables entry {c} is not a sparse table index "
                    f"(have {len(self.sparse_cardinalities)} tables)")
        if self.sparse_names and len(self.sparse_names) != len(self.sparse_cardinalities):
            raise ValueError("sparse_names and sparse_cardinalities differ in length")

    @property
    def n_sparse(self) -> int:
        return len(self.sparse_cardinalities)

    @property
    def n_events(self) -> int:
        return len(self.event_names)

    @property
    def n_seq_features(self) -> int:
        return len(self.seq_feature_tables)

    def names(self) -> Tuple[str, ...]:
        return self.sparse_names or tuple(f"sparse_{i}" for i in range(self.n_sparse))


def example_batch(spec: FeatureSpec, batch_size: int = 4, seq_len: int | None = None,
                  seed: int = 0) -> Batch:
    """A small random batch matching ``spec`` (random non-zero values, jagged
    lengths including 0 and 1 when ``batch_size >= 3``) for tracing and tests."""
    g = torch.Generator().manual_seed(seed)
    T = seq_len if seq_len is not None else spec.max_seq_len
    B, E, C = batch_size, spec.n_events, spec.n_seq_features
    dense = torch.randn(B, spec.n_dense, generator=g)
    sparse = torch.stack([torch.randint(0, c, (B,), generator=g) for c in spec.sparse_cardinalities], 1)
    seq = torch.stack(
        [torch.randint(0, spec.sparse_cardinalities[t], (B, E, T), generator=g) for t in spec.seq_feature_tables],
        -1) if C else torch.zeros(B, E, T, 0, dtype=torch.long)
    lengths = torch.randint(0, T + 1, (B, E), generator=g)
    if B >= 3 and T >= 1:
        lengths[0, :] = 0
        lengths[1, :] = 1
        lengths[2, :] = T
    times = torch.rand(B, E, T, generator=g) * 1e6
    labels = (torch.rand(B, generator=g) < 0.5).float()
    return Batch(dense, sparse, seq, lengths, times.sort(-1).values, labels)
