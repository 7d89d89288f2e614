"""Held-out-style models: attention as open-source recommender code writes it, and decoys.

Written the way the public libraries write them (RecBole SASRec/BERT4Rec,
pmixer's SASRec, DeepCTR-Torch AutoInt/Transformer/DIN, FuxiCTR
MultiHeadSelfAttention, generative-recommenders HSTU, plain
``nn.TransformerEncoder``), not the way recopt's matcher expects, at small
sizes. Nothing here imports recopt: the models are what a user hands in.

Every entry of :data:`MODELS` is ``name -> Case``; ``Case.make(B, T)`` gives
inputs of batch ``B`` and sequence length ``T`` (lengths drawn in
``0..T``, so cold-start rows with every key masked occur), ``Case.expect``
the gdpa pass's site outcomes: ``"rewritten"`` or a rejection reason code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

D = 16      # model width
H = 2       # heads
V = 30      # item vocabulary (id 0 = padding)


def lengths_for(B: int, T: int, g: torch.Generator) -> torch.Tensor:
    """Per-row valid lengths in 0..T: row 0 is full, row 1 (if any) empty (cold start)."""
    n = torch.randint(0, T + 1, (B,), generator=g)
    n[0] = T
    if B > 1:
        n[1] = 0
    return n


def padded_ids(B: int, T: int, g: torch.Generator, left: bool = False) -> torch.Tensor:
    """Item id sequences with 0 as padding (RecBole pads on the right, SASRec.pytorch on the left)."""
    n = lengths_for(B, T, g)
    ids = torch.randint(1, V, (B, T), generator=g)
    pos = torch.arange(T)[None, :]
    valid = pos >= (T - n[:, None]) if left else pos < n[:, None]
    return ids * valid


# ----------------------------------------------------------------------------- RecBole


class RecBoleMultiHeadAttention(nn.Module):
    """recbole/model/layers.py MultiHeadAttention: key permuted (0, 2, 3, 1), nn.Softmax, additive mask."""

    def __init__(self, n_heads=H, hidden=D, dropout=0.1):
        super().__init__()
        self.num_attention_heads = n_heads
        self.attention_head_size = hidden // n_heads
        self.all_head_size = hidden
        self.sqrt_attention_head_size = math.sqrt(self.attention_head_size)
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.softmax = nn.Softmax(dim=-1)
        self.attn_dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.out_dropout = nn.Dropout(dropout)

    def transpose_for_scores(self, x):
        new_x_shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        return x.view(*new_x_shape)

    def forward(self, input_tensor, attention_mask):
        query_layer = self.transpose_for_scores(self.query(input_tensor)).permute(0, 2, 1, 3)
        key_layer = self.transpose_for_scores(self.key(input_tensor)).permute(0, 2, 3, 1)
        value_layer = self.transpose_for_scores(self.value(input_tensor)).permute(0, 2, 1, 3)
        attention_scores = torch.matmul(query_layer, key_layer)
        attention_scores = attention_scores / self.sqrt_attention_head_size
        attention_scores = attention_scores + attention_mask
        attention_probs = self.softmax(attention_scores)
        attention_probs = self.attn_dropout(attention_probs)
        context_layer = torch.matmul(attention_probs, value_layer)
        context_layer = context_layer.permute(0, 2, 1, 3).contiguous()
        new_context_layer_shape = context_layer.size()[:-2] + (self.all_head_size,)
        context_layer = context_layer.view(*new_context_layer_shape)
        hidden_states = self.out_dropout(self.dense(context_layer))
        return self.LayerNorm(hidden_states + input_tensor)


class RecBoleSASRec(nn.Module):
    """RecBole SASRec: item + position embeddings, get_attention_mask (tril of the padding mask, where 0/-10000)."""

    def __init__(self, bidirectional=False, old_mask=False, n_layers=1):
        super().__init__()
        self.item_embedding = nn.Embedding(V, D, padding_idx=0)
        self.position_embedding = nn.Embedding(16, D)
        self.layers = nn.ModuleList([RecBoleMultiHeadAttention() for _ in range(n_layers)])
        self.LayerNorm = nn.LayerNorm(D, eps=1e-12)
        self.dropout = nn.Dropout(0.1)
        self.bidirectional, self.old_mask = bidirectional, old_mask

    def get_attention_mask(self, item_seq):
        attention_mask = item_seq != 0
        extended_attention_mask = attention_mask.unsqueeze(1).unsqueeze(2)  # torch.bool
        if self.old_mask:    # RecBole <= 1.1: (1 - mask) * -10000 with a triu subsequent mask
            extended_attention_mask = extended_attention_mask.long()
            if not self.bidirectional:
                max_len = attention_mask.size(-1)
                subsequent_mask = torch.triu(torch.ones((1, max_len, max_len)), diagonal=1)
                subsequent_mask = (subsequent_mask == 0).unsqueeze(1).long()
                extended_attention_mask = extended_attention_mask * subsequent_mask
            extended_attention_mask = extended_attention_mask.to(dtype=torch.float32)
            return (1.0 - extended_attention_mask) * -10000.0
        if not self.bidirectional:
            extended_attention_mask = torch.tril(extended_attention_mask.expand((-1, -1, item_seq.size(-1), -1)))
        return torch.where(extended_attention_mask, 0.0, -10000.0)

    def forward(self, item_seq):
        position_ids = torch.arange(item_seq.size(1), dtype=torch.long, device=item_seq.device)
        position_ids = position_ids.unsqueeze(0).expand_as(item_seq)
        x = self.item_embedding(item_seq) + self.position_embedding(position_ids)
        x = self.dropout(self.LayerNorm(x))
        mask = self.get_attention_mask(item_seq)
        for layer in self.layers:
            x = layer(x, mask)
        return x[:, -1, :] @ self.item_embedding.weight.t()


# ----------------------------------------------------------------------------- SASRec.pytorch (pmixer)


class PointWiseFeedForward(nn.Module):
    def __init__(self, hidden_units, dropout_rate):
        super().__init__()
        self.conv1 = nn.Conv1d(hidden_units, hidden_units, kernel_size=1)
        self.dropout1 = nn.Dropout(p=dropout_rate)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv1d(hidden_units, hidden_units, kernel_size=1)
        self.dropout2 = nn.Dropout(p=dropout_rate)

    def forward(self, inputs):
        outputs = self.dropout2(self.conv2(self.relu(self.dropout1(self.conv1(inputs.transpose(-1, -2))))))
        return outputs.transpose(-1, -2) + inputs


class PmixerSASRec(nn.Module):
    """SASRec.pytorch: nn.MultiheadAttention (seq-first) with a bool causal attn_mask, timeline mask multiply."""

    def __init__(self, num_blocks=2, dropout=0.0):
        super().__init__()
        self.item_emb = nn.Embedding(V, D, padding_idx=0)
        self.pos_emb = nn.Embedding(16, D)
        self.attention_layernorms = nn.ModuleList([nn.LayerNorm(D, eps=1e-8) for _ in range(num_blocks)])
        self.attention_layers = nn.ModuleList([nn.MultiheadAttention(D, H, dropout) for _ in range(num_blocks)])
        self.forward_layernorms = nn.ModuleList([nn.LayerNorm(D, eps=1e-8) for _ in range(num_blocks)])
        self.forward_layers = nn.ModuleList([PointWiseFeedForward(D, dropout) for _ in range(num_blocks)])
        self.last_layernorm = nn.LayerNorm(D, eps=1e-8)

    def forward(self, log_seqs):
        seqs = self.item_emb(log_seqs) * self.item_emb.embedding_dim ** 0.5
        poss = torch.arange(1, log_seqs.shape[1] + 1, device=log_seqs.device).unsqueeze(0).repeat(log_seqs.shape[0], 1)
        poss = poss * (log_seqs != 0)
        seqs = seqs + self.pos_emb(poss)
        tl = seqs.shape[1]
        attention_mask = ~torch.tril(torch.ones((tl, tl), dtype=torch.bool, device=seqs.device))
        for i in range(len(self.attention_layers)):
            seqs = torch.transpose(seqs, 0, 1)
            Q = self.attention_layernorms[i](seqs)
            mha_outputs, _ = self.attention_layers[i](Q, seqs, seqs, attn_mask=attention_mask)
            seqs = Q + mha_outputs
            seqs = torch.transpose(seqs, 0, 1)
            seqs = self.forward_layernorms[i](seqs)
            seqs = self.forward_layers[i](seqs)
            seqs = seqs * (log_seqs != 0).unsqueeze(-1)
        return self.last_layernorm(seqs)


class MHAKeyPadding(nn.Module):
    """Batch-first self-attention with nn.MultiheadAttention, a bool key_padding_mask and
    need_weights=False (torch's fused fast path in eval without grad: NaN for an all-padded row)."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, H, batch_first=True)
        self.norm = nn.LayerNorm(D)

    def forward(self, x, lengths):
        pad = torch.arange(x.size(1), device=x.device)[None, :] >= lengths[:, None]
        y, _ = self.mha(x, x, x, key_padding_mask=pad, need_weights=False)
        return self.norm(x + y)


# ----------------------------------------------------------------------------- BERT4Rec-style encoder


class TorchEncoderRec(nn.Module):
    """BERT4Rec/BST-style: nn.TransformerEncoder with a padding mask (optionally causal, norm_first)."""

    def __init__(self, causal=False, norm_first=False, nested=False):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=0)
        layer = nn.TransformerEncoderLayer(D, H, dim_feedforward=2 * D, dropout=0.1, activation="gelu",
                                           batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=nested)
        self.causal = causal

    def forward(self, ids):
        x = self.emb(ids)
        pad = ids == 0
        mask = None
        if self.causal:
            mask = nn.Transformer.generate_square_subsequent_mask(ids.size(1))
        h = self.encoder(x, mask=mask, src_key_padding_mask=pad)
        return h.sum(1)


