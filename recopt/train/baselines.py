"""Trivial baselines every real model must beat by a clear margin.

* :func:`popularity_scores`: an item's smoothed positive rate on the training
  split (items never seen in training get the base rate);
* :class:`LogisticRegression`: a linear model on the dense features, with the
  common forward signature so the training loop trains it like any model.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data.batch import FeatureSpec


def popularity_scores(train_split, eval_split, item_column: int = 1, smoothing: float = 5.0,
                      batch_size: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, scores)`` on ``eval_split`` where an example's score is the smoothed
    training positive rate of its item ``sparse_ids[:, item_column]``."""
    n_items = train_split.spec.sparse_cardinalities[item_column]
    pos = np.zeros(n_items)
    cnt = np.zeros(n_items)
    seen_labels = []
    for b in train_split.batches(batch_size):
        ids = b.sparse_ids[:, item_column].numpy()
        np.add.at(cnt, ids, 1.0)
        np.add.at(pos, ids, b.labels.numpy())
        seen_labels.append(b.labels.numpy())
    p0 = float(np.concatenate(seen_labels).mean())
    rate = (pos + smoothing * p0) / (cnt + smoothing)
    labels, scores = [], []
    for b in eval_split.batches(batch_size):
        labels.append(b.labels)
        scores.append(torch.from_numpy(rate[b.sparse_ids[:, item_column].numpy()]).float())
    return torch.cat(labels), torch.cat(scores)


class LogisticRegression(nn.Module):
    """``sigmoid(w · dense + b)`` as logits; the sparse and sequence inputs are ignored."""

    def __init__(self, spec: FeatureSpec):
        super().__init__()
        self.linear = nn.Linear(spec.n_dense, 1)

    def forward(self, dense, sparse_ids, seq_ids, seq_lengths, seq_times):
        return self.linear(dense).squeeze(-1)
