"""InterFormer (arXiv 2411.09852) in plain PyTorch.

Tokens are rows here (the paper writes them as columns). Per layer ``l``
(the InterFormer paper, arXiv 2411.09852, Algorithm 1)::

    Cross Arch:        X_sum = Gating(LCE(X))                          # [B, n, d] -> [B, n_cls, d]
                       S_sum = Gating([S_CLS ‖ PMA(S) ‖ S_recent])     # [B, n_cls + n_pma + K, d]
    Interaction Arch:  X'    = Interaction([X ‖ S_sum])                # pluggable; DHEN(DOT + DCN)
    Sequence Arch:     S'    = S + bmm(LN(S), (X_sumᵀ W)ᵀ)             # PFFN, per-sample d×d weight
                       S'    = S' + MHA(LN(S'))  with RoPE

The interaction and sequence arches of a layer both read that layer's Cross
Arch outputs (they run "in parallel"). Before layer 1 the first ``X_sum`` is
prepended to the sequence as ``n_cls`` CLS tokens. A final Cross Arch
summarizes the last layer's output and the head is
``MLP([flatten(X_sum) ‖ flatten(S_sum)])``.

Behaviour sequences: for every event type ``e`` and sequence column ``c`` the
item embeddings (shared with the candidate's sparse tables) are zeroed past
``seq_lengths[:, e]``, stacked on the feature axis position by position, and
merged by MaskNet, ``MLP_lce(S ⊙ MLP_mask(S))``, into one d-wide sequence
whose valid length is the longest of the event sequences. Sequences are
newest first, so the K recent tokens are the first K after the CLS tokens
(zeroed where the user has fewer than K events).

Inputs (see :mod:`recopt.data.batch`; ``seq_times`` is accepted and unused)::

    forward(dense [B, n_dense], sparse_ids [B, F], seq_ids [B, E, T, C],
            seq_lengths [B, E], seq_times [B, E, T]) -> logits [B]

with ``T >= n_recent``.

Choices where the paper is silent, each the standard option:
gating is ``x ⊙ σ(Linear(x))`` (the converted text's ``σ(X ⊙ MLP(X))`` looks
like an artifact); pre-LayerNorm residuals around PFFN and MHA; softmax
attention with a ``1/sqrt(d_h)`` scale; DHEN = LayerNorm(DOT + DCN + X)
where DOT is a Linear over the upper triangle of ``Z Zᵀ`` and DCN is one
low-rank DCNv2 cross layer followed by a Linear; SiLU (Swish) activations.

Defaults are the paper's benchmark settings where they exist (4 CLS, 2 PMA,
2 recent tokens, DHEN) and small widths for CPU training. Paper-sized
configuration (d = 64 as in BARS; Appendix B)::

    InterFormerConfig(d_model=64, n_layers=3, n_heads=4, dcn_rank=32, masknet_hidden=512,
                      head_hidden=(1024, 512, 256, 128))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..data.batch import FeatureSpec
from .layers import (MLP, PMA, Gating, MultiHeadAttention, Rotary, TokenLinear, init_embeddings,
                     lengths_to_mask)

InteractionFactory = Callable[[int, int, int], nn.Module]


@dataclass(frozen=True)
class InterFormerConfig:
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 2
    n_cls: int = 4
    n_pma: int = 2
    n_recent: int = 2
    interaction: Union[str, InteractionFactory] = "dhen"   # "dhen" | "dot" | "dcn" | factory(m, n, d)
    dcn_rank: int = 16
    masknet_hidden: int = 64
    head_hidden: Tuple[int, ...] = (64, 32)


class MaskNet(nn.Module):
    """``[B, T, F] -> [B, T, d]``: ``MLP_lce(x ⊙ MLP_mask(x))``, position-wise."""

    def __init__(self, f: int, d: int, hidden: int):
        super().__init__()
        self.mask_mlp = MLP(f, [hidden], f)
        self.lce_mlp = MLP(f, [hidden], d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lce_mlp(x * self.mask_mlp(x))


class DotInteraction(nn.Module):
    """``[B, m, d] -> [B, n, d]``: Linear over the upper triangle (with diagonal) of ``Z Zᵀ``."""

    def __init__(self, m: int, n: int, d: int):
        super().__init__()
        self.n, self.d = n, d
        iu = torch.triu_indices(m, m)
        self.register_buffer("iu0", iu[0], persistent=False)
        self.register_buffer("iu1", iu[1], persistent=False)
        self.proj = nn.Linear(iu.shape[1], n * d)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        zz = z @ z.transpose(1, 2)
        return self.proj(zz[:, self.iu0, self.iu1]).unflatten(-1, (self.n, self.d))


class DCNInteraction(nn.Module):
    """``[B, m, d] -> [B, n, d]``: one low-rank DCNv2 cross layer
    ``x1 = x0 ⊙ (V(U x0) + b) + x0`` on the flattened tokens, then a Linear."""

    def __init__(self, m: int, n: int, d: int, rank: int = 16):
        super().__init__()
        self.n, self.d = n, d
        self.down = nn.Linear(m * d, rank, bias=False)
        self.up = nn.Linear(rank, m * d)
        self.proj = nn.Linear(m * d, n * d)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x0 = z.flatten(1)
        x1 = x0 * self.up(self.down(x0)) + x0
        return self.proj(x1).unflatten(-1, (self.n, self.d))


class DHEN(nn.Module):
    """``[B, m, d] -> [B, n, d]``: ``LayerNorm(DOT(Z) + DCN(Z) + shortcut)`` with the shortcut
    being the first ``n`` tokens (the context tokens ``X``)."""

    def __init__(self, m: int, n: int, d: int, rank: int = 16):
        super().__init__()
        self.n = n
        self.dot = DotInteraction(m, n, d)
        self.dcn = DCNInteraction(m, n, d, rank)
        self.norm = nn.LayerNorm(d)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dot(z) + self.dcn(z) + z[:, : self.n])


def make_interaction(kind: Union[str, InteractionFactory], m: int, n: int, d: int, rank: int) -> nn.Module:
    if callable(kind):
        return kind(m, n, d)
    if kind == "dhen":
        return DHEN(m, n, d, rank)
    if kind == "dot":
        return DotInteraction(m, n, d)
    if kind == "dcn":
        return DCNInteraction(m, n, d, rank)
    raise ValueError(f"unknown interaction {kind!r}; use 'dhen', 'dot', 'dcn' or a factory (m, n, d) -> module")


class CrossArch(nn.Module):
    """Gated context summary and gated sequence summary.

    ``context(x [B, n, d]) -> x_sum [B, n_cls, d]``;
    ``sequence(s [B, n_cls + T, d], keep [B, n_cls + T]) -> s_sum [B, n_cls + n_pma + K, d]``.
    """

    def __init__(self, cfg: InterFormerConfig, n_ctx: int):
        super().__init__()
        d = cfg.d_model
        self.n_cls, self.n_recent = cfg.n_cls, cfg.n_recent
        self.ctx_compress = TokenLinear(n_ctx, cfg.n_cls)
        self.ctx_mlp = MLP(d, [d], d)
        self.ctx_gate = Gating(d)
        self.pma = PMA(d, cfg.n_heads, cfg.n_pma)
        self.seq_gate = Gating(d)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        return self.ctx_gate(self.ctx_mlp(self.ctx_compress(x)))

    def sequence(self, s: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        a, k = self.n_cls, self.n_recent
        cls = s[:, :a]
        # the first K sequence tokens, zero-padded (and masked) when the sequence is shorter
        # than K (length 0 or 1): the interaction layers are built for a fixed token count
        recent = F.pad(s[:, a:] * keep[:, a:, None], (0, 0, 0, k))[:, :k]
        return self.seq_gate(torch.cat([cls, self.pma(s, keep), recent], dim=1))


class SequenceArch(nn.Module):
    """``S = S + PFFN(X_sum, LN(S)); S = S + MHA(LN(S))`` with RoPE.

    The PFFN materializes the per-sample weight ``Wp = einsum('bkd,ke->bde', x_sum, W)``
    ``[B, d, d]`` and applies ``bmm(s, Wpᵀ)`` (the PFFN spelling the ``pffn_gdpa`` pass re-associates, docs/gdpa.md)."""

    def __init__(self, cfg: InterFormerConfig):
        super().__init__()
        d = cfg.d_model
        self.pffn_norm = nn.LayerNorm(d)
        self.pffn_weight = nn.Parameter(torch.randn(cfg.n_cls, d) / (cfg.n_cls * d) ** 0.5)
        self.attn_norm = nn.LayerNorm(d)
        self.attn = MultiHeadAttention(d, cfg.n_heads)

    def forward(self, s, x_sum, keep, rope):
        wp = torch.einsum("bkd,ke->bde", x_sum, self.pffn_weight)
        s = s + torch.bmm(self.pffn_norm(s), wp.transpose(1, 2))
        h = self.attn_norm(s)
        return s + self.attn(h, h, keep[:, None, None, :], rope, rope)


class InterFormer(nn.Module):
    """InterFormer ranking model. See the module docstring for math, shapes and choices."""

    def __init__(self, spec: FeatureSpec, config: InterFormerConfig = InterFormerConfig()):
        super().__init__()
        if config.d_model % config.n_heads:
            raise ValueError(f"d_model={config.d_model} is not divisible by n_heads={config.n_heads}")
        self.spec, self.config = spec, config
        d = config.d_model
        self.n_ctx = 1 + spec.n_sparse
        self.seq_tables = tuple(spec.seq_feature_tables)
        self.dense_proj = nn.Linear(spec.n_dense, d)
        self.embeddings = nn.ModuleList(nn.Embedding(c, d) for c in spec.sparse_cardinalities)
        self.masknet = MaskNet(spec.n_events * spec.n_seq_features * d, d, config.masknet_hidden)
        self.rotary = Rotary(d // config.n_heads)
        n_s_sum = config.n_cls + config.n_pma + config.n_recent
        self.cross = nn.ModuleList(CrossArch(config, self.n_ctx) for _ in range(config.n_layers + 1))
        self.interaction = nn.ModuleList(
            make_interaction(config.interaction, self.n_ctx + n_s_sum, self.n_ctx, d, config.dcn_rank)
            for _ in range(config.n_layers))
        self.sequence = nn.ModuleList(SequenceArch(config) for _ in range(config.n_layers))
        self.head = MLP((config.n_cls + n_s_sum) * d, config.head_hidden, 1)
        init_embeddings(self)

    def forward(self, dense, sparse_ids, seq_ids, seq_lengths, seq_times):
        tokens = [self.dense_proj(dense)] + [emb(sparse_ids[:, f]) for f, emb in enumerate(self.embeddings)]
        x = torch.stack(tokens, dim=1)                                        # [B, n, d]

        T = seq_ids.shape[2]
        keeps = lengths_to_mask(seq_lengths.flatten(), T).unflatten(0, seq_lengths.shape)  # [B, E, T]
        feats = [self.embeddings[t](seq_ids[..., c]) * keeps[..., None] for c, t in enumerate(self.seq_tables)]
        stacked = torch.cat(feats, dim=-1).transpose(1, 2).flatten(2)         # [B, T, E*C*d]
        seq_keep = lengths_to_mask(seq_lengths.amax(dim=1), T)               # [B, T]
        s = self.masknet(stacked) * seq_keep[..., None]

        x_sum = self.cross[0].context(x)
        s = torch.cat([x_sum, s], dim=1)                                      # CLS tokens first
        keep = torch.cat([seq_keep.new_ones((seq_keep.shape[0], self.config.n_cls)), seq_keep], dim=1)
        pos = torch.arange(s.shape[1], device=s.device)[None, :].expand(s.shape[0], -1)
        rope = self.rotary(pos)

        for l in range(self.config.n_layers):
            if l > 0:
                x_sum = self.cross[l].context(x)
            s_sum = self.cross[l].sequence(s, keep)
            x_next = self.interaction[l](torch.cat([x, s_sum], dim=1))
            s = self.sequence[l](s, x_sum, keep, rope)
            x = x_next

        last = self.cross[self.config.n_layers]
        out = torch.cat([last.context(x).flatten(1), last.sequence(s, keep).flatten(1)], dim=1)
        return self.head(out).squeeze(-1)
