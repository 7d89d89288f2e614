"""Synthetic CTR batches with production-like shapes, for speed and scaling tests.

* sparse ids follow a truncated power law, ``P(id = k) ∝ (k + 1) ** -zipf_alpha``
  (id 0 is the most popular), one table per sparse feature;
* sequence lengths are jagged, at most ``max_seq_len`` (up to thousands), drawn
  from a configurable distribution:

  ``"uniform"``   U{0, ..., max}
  ``"sparsity"``  U[(2s - 1) * max, max) with ``s = sparsity`` -- the GDPA benchmark
                  convention (s = 0.5 gives U[0, max), s = 1.0 gives all max)
  ``"lognormal"`` exp(N(log(median), sigma)), clipped to [0, max]
  ``"fixed"``     always max

* many standardized dense features;
* labels from a hidden logistic model over dense features, the first sparse
  id and the history, so a model can learn something (the ceiling AUC is
  whatever the random teacher gives; do not quote it as a quality number).

Batches are generated on demand and are a pure function of ``(seed, batch
index)``, so two runs with the same seed see identical data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Tuple

import numpy as np
import torch

from .batch import Batch, FeatureSpec

LENGTH_DISTRIBUTIONS = ("uniform", "sparsity", "lognormal", "fixed")


@dataclass(frozen=True)
class SyntheticConfig:
    n_dense: int = 256
    sparse_cardinalities: Tuple[int, ...] = (100_000, 50_000, 20_000, 5_000, 1_000, 100)
    seq_feature_tables: Tuple[int, ...] = (1, 2)
    event_names: Tuple[str, ...] = ("click", "impression")
    max_seq_len: int = 1000
    length_distribution: str = "sparsity"
    sparsity: float = 0.5
    lognormal_median: float = 100.0
    lognormal_sigma: float = 1.0
    zipf_alpha: float = 1.1
    base_ctr: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.length_distribution not in LENGTH_DISTRIBUTIONS:
            raise ValueError(f"length_distribution={self.length_distribution!r}; expected one of "
                             f"{LENGTH_DISTRIBUTIONS}")
        if not 0.5 <= self.sparsity <= 1.0 and self.length_distribution == "sparsity":
            raise ValueError(f"sparsity must be in [0.5, 1.0] (lengths ~ U[(2s-1)max, max)), got {self.sparsity}")
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {self.max_seq_len}")
        if not 0.0 < self.base_ctr < 1.0:
            raise ValueError(f"base_ctr must be in (0, 1), got {self.base_ctr}")


class _PowerLaw:
    """Sampler for ids 0..n-1 with P(k) ∝ (k+1)^-alpha (inverse CDF on a table)."""

    def __init__(self, n: int, alpha: float):
        w = (np.arange(1, n + 1, dtype=np.float64)) ** -alpha
        self.cdf = np.cumsum(w / w.sum())
        self.n = n

    def sample(self, rng: np.random.Generator, shape) -> np.ndarray:
        return np.minimum(np.searchsorted(self.cdf, rng.random(shape)), self.n - 1)


class SyntheticCTR:
    """Synthetic data source with ``train`` / ``test`` splits of given sizes."""

    def __init__(self, config: SyntheticConfig = SyntheticConfig(), n_train: int = 65_536, n_test: int = 8_192):
        self.config = c = config
        self.spec = FeatureSpec(n_dense=c.n_dense, sparse_cardinalities=tuple(c.sparse_cardinalities),
                                seq_feature_tables=tuple(c.seq_feature_tables), max_seq_len=c.max_seq_len,
                                event_names=tuple(c.event_names))
        self._samplers = [_PowerLaw(n, c.zipf_alpha) for n in c.sparse_cardinalities]
        rng = np.random.default_rng(c.seed)
        self._w_dense = rng.normal(0, 1 / np.sqrt(max(c.n_dense, 1)), c.n_dense)
        self._id_effect = rng.normal(0, 1.0, c.sparse_cardinalities[0])
        self._hist_effect = None
        if c.seq_feature_tables:
            tbl = c.seq_feature_tables[0]
            eff = rng.normal(0, 1.0, c.sparse_cardinalities[tbl])
            # centre under the id distribution so the history term does not move the base CTR
            pmf = np.diff(np.concatenate([[0.0], self._samplers[tbl].cdf]))
            self._hist_effect = eff - float(pmf @ eff)
        self.base_rate = c.base_ctr
        self.train = SyntheticSplit(self, n_train, stream=0, name="train")
        self.test = SyntheticSplit(self, n_test, stream=1, name="test")

    def lengths(self, rng: np.random.Generator, shape) -> np.ndarray:
        c = self.config
        m = c.max_seq_len
        if c.length_distribution == "uniform":
            return rng.integers(0, m + 1, shape)
        if c.length_distribution == "fixed":
            return np.full(shape, m)
        if c.length_distribution == "sparsity":
            lo = (2 * c.sparsity - 1) * m
            return np.minimum(np.floor(rng.uniform(lo, m, shape)).astype(np.int64), m) if lo < m else np.full(shape, m)
        x = np.exp(rng.normal(np.log(c.lognormal_median), c.lognormal_sigma, shape))
        return np.clip(np.round(x), 0, m).astype(np.int64)

    def generate(self, batch_size: int, seed: int) -> Batch:
        """One batch, a pure function of ``(config.seed, seed)``."""
        c = self.config
        rng = np.random.default_rng([c.seed, seed])
        B, E, T, C = batch_size, len(c.event_names), c.max_seq_len, len(c.seq_feature_tables)
        dense = rng.standard_normal((B, c.n_dense)).astype(np.float32)
        sparse = np.stack([s.sample(rng, B) for s in self._samplers], 1)
        lengths = self.lengths(rng, (B, E))
        valid = np.arange(T)[None, None, :] < lengths[:, :, None]
        seq = np.zeros((B, E, T, C), np.int64)
        for j, tbl in enumerate(c.seq_feature_tables):
            seq[..., j] = np.where(valid, self._samplers[tbl].sample(rng, (B, E, T)), 0)
        gaps = rng.exponential(3600.0, (B, E, T))
        times = np.where(valid, np.cumsum(gaps, -1), 0).astype(np.float32)
        logit = dense.astype(np.float64) @ self._w_dense + 0.5 * self._id_effect[sparse[:, 0]]
        if C:
            h = np.where(valid[:, 0], self._hist_effect[seq[:, 0, :, 0]], 0).sum(-1)
            logit = logit + h / np.maximum(lengths[:, 0], 1)
        logit = logit + np.log(c.base_ctr / (1 - c.base_ctr))
        labels = (rng.random(B) < 1 / (1 + np.exp(-logit))).astype(np.float32)
        return Batch(torch.from_numpy(dense), torch.from_numpy(sparse), torch.from_numpy(seq),
                     torch.from_numpy(lengths.astype(np.int64)), torch.from_numpy(times),
                     torch.from_numpy(labels))


class SyntheticSplit:
    """``n`` synthetic examples; same interface as :class:`recopt.data.movielens.CTRSplit`."""

    def __init__(self, source: SyntheticCTR, n: int, stream: int, name: str):
        self.source, self.n, self.stream, self.name = source, n, stream, name

    def __len__(self) -> int:
        return self.n

    @property
    def spec(self) -> FeatureSpec:
        return self.source.spec

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return self.n // batch_size if drop_last else -(-self.n // batch_size)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> Iterator[Batch]:
        """Batch ``i`` is generated from ``(stream, i)``, plus ``seed`` when shuffling."""
        nb = self.num_batches(batch_size, drop_last)
        for i in range(nb):
            size = min(batch_size, self.n - i * batch_size)
            key = (self.stream * 1_000_003 + i) * 7919 + (seed if shuffle else 0)
            yield self.source.generate(size, key)