# ----------------------------------------------------------------------------- CTR libraries


class DeepCTRInteractingLayer(nn.Module):
    """DeepCTR-Torch AutoInt InteractingLayer: tensordot, stack(split) heads, einsum, in-place scaling."""

    def __init__(self, embedding_size=D, head_num=H, use_res=True, scaling=True):
        super().__init__()
        self.att_embedding_size = embedding_size // head_num
        self.head_num, self.use_res, self.scaling = head_num, use_res, scaling
        self.W_Query = nn.Parameter(torch.randn(embedding_size, embedding_size) * 0.1)
        self.W_key = nn.Parameter(torch.randn(embedding_size, embedding_size) * 0.1)
        self.W_Value = nn.Parameter(torch.randn(embedding_size, embedding_size) * 0.1)
        if use_res:
            self.W_Res = nn.Parameter(torch.randn(embedding_size, embedding_size) * 0.1)

    def forward(self, inputs):
        querys = torch.tensordot(inputs, self.W_Query, dims=([-1], [0]))
        keys = torch.tensordot(inputs, self.W_key, dims=([-1], [0]))
        values = torch.tensordot(inputs, self.W_Value, dims=([-1], [0]))
        querys = torch.stack(torch.split(querys, self.att_embedding_size, dim=2))
        keys = torch.stack(torch.split(keys, self.att_embedding_size, dim=2))
        values = torch.stack(torch.split(values, self.att_embedding_size, dim=2))
        inner_product = torch.einsum('bnik,bnjk->bnij', querys, keys)
        if self.scaling:
            inner_product /= self.att_embedding_size ** 0.5
        normalized_att_scores = F.softmax(inner_product, dim=-1)
        result = torch.matmul(normalized_att_scores, values)
        result = torch.cat(torch.split(result, 1, ), dim=-1)
        result = torch.squeeze(result, dim=0)
        if self.use_res:
            result += torch.tensordot(inputs, self.W_Res, dims=([-1], [0]))
        return F.relu(result)


