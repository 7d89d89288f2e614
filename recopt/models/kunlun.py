"""Kunlun (arXiv 2602.10016) in plain PyTorch, full-compute form.

Per layer ``l`` (the Kunlun paper, arXiv 2602.10016; CompSkip is inserted later by a pass, not here)::

    X_sum = WeightGen(X)                          # [B, n, d] -> [B, n_sum, d]
    H_e   = Summary_e(S_e)                        # HSP (or PMA): [B, T_e, d_e] -> [B, n_tok_e, d]
    X     = X + GlobalInteraction([X_sum ‖ H_1 ‖ ... ‖ H_E])       # Wukong experts
    S_e   = S_e + act(LN(S_e) @ W1ᵀ) @ W2          # PFFN; W1, W2 [B, n_kv, d_e] generated from X_sum
    S_e   = S_e + SelfAttn(LN(S_e))                # RoPE/ROTE; optional band mask (sliding window)

and the head is ``MLP([flatten(X) ‖ flatten(FinalSummary_e(S_e)) for all e])``.

Event-level personalization: each event type ``e`` (a column of
``seq_lengths``) has its own tower with its own ``d_model``, heads, summary
tokens, layer count, window and maximum length (:class:`EventTowerConfig`).
A tower with fewer layers than the deepest one stops updating and its last
summary is reused by the later context layers.

Inputs (see :mod:`recopt.data.batch`)::

    forward(dense [B, n_dense], sparse_ids [B, F], seq_ids [B, E, T, C],
            seq_lengths [B, E], seq_times [B, E, T]) -> logits [B]

Choices where the paper and its public descriptions are silent, each the standard option:

* context tokens: one token for all dense features + one per sparse feature;
* WeightGen: token-axis Linear(n -> n_sum) then a 2-layer SiLU MLP on d;
* PFFN weights: each of the ``n_sum`` summary tokens generates
  ``pffn_rows_per_token`` rows of W1 and of W2 through a Linear, so
  ``n_kv = n_sum * pffn_rows_per_token``; activation tanh-GELU; no scale;
* pre-LayerNorm residual sub-layers;
* self-attention, HSP and PMA use softmax with a ``1/sqrt(d_h)`` scale by
  default; ``attn_activation="gelu_tanh"`` (etc.) switches them to the GDPA
  form ``act(QKᵀ·scale, zero-masked) / max_len @ V``;
* sliding window: symmetric band ``|i - j| <= window`` over the sequence;
* ROTE: RoPE whose position is ``log(1 + age / rote_time_scale)`` with the
  event's age in seconds from ``seq_times``; with ``use_rote=False`` the
  positions are the integers 0..T-1 (newest first);
* global interaction: ``n_experts`` Wukong-style experts, each owning a
  contiguous slice of the ``[X_sum ‖ H]`` tokens and computing
  ``LayerNorm(Linear(flatten(Z Zᵀ)) + LCE(Z))``; their outputs concatenate to
  ``n`` tokens added to X.
* padded sequence positions are zeroed at the input so outputs never depend
  on padding values; an empty sequence's summary is a finite constant.

Paper-sized configuration (per-event settings from the paper's illustration of event-level personalization;
the paper's own values are unknown)::

    KunlunConfig(d_model=256, n_summary=8, n_experts=4, head_hidden=(1024, 512, 256),
                 towers=(EventTowerConfig(d_model=256, n_heads=8, n_summary=32, n_layers=3,
                                          window=100, max_len=1000, pffn_rows_per_token=32),
                         EventTowerConfig(d_model=128, n_heads=4, n_summary=16, n_layers=2,
                                          window=50, max_len=1000, pffn_rows_per_token=32)))
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

import torch
from torch import nn

from ..data.batch import FeatureSpec
from .layers import (HSP, MLP, PMA, MultiHeadAttention, Rotary, TokenLinear, activation, band_mask,
                     init_embeddings, lengths_to_mask)


@dataclass(frozen=True)
class EventTowerConfig:
    d_model: int = 32
    n_heads: int = 2
    n_summary: int = 4              # n_tok: summary tokens this tower sends to the context path
    n_seeds: Optional[int] = None   # HSP seeds (default 4 * n_summary)
    kron_rank: int = 4              # HSP SumKronLinear rank r
    n_layers: int = 2
    window: Optional[int] = None    # sliding-window half width w (None = full attention)
    max_len: Optional[int] = None   # keep this many newest events (None = all of T)
    pffn_rows_per_token: int = 8


@dataclass(frozen=True)
class KunlunConfig:
    d_model: int = 32               # context token width d
    n_summary: int = 4              # n_sum: WeightGen output tokens
    towers: Optional[Tuple[EventTowerConfig, ...]] = None  # None: one default tower per event type
    n_experts: int = 1
    summary: str = "hsp"            # "hsp" or "pma"
    attn_activation: str = "softmax"
    pffn_activation: str = "gelu_tanh"
    use_rote: bool = True
    rote_time_scale: float = 3600.0
    head_hidden: Tuple[int, ...] = (64, 32)
    weightgen_hidden: int = 64


class WeightGen(nn.Module):
    """``[B, n, d] -> [B, n_sum, d]``: token-axis Linear then a 2-layer MLP on d."""

    def __init__(self, n: int, n_sum: int, d: int, hidden: int):
        super().__init__()
        self.compress = TokenLinear(n, n_sum)
        self.norm = nn.LayerNorm(d)
        self.mlp = MLP(d, [hidden], d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_sum = self.compress(x)
        return x_sum + self.mlp(self.norm(x_sum))


class PersonalizedFFN(nn.Module):
    """PFFN with per-sample weights generated from the context summary.

    ``forward(s [B, T, d_e], x_sum [B, n_sum, d]) -> [B, T, d_e]`` computes
    ``act(LN(s) @ W1.transpose(-1, -2)) @ W2`` with ``W1, W2 [B, n_kv, d_e]``.
    """

    def __init__(self, d_e: int, d_ctx: int, rows_per_token: int, act: str):
        super().__init__()
        self.rows, self.d_e = rows_per_token, d_e
        self.norm = nn.LayerNorm(d_e)
        self.w1_gen = nn.Linear(d_ctx, rows_per_token * d_e)
        self.w2_gen = nn.Linear(d_ctx, rows_per_token * d_e)
        self.act = activation(act)

    def forward(self, s: torch.Tensor, x_sum: torch.Tensor) -> torch.Tensor:
        w1 = self.w1_gen(x_sum).unflatten(-1, (self.rows, self.d_e)).flatten(1, 2)  # [B, n_kv, d_e]
        w2 = self.w2_gen(x_sum).unflatten(-1, (self.rows, self.d_e)).flatten(1, 2)
        h = self.act(self.norm(s) @ w1.transpose(-1, -2))                            # [B, T, n_kv]
        return h @ w2


class KunlunTransformerBlock(nn.Module):
    """``S = S + PFFN(S, X_sum); S = S + SelfAttn(LN(S))`` for one event tower."""

    def __init__(self, cfg: EventTowerConfig, d_ctx: int, max_len: int, kcfg: KunlunConfig):
        super().__init__()
        self.window = cfg.window
        self.pffn = PersonalizedFFN(cfg.d_model, d_ctx, cfg.pffn_rows_per_token, kcfg.pffn_activation)
        self.attn_norm = nn.LayerNorm(cfg.d_model)
        self.attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, kcfg.attn_activation, 1.0 / max_len)

    def forward(self, s, x_sum, key_keep, rope):
        s = s + self.pffn(s, x_sum)
        keep = key_keep[:, None, None, :]
        if self.window is not None:
            keep = keep & band_mask(s.shape[1], s.shape[1], self.window, s.device)
        h = self.attn_norm(s)
        return s + self.attn(h, h, keep, rope, rope)


class EventTower(nn.Module):
    """Embedding projection, per-layer transformer blocks and summaries for one event type."""

    def __init__(self, cfg: EventTowerConfig, n_seq_features: int, d_ctx: int, max_len: int,
                 kcfg: KunlunConfig):
        super().__init__()
        self.cfg, self.max_len = cfg, max_len
        self.input_proj = nn.Linear(n_seq_features * d_ctx, cfg.d_model)
        self.rotary = Rotary(cfg.d_model // cfg.n_heads)
        self.blocks = nn.ModuleList(KunlunTransformerBlock(cfg, d_ctx, max_len, kcfg) for _ in range(cfg.n_layers))
        # summaries[l] summarizes the input of block l; summaries[n_layers] the final sequence.
        self.summaries = nn.ModuleList(_summary(cfg, kcfg, max_len) for _ in range(cfg.n_layers + 1))
        self.summary_proj = nn.ModuleList(nn.Linear(cfg.d_model, d_ctx) for _ in range(cfg.n_layers + 1))


def _summary(cfg: EventTowerConfig, kcfg: KunlunConfig, max_len: int) -> nn.Module:
    post = 1.0 / max_len
    if kcfg.summary == "hsp":
        return HSP(cfg.d_model, cfg.n_heads, cfg.n_summary, cfg.n_seeds, cfg.kron_rank, kcfg.attn_activation, post)
    if kcfg.summary == "pma":
        return PMA(cfg.d_model, cfg.n_heads, cfg.n_summary, kcfg.attn_activation, post)
    raise ValueError(f"KunlunConfig.summary={kcfg.summary!r}; expected 'hsp' or 'pma'")


class WukongExpert(nn.Module):
    """``[B, m, d] -> [B, n_out, d]``: LayerNorm(Linear(flatten(Z Zᵀ)) + LCE(Z))."""

    def __init__(self, m: int, n_out: int, d: int):
        super().__init__()
        self.n_out, self.d = n_out, d
        self.fm_proj = nn.Linear(m * m, n_out * d)
        self.lce = TokenLinear(m, n_out)
        self.norm = nn.LayerNorm(d)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        fm = (z @ z.transpose(1, 2)).flatten(1)
        return self.norm(self.fm_proj(fm).unflatten(-1, (self.n_out, self.d)) + self.lce(z))


class GlobalInteraction(nn.Module):
    """Mixture of Wukong experts over ``m`` tokens, each owning a contiguous token slice;
    outputs concatenate to ``n`` tokens: ``[B, m, d] -> [B, n, d]``."""

    def __init__(self, m: int, n: int, d: int, n_experts: int):
        super().__init__()
        k = max(1, min(n_experts, m, n))
        self.in_sizes = [len(c) for c in _split(m, k)]
        out_sizes = [len(c) for c in _split(n, k)]
        self.experts = nn.ModuleList(WukongExpert(mi, ni, d) for mi, ni in zip(self.in_sizes, out_sizes))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        outs, start = [], 0
        for size, expert in zip(self.in_sizes, self.experts):
            outs.append(expert(z[:, start:start + size]))
            start += size
        return torch.cat(outs, dim=1)


def _split(n: int, k: int):
    return [range(i * n // k, (i + 1) * n // k) for i in range(k)]


class Kunlun(nn.Module):
    """Kunlun ranking model. See the module docstring for math, shapes and choices."""

    def __init__(self, spec: FeatureSpec, config: KunlunConfig = KunlunConfig()):
        super().__init__()
        towers = config.towers or tuple(EventTowerConfig() for _ in range(spec.n_events))
        if len(towers) != spec.n_events:
            raise ValueError(f"KunlunConfig.towers has {len(towers)} entries but the data has "
                             f"{spec.n_events} event types {spec.event_names}; give one tower per event type")
        for t in towers:
            if t.d_model % t.n_heads:
                raise ValueError(f"tower d_model={t.d_model} is not divisible by n_heads={t.n_heads}")
        self.spec, self.config = spec, replace(config, towers=towers)
        d = config.d_model
        self.n_ctx = 1 + spec.n_sparse
        self.seq_tables = tuple(spec.seq_feature_tables)
        self.tower_lens = tuple(min(t.max_len or spec.max_seq_len, spec.max_seq_len) for t in towers)
        self.n_layers = max(t.n_layers for t in towers)

        self.dense_proj = nn.Linear(spec.n_dense, d)
        self.embeddings = nn.ModuleList(nn.Embedding(c, d) for c in spec.sparse_cardinalities)
        self.towers = nn.ModuleList(
            EventTower(t, spec.n_seq_features, d, L, config) for t, L in zip(towers, self.tower_lens))
        m = config.n_summary + sum(t.n_summary for t in towers)
        self.weight_gen = nn.ModuleList(
            WeightGen(self.n_ctx, config.n_summary, d, config.weightgen_hidden) for _ in range(self.n_layers))
        self.interaction = nn.ModuleList(
            GlobalInteraction(m, self.n_ctx, d, config.n_experts) for _ in range(self.n_layers))
        head_in = self.n_ctx * d + sum(t.n_summary for t in towers) * d
        self.head = MLP(head_in, config.head_hidden, 1)
        init_embeddings(self)

    def forward(self, dense, sparse_ids, seq_ids, seq_lengths, seq_times):
        cfg = self.config
        tokens = [self.dense_proj(dense)] + [emb(sparse_ids[:, f]) for f, emb in enumerate(self.embeddings)]
        x = torch.stack(tokens, dim=1)                                     # [B, n, d]

        seqs, keeps, ropes = [], [], []
        for e, tower in enumerate(self.towers):
            T_e = self.tower_lens[e]
            ids = seq_ids[:, e, :T_e]                                      # newest first: keeps the newest
            emb = torch.cat([self.embeddings[t](ids[..., c]) for c, t in enumerate(self.seq_tables)], dim=-1)
            keep = lengths_to_mask(seq_lengths[:, e].clamp(max=T_e), ids.shape[1])
            s = tower.input_proj(emb) * keep[..., None]
            if cfg.use_rote:
                pos = torch.log1p(seq_times[:, e, :T_e] / cfg.rote_time_scale)
            else:
                pos = torch.arange(ids.shape[1], device=ids.device)[None, :].expand(ids.shape[0], -1)
            seqs.append(s); keeps.append(keep); ropes.append(tower.rotary(pos))

        summaries = [None] * len(self.towers)
        for l in range(self.n_layers):
            x_sum = self.weight_gen[l](x)
            for e, tower in enumerate(self.towers):
                if l < tower.cfg.n_layers:
                    summaries[e] = tower.summary_proj[l](tower.summaries[l](seqs[e], keeps[e]))
            x = x + self.interaction[l](torch.cat([x_sum] + summaries, dim=1))
            for e, tower in enumerate(self.towers):
                if l < tower.cfg.n_layers:
                    seqs[e] = tower.blocks[l](seqs[e], x_sum, keeps[e], ropes[e])

        finals = []
        for e, tower in enumerate(self.towers):
            L = tower.cfg.n_layers
            finals.append(tower.summary_proj[L](tower.summaries[L](seqs[e], keeps[e])).flatten(1))
        return self.head(torch.cat([x.flatten(1)] + finals, dim=1)).squeeze(-1)
