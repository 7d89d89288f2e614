"""DLRM / DCNv2 baselines, in two embedding flavours with identical math.

* :class:`DLRM` uses one plain ``nn.EmbeddingBag`` per feature, called the
  DLRM way with ``(indices, offsets)``;
* :class:`TorchRecDLRM` puts the same tables in a TorchRec
  ``EmbeddingBagCollection`` fed by a ``KeyedJaggedTensor`` (needs the
  ``rec`` extra: ``pip install recopt[rec]``).

``TorchRecDLRM.from_plain(model)`` copies a :class:`DLRM`'s weights, and the
two then give the same outputs: the 2D sparse-sharding pass consumes both.

Features: one bag per sparse feature (a bag of one id, sum pooling), and one
bag per (event type, sequence column) holding the user's history (mean
pooling, empty bag -> zeros). Table names are ``<sparse name>`` and
``<event>__<sparse name of the column's table>``, e.g. ``liked__movie_id``.

Dense part: ``bottom = MLP(dense)``; ``z = [bottom ‖ pooled embeddings]``;
``interaction="dcn"`` (default, DCNv2 stacked): ``x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l``
for ``cross_layers`` full-rank layers, then the top MLP; ``interaction="dot"``
(original DLRM): pairwise dot products of the ``1 + n_bags`` vectors (upper
triangle, no diagonal) concatenated with ``bottom``, then the top MLP.

Inputs (see :mod:`recopt.data.batch`; ``seq_times`` is accepted and unused)::

    forward(dense [B, n_dense], sparse_ids [B, F], seq_ids [B, E, T, C],
            seq_lengths [B, E], seq_times [B, E, T]) -> logits [B]

Paper-sized configuration (DCNv2 baseline of the InterFormer benchmarks,
its Appendix B)::

    DLRMConfig(embedding_dim=64, bottom_hidden=(512, 256), top_hidden=(500, 500), cross_layers=3)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.fx
from torch import nn

from ..data.batch import FeatureSpec
from .layers import MLP, init_embeddings, lengths_to_mask


@dataclass(frozen=True)
class DLRMConfig:
    embedding_dim: int = 16
    bottom_hidden: Tuple[int, ...] = (64,)
    top_hidden: Tuple[int, ...] = (64, 32)
    interaction: str = "dcn"        # "dcn" | "dot"
    cross_layers: int = 2


@dataclass(frozen=True)
class BagFeature:
    name: str          # table / feature name
    num_embeddings: int
    pooling: str       # "sum" | "mean"
    source: str        # "sparse" | "seq"
    index: Tuple[int, ...]  # (f,) for sparse; (e, c) for sequences


def bag_features(spec: FeatureSpec) -> List[BagFeature]:
    """The bags both DLRM flavours build, in the order their pooled outputs concatenate."""
    names = spec.names()
    out = [BagFeature(names[f], n, "sum", "sparse", (f,)) for f, n in enumerate(spec.sparse_cardinalities)]
    for e, ev in enumerate(spec.event_names):
        for c, t in enumerate(spec.seq_feature_tables):
            out.append(BagFeature(f"{ev}__{names[t]}", spec.sparse_cardinalities[t], "mean", "seq", (e, c)))
    return out


def jagged_to_values_offsets(ids: torch.Tensor, lengths: torch.Tensor):
    """Padded ``ids [B, T]`` + ``lengths [B]`` -> flat ``values [sum(lengths)]`` and
    ``offsets [B]`` (start of each bag), the ``nn.EmbeddingBag`` input form."""
    keep = lengths_to_mask(lengths, ids.shape[1])
    offsets = torch.cumsum(lengths, 0) - lengths
    return ids[keep], offsets


class DLRMDense(nn.Module):
    """Bottom MLP, feature interaction and top MLP: ``(dense [B, n_dense], pooled [B, k*D]) -> [B]``."""

    def __init__(self, n_dense: int, n_bags: int, cfg: DLRMConfig):
        super().__init__()
        D = cfg.embedding_dim
        self.interaction, self.n_vec, self.D = cfg.interaction, 1 + n_bags, D
        self.bottom = MLP(n_dense, cfg.bottom_hidden, D)
        if cfg.interaction == "dcn":
            width = self.n_vec * D
            self.cross = nn.ModuleList(nn.Linear(width, width) for _ in range(cfg.cross_layers))
            top_in = width
        elif cfg.interaction == "dot":
            iu = torch.triu_indices(self.n_vec, self.n_vec, offset=1)
            self.register_buffer("iu0", iu[0], persistent=False)
            self.register_buffer("iu1", iu[1], persistent=False)
            self.cross = nn.ModuleList()
            top_in = D + iu.shape[1]
        else:
            raise ValueError(f"DLRMConfig.interaction={cfg.interaction!r}; expected 'dcn' or 'dot'")
        self.top = MLP(top_in, cfg.top_hidden, 1)

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        bottom = self.bottom(dense)
        if self.interaction == "dcn":
            x0 = torch.cat([bottom, pooled], dim=1)
            x = x0
            for layer in self.cross:
                x = x0 * layer(x) + x
            return self.top(x).squeeze(-1)
        z = torch.cat([bottom[:, None, :], pooled.unflatten(-1, (self.n_vec - 1, self.D))], dim=1)
        zz = z @ z.transpose(1, 2)
        return self.top(torch.cat([bottom, zz[:, self.iu0, self.iu1]], dim=1)).squeeze(-1)


class DLRM(nn.Module):
    """DLRM/DCNv2 on plain ``nn.EmbeddingBag`` tables (one per feature, in ``self.tables``)."""

    def __init__(self, spec: FeatureSpec, config: DLRMConfig = DLRMConfig()):
        super().__init__()
        self.spec, self.config = spec, config
        self.features = bag_features(spec)
        self.tables = nn.ModuleDict({
            f.name: nn.EmbeddingBag(f.num_embeddings, config.embedding_dim, mode=f.pooling)
            for f in self.features})
        self.dense_arch = DLRMDense(spec.n_dense, len(self.features), config)
        init_embeddings(self)

    def forward(self, dense, sparse_ids, seq_ids, seq_lengths, seq_times):
        batch_offsets = torch.arange(sparse_ids.shape[0], device=sparse_ids.device)
        pooled = []
        for f in self.features:
            table = self.tables[f.name]
            if f.source == "sparse":
                pooled.append(table(sparse_ids[:, f.index[0]], batch_offsets))
            else:
                e, c = f.index
                values, offsets = jagged_to_values_offsets(seq_ids[:, e, :, c], seq_lengths[:, e])
                pooled.append(table(values, offsets))
        return self.dense_arch(dense, torch.cat(pooled, dim=1))


# ----------------------------------------------------------------------------- TorchRec flavour

def _import_torchrec():
    try:
        import torchrec  # noqa: F401
        from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
        from torchrec.modules.embedding_modules import EmbeddingBagCollection
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "TorchRecDLRM needs TorchRec (and fbgemm-gpu); install the 'rec' extra: "
            f"pip install recopt[rec]  (import failed: {exc})") from exc
    return EmbeddingBagConfig, PoolingType, EmbeddingBagCollection, KeyedJaggedTensor


@torch.fx.wrap
def build_kjt(keys: List[str], values: List[torch.Tensor], lengths: List[torch.Tensor]):
    """``KeyedJaggedTensor`` from per-key flat values and per-key ``[B]`` lengths.

    Wrapped with ``torch.fx.wrap`` so that tracing keeps it as one leaf call."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))