class AutoIntModel(nn.Module):
    """AutoInt over field embeddings of a [B, F] id matrix (F = "T" here), two interacting layers."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.layers = nn.Sequential(DeepCTRInteractingLayer(), DeepCTRInteractingLayer(scaling=False))
        self.out = nn.Linear(D, 1)

    def forward(self, ids):
        return self.out(self.layers(self.emb(ids)).mean(1))


class FuxiScaledDotProductAttention(nn.Module):
    """FuxiCTR ScaledDotProductAttention (masked_fill_ with a tiny negative, softmax method, dropout)."""

    def __init__(self, dropout_rate=0.0, fill=-1e9):
        super().__init__()
        self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else None
        self.fill = fill

    def forward(self, Q, K, V, scale=None, mask=None):
        scores = torch.matmul(Q, K.transpose(-1, -2))
        if scale:
            scores = scores / scale
        if mask is not None:
            mask = mask.view_as(scores)
            scores = scores.masked_fill_(mask, self.fill)
        attention = scores.softmax(dim=-1)
        if self.dropout is not None:
            attention = self.dropout(attention)
        output = torch.matmul(attention, V)
        return output, attention


class FuxiMultiHeadSelfAttention(nn.Module):
    """FuxiCTR MultiHeadSelfAttention: W_q/W_k/W_v, view/transpose heads, residual + layer norm."""

    def __init__(self, fill=-1e9, use_mask=True, return_attention=False):
        super().__init__()
        self.head_dim, self.num_heads = D // H, H
        self.W_q, self.W_k, self.W_v = (nn.Linear(D, D, bias=False) for _ in range(3))
        self.W_res = nn.Linear(D, D, bias=False)
        self.dot_attention = FuxiScaledDotProductAttention(0.1, fill)
        self.layer_norm = nn.LayerNorm(D)
        self.scale = self.head_dim ** 0.5
        self.use_mask, self.return_attention = use_mask, return_attention

    def forward(self, X, lengths):
        residual = X
        query, key, value = self.W_q(X), self.W_k(X), self.W_v(X)
        batch_size = query.size(0)
        query = query.view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)
        mask = None
        if self.use_mask:
            T = X.size(1)
            pad = torch.arange(T, device=X.device).unsqueeze(0) >= lengths.unsqueeze(1)   # [B, T]
            mask = pad.unsqueeze(1).unsqueeze(1).repeat(1, self.num_heads, T, 1)        # [B, H, T, T]
        output, attention = self.dot_attention(query, key, value, scale=self.scale, mask=mask)
        output = output.transpose(1, 2).contiguous().view(-1, X.size(1), self.num_heads * self.head_dim)
        output = self.layer_norm(output + self.W_res(residual))
        output = output.relu()
        if self.return_attention:
            return output, attention.mean()
        return output


class DeepCTRTransformer(nn.Module):
    """DeepCTR-Torch Transformer (BST/DSIN): heads cat(split(...), dim=0), key_masks.repeat, where with
    ``ones_like * (-2**32 + 1)`` paddings. ``softmax_dim=1`` is the library's own softmax over queries (a decoy)."""

    def __init__(self, softmax_dim=-1, subtract_max=False, query_mask_after=False):
        super().__init__()
        self.att_embedding_size, self.head_num = D // H, H
        self.W_Query = nn.Parameter(torch.randn(D, D) * 0.1)
        self.W_key = nn.Parameter(torch.randn(D, D) * 0.1)
        self.W_Value = nn.Parameter(torch.randn(D, D) * 0.1)
        self.softmax_dim, self.subtract_max, self.query_mask_after = softmax_dim, subtract_max, query_mask_after

    def forward(self, x, lengths):
        T = x.shape[1]
        key_masks = torch.arange(T, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)   # [N, T]
        querys = torch.tensordot(x, self.W_Query, dims=([-1], [0]))
        keys = torch.tensordot(x, self.W_key, dims=([-1], [0]))
        values = torch.tensordot(x, self.W_Value, dims=([-1], [0]))
        querys = torch.cat(torch.split(querys, self.att_embedding_size, dim=2), dim=0)
        keys = torch.cat(torch.split(keys, self.att_embedding_size, dim=2), dim=0)
        values = torch.cat(torch.split(values, self.att_embedding_size, dim=2), dim=0)
        outputs = torch.matmul(querys, keys.transpose(-1, -2))
        outputs = outputs / (keys.shape[-1] ** 0.5)
        km = key_masks.repeat(self.head_num, 1)
        km = torch.unsqueeze(km, 1).repeat(1, x.shape[1], 1)
        paddings = torch.ones_like(outputs) * (-2 ** 32 + 1)
        outputs = torch.where(km, outputs, paddings)
        if self.subtract_max:
            outputs = outputs - torch.max(outputs, dim=-1, keepdim=True)[0]
        outputs = F.softmax(outputs, dim=self.softmax_dim)
        if self.query_mask_after:
            qm = key_masks.repeat(self.head_num, 1)
            qm = torch.unsqueeze(qm, -1).repeat(1, 1, T)
            outputs = outputs * qm
        result = torch.matmul(outputs, values)
        result = torch.cat(torch.split(result, result.shape[0] // self.head_num, dim=0), dim=-1)
        return result


class DINDotTargetAttention(nn.Module):
    """DIN-style target attention with a dot-product score: [B, T, 1] scores, softmax over dim 1 (the keys),
    then ``bmm(scores.transpose(1, 2), keys)``. ``softmax_dim=-1`` is a decoy (softmax over the size-1 axis)."""

    def __init__(self, softmax_dim=1, fill=-(2 ** 32) + 1.0):
        super().__init__()
        self.q = nn.Linear(D, D)
        self.softmax_dim, self.fill = softmax_dim, fill

    def forward(self, query, keys, lengths):
        T = keys.size(1)
        scores = torch.bmm(keys, self.q(query).unsqueeze(-1)) / math.sqrt(D)        # [B, T, 1]
        mask = (torch.arange(T, device=keys.device)[None, :] < lengths[:, None]).unsqueeze(-1)
        scores = scores.masked_fill(~mask, self.fill)
        weights = F.softmax(scores, dim=self.softmax_dim)
        return torch.bmm(weights.transpose(1, 2), keys).squeeze(1)                    # [B, D]


class DINMLPAttention(nn.Module):
    """DeepCTR DIN AttentionSequencePoolingLayer: scores from an MLP on [q, k, q-k, q*k] (no q·kᵀ)."""

    def __init__(self):
        super().__init__()
        self.dnn = nn.Sequential(nn.Linear(4 * D, 8), nn.Sigmoid(), nn.Linear(8, 1))

    def forward(self, query, keys, lengths):
        T = keys.size(1)
        queries = query.unsqueeze(1).expand(-1, T, -1)
        att = self.dnn(torch.cat([queries, keys, queries - keys, queries * keys], dim=-1))    # [B, T, 1]
        outputs = torch.transpose(att, 1, 2)                                                  # [B, 1, T]
        keys_masks = (torch.arange(T, device=keys.device)[None, :] < lengths[:, None]).unsqueeze(1)
        paddings = torch.zeros_like(outputs)
        outputs = torch.where(keys_masks, outputs, paddings)
        return torch.matmul(outputs, keys).squeeze(1)


# ----------------------------------------------------------------------------- HSTU


class RelativeBucketedTimeAndPositionBias(nn.Module):
    """generative-recommenders RelativePositionalBias: pad/repeat/reshape trick to a [1, n, n] bias."""

    def __init__(self, max_seq_len=16):
        super().__init__()
        self._max_seq_len = max_seq_len
        self._w = nn.Parameter(torch.empty(2 * max_seq_len - 1).normal_(mean=0, std=0.02))

    def forward(self, n: int):
        t = F.pad(self._w[: 2 * n - 1], [0, n]).repeat(n)
        t = t[..., :-n].reshape(1, n, 3 * n - 2)
        r = (2 * n - 1) // 2
        return t[..., r:-r] if r > 0 else t


class HSTULayer(nn.Module):
    """HSTU (generative-recommenders, padded reference path): silu attention / n, causal buffer mask,
    relative bias, einsum 'bnhd,bmhd->bhnm' and back 'bhnm,bmhd->bnhd', u-gating and layer norm."""

    def __init__(self, max_len=16, length_mask=True, causal="buffer"):
        super().__init__()
        self.h, self.dq, self.dv = H, 4, 4
        self.uvqk = nn.Parameter(torch.randn(D, H * (2 * 4 + 2 * 4)) * 0.1)
        self.o = nn.Linear(H * 4, D)
        self.rel = RelativeBucketedTimeAndPositionBias(max_len)
        self.register_buffer("_attn_mask", torch.triu(torch.ones((max_len, max_len), dtype=torch.bool), diagonal=1))
        self.length_mask, self.causal = length_mask, causal

    def forward(self, x, lengths):
        B, n, _ = x.shape
        uvqk = F.silu(x @ self.uvqk)
        u, v, q, k = torch.split(uvqk, [self.h * self.dv, self.h * self.dv, self.h * self.dq, self.h * self.dq], dim=-1)
        qk_attn = torch.einsum("bnhd,bmhd->bhnm", q.view(B, n, self.h, self.dq), k.view(B, n, self.h, self.dq))
        qk_attn = qk_attn + self.rel(n).unsqueeze(1)
        qk_attn = F.silu(qk_attn) / n
        if self.causal == "buffer":
            invalid_attn_mask = 1.0 - self._attn_mask[:n, :n].to(qk_attn.dtype)
        else:
            invalid_attn_mask = torch.tril(torch.ones((n, n), device=x.device))
        qk_attn = qk_attn * invalid_attn_mask.unsqueeze(0).unsqueeze(0)
        if self.length_mask:
            valid = (torch.arange(n, device=x.device)[None, :] < lengths[:, None]).to(qk_attn.dtype)
            qk_attn = qk_attn * valid[:, None, None, :]
        attn_output = torch.einsum("bhnm,bmhd->bnhd", qk_attn, v.reshape(B, n, self.h, self.dv))
        attn_output = attn_output.reshape(B, n, self.h * self.dv)
        return x + self.o(F.layer_norm(attn_output, [self.h * self.dv]) * u)


# ----------------------------------------------------------------------------- other spellings


class GRU4RecAttention(nn.Module):
    """GRU4Rec/NARM-style: a GRU, then a bilinear global attention from the last state over the outputs
    (``matmul(ht.unsqueeze(1), W(h).transpose)``), -1e9 fill."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.gru = nn.GRU(D, D, batch_first=True)
        self.W = nn.Linear(D, D, bias=False)

    def forward(self, ids):
        h, _ = self.gru(self.emb(ids))
        ht = h[:, -1]
        s = torch.matmul(ht.unsqueeze(1), self.W(h).transpose(1, 2))               # [B, 1, T]
        s = s.masked_fill((ids == 0).unsqueeze(1), -1e9)
        a = torch.softmax(s, dim=-1)
        return torch.matmul(a, h).squeeze(1) + ht


class SDPAEncoder(nn.Module):
    """Newer code: F.scaled_dot_product_attention with a bool key mask [B, 1, 1, T] (+ optional is_causal)."""

    def __init__(self, causal=False):
        super().__init__()
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.causal = causal

    def forward(self, x, lengths):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        if self.causal:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            keep = (torch.arange(T, device=x.device)[None, :] < lengths[:, None])[:, None, None, :]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.o(y.transpose(1, 2).reshape(B, T, D))


class BaddbmmHeadsAttention(nn.Module):
    """Heads folded into the batch (reshape), scores via baddbmm with the additive key mask as input."""

    def forward(self, x, lengths):
        B, T, _ = x.shape
        qkv = x.reshape(B, T, H, D // H).transpose(1, 2).reshape(B * H, T, D // H)
        add = ((torch.arange(T)[None, :] >= lengths[:, None]).float() * -1e4)      # [B, T]
        add = add.repeat_interleave(H, dim=0).unsqueeze(1).expand(-1, T, -1)       # [B*H, T, T]
        s = torch.baddbmm(add, qkv, qkv.transpose(1, 2), beta=1.0, alpha=(D // H) ** -0.5)
        return torch.bmm(s.softmax(-1), qkv).reshape(B, H, T, D // H)


class CausalSelfAttentionFinfo(nn.Module):
    """GPT-style with a registered bias buffer sliced [:, :, :T, :T], finfo.min fill, scale after the mask."""

    def __init__(self, max_len=16):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, H, C // H).transpose(1, 2)
        q = q.view(B, T, H, C // H).transpose(1, 2)
        v = v.view(B, T, H, C // H).transpose(1, 2)
        att = q @ k.transpose(-2, -1)
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, torch.finfo(att.dtype).min)
        att = att * (1.0 / math.sqrt(k.size(-1)))
        att = F.softmax(att, dim=-1)
        y = att @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class ReluAttentionLengthsDiv(nn.Module):
    """Pointwise (relu) attention with a 0/1 float padding mask multiplied in, divided by the valid length."""

    def forward(self, x, lengths):
        T = x.size(1)
        valid = (torch.arange(T)[None, :] < lengths[:, None]).float()                  # [B, T]
        s = torch.relu(torch.bmm(x, x.transpose(1, 2)) * 0.25) * valid.unsqueeze(1)
        s = s / lengths.clamp(min=1).unsqueeze(-1).unsqueeze(-1)
        return torch.bmm(s, x)


# ----------------------------------------------------------------------------- decoys


class DecoySoftmaxOverQueries(nn.Module):
    """softmax over dim -2 (the queries): column-normalised, not attention."""

    def forward(self, q, k, v):
        return F.softmax(q @ k.transpose(-1, -2), dim=-2) @ v


class DecoyRenormalised(nn.Module):
    """softmax, then a key mask and a renormalisation by the row sum (an op between softmax and @V)."""

    def forward(self, q, k, v, lengths):
        keep = (torch.arange(k.size(1))[None, :] < lengths[:, None]).unsqueeze(1).float()
        a = torch.softmax(torch.bmm(q, k.transpose(1, 2)), -1) * keep
        a = a / (a.sum(-1, keepdim=True) + 1e-8)
        return torch.bmm(a, v)


class DecoyScoresReused(nn.Module):
    """the probabilities are also returned (an attention-weight regulariser uses them)."""

    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1)
        return p @ v, (p * p).sum()


class DecoyEpsilonAfterSoftmax(nn.Module):
    """``softmax + 1e-6`` before @V: every key gets a constant extra weight."""

    def forward(self, q, k, v):
        return (torch.softmax(q @ k.transpose(-1, -2), dim=-1) + 1e-6) @ v


class PermutedKeyLayout(nn.Module):
    """Real attention in an odd spelling: k, v arrive [B, T, H, d]; the key is permuted straight to
    [B, H, d, T] and transposed twice; v is permuted to heads-first."""

    def forward(self, q, k, v):
        kk = k.permute(0, 2, 3, 1)                       # [B, H, d, T]: a legitimate key transpose
        s = q @ kk.transpose(-1, -2).transpose(-1, -2)    # same thing, twice transposed
        return torch.softmax(s, -1) @ v.permute(0, 2, 1, 3)


class DecoyMaskAfterSoftmax(nn.Module):
    """softmax over all keys, then padded keys zeroed without renormalising (weights no longer sum to 1)."""

    def forward(self, q, k, v, lengths):
        keep = torch.arange(k.size(-2))[None, :] < lengths[:, None]
        p = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        p = p.masked_fill(~keep[:, None, None, :], 0.0)
        return p @ v


class DecoySigmoidGate(nn.Module):
    """sigmoid scores (sigmoid(0) = 0.5: masking cannot be zero masking), a key mask multiplied in."""

    def forward(self, q, k, v, lengths):
        keep = (torch.arange(k.size(-2))[None, :] < lengths[:, None]).float()
        s = torch.sigmoid(q @ k.transpose(-1, -2)) * keep[:, None, None, :]
        return s @ v


@dataclass
class Case:
    model: Callable[[], nn.Module]
    make: Callable[[int, int, torch.Generator], tuple]
    expect: list
    train_differs: bool = True   # the model has mode-dependent layers (dropout): test .train() too


def _ids(left=False):
    return lambda B, T, g: (padded_ids(B, T, g, left),)


def _x_len(B, T, g):
    return torch.randn(B, T, D, generator=g), lengths_for(B, T, g)


def _qkv4(B, T, g):
    return tuple(torch.randn(B, H, T, D // H, generator=g) for _ in range(3))


def _qkv4_len(B, T, g):
    return _qkv4(B, T, g) + (lengths_for(B, T, g),)


def _qkv3_len(B, T, g):
    return tuple(torch.randn(B, T, D // H, generator=g) for _ in range(3)) + (lengths_for(B, T, g),)


def _target(B, T, g):
    return torch.randn(B, D, generator=g), torch.randn(B, T, D, generator=g), lengths_for(B, T, g)


def _x(B, T, g):
    return (torch.randn(B, T, D, generator=g),)


def _bthd(B, T, g):
    return (torch.randn(B, H, T, D // H, generator=g), torch.randn(B, T, H, D // H, generator=g),
            torch.randn(B, T, H, D // H, generator=g))


MODELS = {
    # real attention
    "recbole_sasrec": Case(lambda: RecBoleSASRec(), _ids(), ["rewritten"]),
    # (train mode with attention dropout is covered by recbole_sasrec: the same layer)
    "recbole_sasrec_old_mask": Case(lambda: RecBoleSASRec(old_mask=True), _ids(), ["rewritten"],
                                    train_differs=False),
    "recbole_bert4rec": Case(lambda: RecBoleSASRec(bidirectional=True), _ids(), ["rewritten"],
                             train_differs=False),
    "pmixer_sasrec": Case(lambda: PmixerSASRec(), _ids(left=True), ["rewritten", "rewritten"]),
    "mha_batch_first_key_padding": Case(lambda: MHAKeyPadding(), _x_len, ["rewritten"], train_differs=False),
    "torch_encoder_bert4rec": Case(lambda: TorchEncoderRec(), _ids(), ["rewritten", "rewritten"]),
    # the defaults (enable_nested_tensor=True): eval without grad pads the output with 0
    "torch_encoder_nested": Case(lambda: TorchEncoderRec(nested=True), _ids(), ["rewritten", "rewritten"]),
    "torch_encoder_nested_left_pad": Case(lambda: TorchEncoderRec(nested=True), _ids(left=True),
                                          ["rewritten", "rewritten"]),
    "torch_encoder_causal_prenorm": Case(lambda: TorchEncoderRec(causal=True, norm_first=True), _ids(),
                                         ["rewritten", "rewritten"]),
    "deepctr_autoint": Case(lambda: AutoIntModel(), lambda B, T, g: (torch.randint(0, V, (B, T), generator=g),),
                            ["rewritten", "rewritten"], train_differs=False),
    "fuxi_mhsa": Case(lambda: FuxiMultiHeadSelfAttention(), _x_len, ["rewritten"]),
    "fuxi_mhsa_nomask": Case(lambda: FuxiMultiHeadSelfAttention(use_mask=False), _x_len, ["rewritten"]),
    "deepctr_transformer": Case(lambda: DeepCTRTransformer(), _x_len, ["rewritten"], train_differs=False),
    # Known gap: scores computed as keys @ query ([B, T, 1], keys on dim -2) are not matched as
    # transposed attention yet; left alone (outputs unchanged): the reason says how to write them.
    "din_dot_target": Case(lambda: DINDotTargetAttention(), _target, ["layout"],
        train_differs=False),
    "hstu_buffer_causal": Case(lambda: HSTULayer(), _x_len, ["rewritten"], train_differs=False),
    "hstu_tril_nolen": Case(lambda: HSTULayer(length_mask=False, causal="tril"), _x_len, ["rewritten"],
        train_differs=False),
    "gru4rec_attention": Case(lambda: GRU4RecAttention(), _ids(left=True), ["rewritten"],
        train_differs=False),
    "sdpa_key_mask": Case(lambda: SDPAEncoder(), _x_len, ["rewritten"], train_differs=False),
    "sdpa_causal": Case(lambda: SDPAEncoder(causal=True), _x_len, ["rewritten"], train_differs=False),
    "baddbmm_heads": Case(lambda: BaddbmmHeadsAttention(), _x_len, ["rewritten"], train_differs=False),
    "gpt_buffer_finfo": Case(lambda: CausalSelfAttentionFinfo(), _x, ["rewritten"], train_differs=False),
    "relu_lengths_div": Case(lambda: ReluAttentionLengthsDiv(), _x_len, ["rewritten"], train_differs=False),
    # decoys and what the libraries get wrong
    "fuxi_tiny_fill": Case(lambda: FuxiMultiHeadSelfAttention(fill=-1e-10), _x_len, ["mask_fill_nonzero"]),
    "fuxi_attention_returned": Case(lambda: FuxiMultiHeadSelfAttention(return_attention=True), _x_len,
                                    ["score_used_twice"]),
    "deepctr_transformer_softmax_dim1": Case(lambda: DeepCTRTransformer(softmax_dim=1), _x_len,
                                             ["softmax_wrong_dim"], train_differs=False),
    "deepctr_transformer_max_query_mask": Case(
        lambda: DeepCTRTransformer(subtract_max=True, query_mask_after=True), _x_len,
        ["reduction_between_matmuls"], train_differs=False),
    "din_softmax_size1_axis": Case(lambda: DINDotTargetAttention(softmax_dim=-1), _target, ["layout"],
        train_differs=False),
    "din_mlp_scores": Case(lambda: DINMLPAttention(), _target, [], train_differs=False),
    "decoy_softmax_queries": Case(lambda: DecoySoftmaxOverQueries(), _qkv4, ["softmax_wrong_dim"],
        train_differs=False),
    "decoy_renormalised": Case(lambda: DecoyRenormalised(), _qkv3_len, ["reduction_between_matmuls"],
        train_differs=False),
    "decoy_scores_reused": Case(lambda: DecoyScoresReused(), _qkv4, ["score_used_twice"],
        train_differs=False),
    "decoy_epsilon": Case(lambda: DecoyEpsilonAfterSoftmax(), _qkv4, ["score_bias"], train_differs=False),
    "decoy_mask_after_softmax": Case(lambda: DecoyMaskAfterSoftmax(), _qkv4_len, ["mask_after_softmax"],
        train_differs=False),
    "decoy_sigmoid": Case(lambda: DecoySigmoidGate(), _qkv4_len, ["activation_unsupported"],
        train_differs=False),
    "permuted_key_layout": Case(lambda: PermutedKeyLayout(), _bthd, ["rewritten"], train_differs=False),
}
