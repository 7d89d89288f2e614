"""Binary-classification metrics for CTR models: AUC, LogLoss and NE.

* ``auc``: area under the ROC curve, computed exactly from average ranks
  (Mann-Whitney U), so tied scores count one half;
* ``log_loss``: mean binary cross-entropy in nats, computed from logits in
  a numerically stable way (or from probabilities clipped to [eps, 1 - eps]);
* ``normalized_entropy``: NE = LogLoss / H(p), with H the binary entropy of
  the base rate p. Lower is better; 1.0 is what always predicting p scores.
  By default p is the mean label of the evaluated data; the harness passes
  the *training* base rate (the InterFormer benchmarks normalise by "the entropy of the mean training CTR"),
  so a model is not credited for knowing the test CTR.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy().reshape(-1)
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _check(labels: np.ndarray, other: np.ndarray, what: str):
    if labels.shape != other.shape:
        raise ValueError(f"labels have {labels.size} entries but {what} have {other.size}")
    if labels.size == 0:
        raise ValueError("cannot compute a metric on zero examples")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0 or 1")


def auc(labels, scores) -> float:
    """ROC AUC of ``scores`` (any monotone score: logits or probabilities) against 0/1 ``labels``."""
    y, s = _np(labels), _np(scores)
    _check(y, s, "scores")
    n_pos = float(y.sum())
    n_neg = float(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC is undefined with only one class present ({int(n_pos)} positives, "
                         f"{int(n_neg)} negatives); evaluate on more data")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0          # 1-based average rank of each distinct score
    rank_sum_pos = float(avg_rank[inverse][y == 1].sum())
    return (rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def log_loss(labels, logits=None, *, probs=None, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy (nats). Give exactly one of ``logits`` or ``probs``."""
    if (logits is None) == (probs is None):
        raise ValueError("give exactly one of logits= or probs=")
    y = _np(labels)
    if logits is not None:
        z = _np(logits)
        _check(y, z, "logits")
        # softplus(z) - y*z == -[y log σ(z) + (1-y) log(1-σ(z))], stable for large |z|
        return float(np.mean(np.logaddexp(0.0, z) - y * z))
    p = np.clip(_np(probs), eps, 1 - eps)
    _check(y, p, "probs")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def binary_entropy(p: float) -> float:
    """H(p) in nats; 0 at p in {0, 1}."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"base rate must be in [0, 1], got {p}")
    if p in (0.0, 1.0):
        return 0.0
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def normalized_entropy(labels, logits=None, *, probs=None, base_rate: Optional[float] = None) -> float:
    """NE = LogLoss / H(base_rate); ``base_rate`` defaults to the mean of ``labels``."""
    p = float(_np(labels).mean()) if base_rate is None else float(base_rate)
    h = binary_entropy(p)
    if h == 0.0:
        raise ValueError(f"NE is undefined for base rate {p} (entropy 0)")
    return log_loss(labels, logits, probs=probs) / h


@dataclass(frozen=True)
class Metrics:
    auc: float
    logloss: float
    ne: float
    n: int
    base_rate: float      # the rate NE was normalized by

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"AUC {self.auc:.4f}  LogLoss {self.logloss:.4f}  NE {self.ne:.4f}  (n={self.n})"


def compute_metrics(labels, logits=None, *, probs=None, base_rate: Optional[float] = None) -> Metrics:
    """All three metrics at once."""
    y = _np(labels)
    p = float(y.mean()) if base_rate is None else float(base_rate)
    scores = logits if logits is not None else probs
    ll = log_loss(y, logits, probs=probs)
    h = binary_entropy(p)
    if h == 0.0:
        raise ValueError(f"NE is undefined for base rate {p} (entropy 0)")
    return Metrics(auc=auc(y, scores), logloss=ll, ne=ll / h, n=int(y.size), base_rate=p)
