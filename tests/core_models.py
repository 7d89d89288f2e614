"""Small plain-PyTorch models used by the core tests (not recopt/models)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class EmbeddingMLP(nn.Module):
    """An MLP tower over embedding bags and dense features."""

    def __init__(self, n_ids=100, dim=8, n_dense=4, hidden=32):
        super().__init__()
        self.emb_user = nn.EmbeddingBag(n_ids, dim, mode="sum")
        self.emb_item = nn.EmbeddingBag(n_ids, dim, mode="mean")
        self.mlp = nn.Sequential(nn.Linear(2 * dim + n_dense, hidden), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU())
        self.head = nn.Linear(hidden, 1)

    def forward(self, dense, user_ids, user_offsets, item_ids, item_offsets):
        u = self.emb_user(user_ids, user_offsets)
        i = self.emb_item(item_ids, item_offsets)
        x = torch.cat([u, i, dense], dim=1)
        return torch.sigmoid(self.head(self.mlp(x))).squeeze(-1)

    @staticmethod
    def example_inputs(batch=6, n_ids=100):
        g = torch.Generator().manual_seed(1)
        dense = torch.randn(batch, 4, generator=g)
        uid = torch.randint(0, n_ids, (batch * 3,), generator=g)
        uoff = torch.arange(0, batch * 3, 3)
        iid = torch.randint(0, n_ids, (batch * 2,), generator=g)
        ioff = torch.arange(0, batch * 2, 2)
        return dense, uid, uoff, iid, ioff


class SeqTransformer(nn.Module):
    """A transformer-style sequence model with hand-written attention and a length mask."""

    def __init__(self, n_ids=50, d=16, heads=2, layers=2):
        super().__init__()
        self.emb = nn.Embedding(n_ids, d)
        self.heads = heads
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(layers))
        self.proj = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.norm = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.ffn = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d)) for _ in range(layers))
        self.out = nn.Linear(d, 1)

    def forward(self, seq, lengths):
        x = self.emb(seq)
        B, T, D = x.shape
        mask = torch.arange(T, device=seq.device)[None, :] < lengths[:, None]
        bias = torch.zeros(B, 1, 1, T).masked_fill(~mask[:, None, None, :], -1e9)
        for qkv, proj, norm, ffn in zip(self.qkv, self.proj, self.norm, self.ffn):
            q, k, v = qkv(norm(x)).chunk(3, dim=-1)
            q = q.view(B, T, self.heads, D // self.heads).transpose(1, 2)
            k = k.view(B, T, self.heads, D // self.heads).transpose(1, 2)
            v = v.view(B, T, self.heads, D // self.heads).transpose(1, 2)
            s = q @ k.transpose(-2, -1) / math.sqrt(D // self.heads) + bias
            a = torch.softmax(s, dim=-1) @ v
            x = x + proj(a.transpose(1, 2).reshape(B, T, D))
            x = x + ffn(x)
        pooled = (x * mask[..., None]).sum(1) / lengths.clamp_min(1)[:, None]
        return self.out(pooled).squeeze(-1)

    @staticmethod
    def example_inputs(batch=4, T=7, n_ids=50):
        g = torch.Generator().manual_seed(2)
        return torch.randint(0, n_ids, (batch, T), generator=g), torch.tensor([7, 3, 1, 5][:batch])


class MHAModel(nn.Module):
    """nn.MultiheadAttention over item tokens with a query from user features."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.user = nn.Linear(6, d)
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, heads, 32, dropout=0.0, batch_first=True), 1,
                                         enable_nested_tensor=False)
        self.out = nn.Linear(2 * d, 1)

    def forward(self, user_feats, items):
        q = self.user(user_feats).unsqueeze(1)
        ctx, _ = self.mha(q, items, items)
        h = self.enc(items).mean(1)
        return self.out(torch.cat([ctx.squeeze(1), h], -1))

    @staticmethod
    def example_inputs(batch=3, T=5):
        g = torch.Generator().manual_seed(3)
        return torch.randn(batch, 6, generator=g), torch.randn(batch, T, 16, generator=g)


class ShapeBranchModel(nn.Module):
    """Branches on the input's rank and size: defeats symbolic tracing, not Dynamo."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 1)

    def forward(self, x):
        if len(x.shape) == 3:
            x = x.mean(1)
        if x.shape[0] > 4:
            x = torch.relu(self.a(x))
        else:
            x = torch.tanh(self.a(x))
        return self.b(x)


class ValueBranchModel(nn.Module):
    """Branches on a tensor's value: no capture can produce one graph."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        y = self.a(x)
        if y.sum().item() > 0:
            return y * 2
        return y
