"""Reference recommendation models in plain PyTorch (no recopt ops).

Every model has the same forward signature (see :mod:`recopt.data.batch`)::

    model(dense, sparse_ids, seq_ids, seq_lengths, seq_times) -> logits [B]

and is built from a :class:`~recopt.data.batch.FeatureSpec` plus a config
dataclass whose defaults are small enough to train on MovieLens on a CPU in
a minute or two. ``build_model(name, spec, **overrides)`` builds one by name;
``paper_config(name)`` returns the documented paper-sized config.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from ..data.batch import FeatureSpec
from .dlrm import DLRM, DLRMConfig, TorchRecDLRM
from .interformer import InterFormer, InterFormerConfig
from .kunlun import EventTowerConfig, Kunlun, KunlunConfig
from .event_towers import EventTowerReport, personalize_event_towers
from .layers import HSP, PMA, MultiHeadAttention, count_parameters

MODELS = {
    "interformer": (InterFormer, InterFormerConfig),
    "kunlun": (Kunlun, KunlunConfig),
    "dlrm": (DLRM, DLRMConfig),
    "dlrm_torchrec": (TorchRecDLRM, DLRMConfig),
}


def paper_config(name: str, n_events: int = 2) -> Any:
    """The paper-sized config of model ``name`` (see each model's module docstring)."""
    if name == "interformer":
        return InterFormerConfig(d_model=64, n_layers=3, n_heads=4, dcn_rank=32, masknet_hidden=512,
                                 head_hidden=(1024, 512, 256, 128))
    if name == "kunlun":
        big = EventTowerConfig(d_model=256, n_heads=8, n_summary=32, n_layers=3, window=100, max_len=1000,
                               pffn_rows_per_token=32)
        small = EventTowerConfig(d_model=128, n_heads=4, n_summary=16, n_layers=2, window=50, max_len=1000,
                                 pffn_rows_per_token=32)
        towers = tuple(big if e == 0 else small for e in range(n_events))
        return KunlunConfig(d_model=256, n_summary=8, n_experts=4, head_hidden=(1024, 512, 256), towers=towers)
    if name in ("dlrm", "dlrm_torchrec"):
        return DLRMConfig(embedding_dim=64, bottom_hidden=(512, 256), top_hidden=(500, 500), cross_layers=3)
    raise KeyError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")


def build_model(name: str, spec: FeatureSpec, config: Any = None, **overrides) -> nn.Module:
    """Build model ``name`` for ``spec``; ``overrides`` replace fields of ``config`` (default config if None)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    cls, cfg_cls = MODELS[name]
    cfg = config if config is not None else cfg_cls()
    if overrides:
        cfg = replace(cfg, **overrides)
    return cls(spec, cfg)


__all__ = ["DLRM", "DLRMConfig", "TorchRecDLRM", "InterFormer", "InterFormerConfig", "Kunlun", "KunlunConfig",
           "EventTowerConfig", "HSP", "PMA", "MultiHeadAttention", "MODELS", "build_model", "paper_config",
           "count_parameters", "personalize_event_towers", "EventTowerReport"]