@torch.fx.wrap
def pooled_in_key_order(pooled, keys: List[str]) -> torch.Tensor:
    """``[B, len(keys) * D]``: a KeyedTensor's per-key embeddings concatenated in ``keys`` order.

    ``KeyedTensor.values()`` follows the collection's internal grouping,
    which TorchRec reorders when the collection is sharded; indexing by key
    does not depend on it."""
    return torch.cat([pooled[k] for k in keys], dim=1)


class TorchRecDLRM(nn.Module):
    """The :class:`DLRM` model with its tables in a TorchRec ``EmbeddingBagCollection``.

    ``self.ebc`` holds one table per feature (``EmbeddingBagConfig`` name =
    feature name); ``forward`` builds a ``KeyedJaggedTensor`` with those keys.
    """

    def __init__(self, spec: FeatureSpec, config: DLRMConfig = DLRMConfig(), device: str | torch.device = "cpu"):
        super().__init__()
        EmbeddingBagConfig, PoolingType, EmbeddingBagCollection, _ = _import_torchrec()
        self.spec, self.config = spec, config
        self.features = bag_features(spec)
        self.keys = [f.name for f in self.features]
        pool = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
        self.ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=f.name, embedding_dim=config.embedding_dim,
                                       num_embeddings=f.num_embeddings, feature_names=[f.name],
                                       pooling=pool[f.pooling]) for f in self.features],
            device=torch.device(device))
        for f in self.features:
            bound = (1.0 / f.num_embeddings) ** 0.5
            nn.init.uniform_(self.ebc.embedding_bags[f.name].weight, -bound, bound)
        self.dense_arch = DLRMDense(spec.n_dense, len(self.features), config)

    def forward(self, dense, sparse_ids, seq_ids, seq_lengths, seq_times):
        values, lengths = [], []
        ones = torch.ones_like(sparse_ids[:, 0])
        for f in self.features:
            if f.source == "sparse":
                values.append(sparse_ids[:, f.index[0]])
                lengths.append(ones)
            else:
                e, c = f.index
                v, _ = jagged_to_values_offsets(seq_ids[:, e, :, c], seq_lengths[:, e])
                values.append(v)
                lengths.append(seq_lengths[:, e])
        kjt = build_kjt(self.keys, values, lengths)
        return self.dense_arch(dense, pooled_in_key_order(self.ebc(kjt), self.keys))

    @classmethod
    def from_plain(cls, plain: DLRM) -> "TorchRecDLRM":
        """A TorchRec model with ``plain``'s weights (same outputs up to float rounding)."""
        model = cls(plain.spec, plain.config)
        with torch.no_grad():
            for f in plain.features:
                model.ebc.embedding_bags[f.name].weight.copy_(plain.tables[f.name].weight)
        model.dense_arch.load_state_dict(plain.dense_arch.state_dict())
        return model
