"""A generator of random small recsys-like models for differential fuzzing.

A model is described by a plain dict (a *spec*, printable and replayable:
``FuzzModel(spec)`` rebuilds it) and built from blocks that act on a
sequence ``x: [B, T, D]`` embedded from ids, with per-user ``lengths: [B]``:

- ``attn``: attention in the softmax spelling or a pointwise one (silu,
  gelu), single- or multi-head, with a mask: none, key padding from lengths
  (the cold-start user has every key masked), causal, band(w), or causal
  and padding together; masks spelled as ``masked_fill`` with -1e9 or
  -inf, as an additive bias, or multiplied in (pointwise); optional
  division by T;
- ``pffn``: ``act(S @ W1ᵀ) @ W2ᵀ`` with explicit parameters;
- ``decoy``: things that look like attention but are not (softmax over the
  query dim, transposed scores, scores used twice);
- ``norm`` (LayerNorm), ``dropout`` (nn.Dropout, active in train mode),
  ``batchnorm`` (BatchNorm1d over features: batch statistics in train mode);
- a pooled head: masked mean over valid positions, or the first position.

:func:`spec_strategy` draws specs with hypothesis; :func:`edge_inputs`
yields named inputs the example does not show (batch 1, a new batch size,
length 1 and a new length, a length of 0, every length 0, full lengths).
Nothing here imports recopt: the generator is independent of what it tests.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 23
MAX_T = 12

MASKS = ("none", "key", "causal", "band", "causal_key")
SPELLINGS = ("fill_1e9", "fill_inf", "bias", "mul")
ACTS = ("softmax", "silu", "gelu")
DECOYS = ("softmax_over_queries", "transposed_scores", "scores_twice")


def _act(name: str, s: torch.Tensor) -> torch.Tensor:
    return F.silu(s) if name == "silu" else F.gelu(s) if name == "gelu" else torch.relu(s)


class Attn(nn.Module):
    def __init__(self, d: int, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, T, D = x.shape
        H = cfg["heads"]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if H > 1:
            q, k, v = (t.reshape(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))
        s = q @ k.transpose(-2, -1)
        if cfg["scale"]:
            s = s / math.sqrt(q.shape[-1])
        i = torch.arange(T)
        keep = None
        if cfg["mask"] in ("key", "causal_key"):
            keep = (i[None, :] < lengths[:, None])[:, None, :]  # [B, 1, Tk]
            if H > 1:
                keep = keep[:, None]
        if cfg["mask"] in ("causal", "causal_key"):
            c = i[:, None] >= i[None, :]
            keep = c if keep is None else keep & c
        if cfg["mask"] == "band":
            keep = (i[:, None] - i[None, :]).abs() <= cfg["band"]
        act = cfg["act"]
        spelling = cfg["spelling"]
        if act == "softmax":
            if keep is not None:
                if spelling == "fill_inf":
                    s = s.masked_fill(~keep, float("-inf"))
                elif spelling == "bias":
                    s = s + torch.zeros(keep.shape).masked_fill(~keep, -1e9)
                else:
                    s = s.masked_fill(keep == 0, -1e9)
            a = torch.softmax(s, dim=-1)
        else:
            a = _act(act, s)
            if keep is not None:
                a = a * keep if spelling in ("mul", "bias") else a.masked_fill(~keep, 0.0)
            if cfg["div_t"]:
                a = a / T
        o = a @ v
        if H > 1:
            o = o.transpose(1, 2).reshape(B, T, D)
        return x + self.out(o)


XQUERY = ("self", "param", "last")
XLAYOUTS = ("bhtd_view", "bhtd_unflatten", "bthd_einsum", "tbd_bmm", "bhtd_reshape_cat")
XMASKS = ("none", "key", "causal")
XFILLS = ("fill_inf", "finfo", "where_inf", "where_1e9", "additive", "fill_1e9_eq0")
XSCALES = ("none", "pow", "sqrt", "temperature", "after_mask")
XGQA = ("none", "repeat_interleave", "expand")


class XAttn(nn.Module):
    """Attention written the ways public recsys code writes it (self or target/cross).

    - ``query``: ``self`` (q from the sequence), ``param`` (``nq`` learned queries,
      expanded to the batch: target attention with Tq = nq, possibly equal to T in the
      example), ``last`` (the last position, DIN-style candidate, Tq = 1);
    - ``layout``: heads by ``view(B,T,H,d).transpose(1,2)``, ``unflatten``, keys-first
      ``[B, T, H, d]`` with ``einsum('bqhd,bkhd->bhqk')``, sequence-first ``[T, B, D]``
      folded to ``[B*H, T, d]`` with ``bmm`` (torch MHA's own spelling), or
      ``reshape`` + heads concatenated back with ``cat(split)``;
    - ``gqa``: one k/v head shared by all query heads through ``repeat_interleave`` or
      ``expand`` (MQA);
    - ``mask``: key lengths (``arange < lengths[:, None]``) or causal (``torch.triu``);
      ``fill``: ``masked_fill(~m, -inf)``, ``finfo.min``, ``torch.where(m, s, -inf)``,
      ``torch.where`` with -1e9, an additive ``(1 - m) * -1e9``, ``masked_fill(m == 0, -1e9)``;
    - ``scale``: ``* d ** -0.5``, ``/ math.sqrt(d)``, a learned ``temperature``, or applied
      after the mask (``-inf`` stays ``-inf``).
    """

    def __init__(self, d: int, cfg: dict):
        super().__init__()
        self.cfg = cfg
        H = cfg["heads"]
        self.hd = d // H
        kvh = 1 if cfg["gqa"] != "none" else H
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, kvh * self.hd)
        self.v = nn.Linear(d, kvh * self.hd)
        self.out = nn.Linear(d, d)
        if cfg["query"] == "param":
            self.queries = nn.Parameter(torch.randn(cfg["nq"], d))
        if cfg["scale"] == "temperature":
            self.temperature = nn.Parameter(torch.tensor(float(self.hd) ** 0.5))

    def _heads(self, t, B, T, h):
        lay = self.cfg["layout"]
        if lay == "bhtd_unflatten":
            return t.unflatten(-1, (h, self.hd)).transpose(1, 2)
        if lay == "bhtd_reshape_cat":
            return t.reshape(B, T, h, self.hd).permute(0, 2, 1, 3)
        if lay == "bthd_einsum":
            return t.view(B, T, h, self.hd)
        return t.view(B, T, h, self.hd).transpose(1, 2)

    def _expand_kv(self, t, H):
        g = self.cfg["gqa"]
        if g == "none" or H == 1:
            return t
        hdim = 2 if self.cfg["layout"] == "bthd_einsum" else 1
        if g == "repeat_interleave":
            return t.repeat_interleave(H, dim=hdim)
        shape = list(t.shape)
        shape[hdim] = H
        return t.expand(*shape)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, T, D = x.shape
        H = cfg["heads"]
        kvh = 1 if cfg["gqa"] != "none" else H
        if cfg["query"] == "self":
            xq = x
        elif cfg["query"] == "param":
            xq = self.queries.unsqueeze(0).expand(B, -1, -1)
        else:
            xq = x[:, -1:, :]
        Tq = xq.shape[1]
        lay = cfg["layout"]
        if lay == "tbd_bmm":
            # sequence-first, as torch's MHA code: [T, B, D] -> [B*H, T, d]
            xs, xqs = x.transpose(0, 1), xq.transpose(0, 1)
            q = self.q(xqs).contiguous().view(Tq, B * H, self.hd).transpose(0, 1)
            k = self.k(xs)
            v = self.v(xs)
            if kvh != H:
                k = k.unsqueeze(2).expand(T, B, H, self.hd).reshape(T, B * H, self.hd)
                v = v.unsqueeze(2).expand(T, B, H, self.hd).reshape(T, B * H, self.hd)
            k = k.contiguous().view(T, B * H, self.hd).transpose(0, 1)
            v = v.contiguous().view(T, B * H, self.hd).transpose(0, 1)
            s = torch.bmm(q, k.transpose(1, 2))
        else:
            q = self._heads(self.q(xq), B, Tq, H)
            k = self._expand_kv(self._heads(self.k(x), B, T, kvh), H)
            v = self._expand_kv(self._heads(self.v(x), B, T, kvh), H)
            if lay == "bthd_einsum":
                s = torch.einsum("bqhd,bkhd->bhqk", q, k)
            else:
                s = q @ k.transpose(-2, -1)
        scale = cfg["scale"]
        if scale == "pow":
            s = s * self.hd ** -0.5
        elif scale == "sqrt":
            s = s / math.sqrt(self.hd)
        elif scale == "temperature":
            s = s / self.temperature
        keep = None
        if cfg["mask"] == "key":
            keep = torch.arange(T, device=x.device)[None, :] < lengths[:, None]     # [B, T]
            keep = keep[:, None, None, :]                                           # [B, 1, 1, T]
        elif cfg["mask"] == "causal" and cfg["query"] == "self":
            keep = ~torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=1)
        if keep is not None and lay == "tbd_bmm":
            keep = keep.expand(-1, H, -1, -1).reshape(B * H, 1, T) if keep.dim() == 4 else keep
        if keep is not None:
            fill = cfg["fill"]
            if fill == "fill_inf":
                s = s.masked_fill(~keep, float("-inf"))
            elif fill == "finfo":
                s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
            elif fill == "where_inf":
                s = torch.where(keep, s, torch.tensor(float("-inf")))
            elif fill == "where_1e9":
                s = torch.where(keep, s, -1e9)
            elif fill == "additive":
                s = s + (1.0 - keep.float()) * -1e9
            else:
                s = s.masked_fill(keep == 0, -1e9)
        if scale == "after_mask":
            s = s / math.sqrt(self.hd)
        a = torch.softmax(s, dim=-1) if cfg["act"] == "softmax" else F.silu(s) / T
        if cfg["act"] != "softmax" and keep is not None:
            a = a * keep
        if lay == "tbd_bmm":
            o = torch.bmm(a, v).transpose(0, 1).contiguous().view(Tq, B, D).transpose(0, 1)
        elif lay == "bthd_einsum":
            o = torch.einsum("bhqk,bkhd->bqhd", a, v).reshape(B, Tq, D)
        elif lay == "bhtd_reshape_cat":
            o = a @ v
            o = torch.cat(torch.split(o, 1, dim=1), dim=-1).squeeze(1)
        else:
            o = (a @ v).transpose(1, 2).reshape(B, Tq, D)
        o = self.out(o)
        if Tq != T or cfg["query"] != "self":
            o = o.mean(1, keepdim=True)
        return x + o


class PFFN(nn.Module):
    def __init__(self, d: int, cfg: dict):
        super().__init__()
        self.act = cfg["act"]
        self.w1 = nn.Parameter(torch.randn(2 * d, d) / math.sqrt(d))
        self.w2 = nn.Parameter(torch.randn(d, 2 * d) / math.sqrt(2 * d))

    def forward(self, x, lengths):
        return x + _act(self.act, x @ self.w1.t()) @ self.w2.t()


class Decoy(nn.Module):
    def __init__(self, d: int, cfg: dict):
        super().__init__()
        self.kind = cfg["kind"]
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, lengths):
        q, k, v = self.q(x), self.k(x), self.v(x)
        s = q @ k.transpose(-2, -1) / math.sqrt(x.shape[-1])
        if self.kind == "softmax_over_queries":
            return x + torch.softmax(s, dim=-2) @ v
        if self.kind == "transposed_scores":
            return x + F.silu(s).transpose(-2, -1) @ v
        return x + torch.softmax(s, dim=-1) @ v + s.mean(-1, keepdim=True)


class Norm(nn.Module):
    def __init__(self, d: int, cfg: dict):
        super().__init__()
        self.norm = nn.LayerNorm(d)

    def forward(self, x, lengths):
        return self.norm(x)


class Dropout(nn.Module):
    def __init__(self, d: int, cfg: dict):
        super().__init__()
        self.drop = nn.Dropout(cfg["p"])

    def forward(self, x, lengths):
        return self.drop(x)


class BatchNorm(nn.Module):
    def __init__(self, d: int, cfg: dict):
        super().__init__()
        self.bn = nn.BatchNorm1d(d)

    def forward(self, x, lengths):
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


BLOCKS = {"attn": Attn, "xattn": XAttn, "pffn": PFFN, "decoy": Decoy, "norm": Norm, "dropout": Dropout, "batchnorm": BatchNorm}


class FuzzModel(nn.Module):
    """The model a spec describes. ``forward(ids [B, T], lengths [B])``."""

    def __init__(self, spec: dict):
        super().__init__()
        torch.manual_seed(spec["init_seed"])
        d = spec["d"]
        self.spec = spec
        self.emb = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(BLOCKS[b["block"]](d, b) for b in spec["blocks"])
        self.head = nn.Linear(d, 1)
        # A running-statistics state that is not the initial one.
        for m in self.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x, lengths)
        if self.spec["pool"] == "masked_mean":
            T = ids.shape[1]
            valid = (torch.arange(T)[None, :] < lengths[:, None]).to(x.dtype)[..., None]
            x = (x * valid).sum(1) / valid.sum(1).clamp_min(1.0)
        else:
            x = x[:, 0]
        return self.head(x).squeeze(-1)


def example_inputs(spec: dict, batch: int = None, T: int = None, lengths: torch.Tensor = None, seed: int = 0):
    B = spec["batch"] if batch is None else batch
    T = spec["T"] if T is None else T
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    if lengths is None:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
    return ids, lengths


def edge_inputs(spec: dict):
    """``(name, inputs)`` pairs the example does not show."""
    B, T = spec["batch"], spec["T"]
    newT = T + 3 if T + 3 <= MAX_T else max(1, T - 2)
    yield "batch 1", example_inputs(spec, batch=1, seed=1)
    yield f"batch {B + 2}", example_inputs(spec, batch=B + 2, seed=2)
    yield "length 1", example_inputs(spec, T=1, seed=3)
    yield f"length {newT}", example_inputs(spec, T=newT, seed=4)
    lens = torch.randint(1, T + 1, (max(B, 3),), generator=torch.Generator().manual_seed(5))
    lens[0] = 0
    yield "a length 0 (cold start)", example_inputs(spec, batch=max(B, 3), lengths=lens, seed=5)
    yield "every length 0", example_inputs(spec, lengths=torch.zeros(B, dtype=torch.long), seed=6)
    yield "full lengths", example_inputs(spec, lengths=torch.full((B,), T, dtype=torch.long), seed=7)


def spec_strategy(train_blocks: bool = True, xattn: bool = False):
    """A hypothesis strategy of model specs (``xattn``: include :class:`XAttn` blocks)."""
    from hypothesis import strategies as st

    heads = st.sampled_from([1, 2])
    attn = st.fixed_dictionaries({
        "block": st.just("attn"), "act": st.sampled_from(ACTS), "mask": st.sampled_from(MASKS),
        "spelling": st.sampled_from(SPELLINGS), "heads": heads, "scale": st.booleans(),
        "band": st.integers(1, 4), "div_t": st.booleans(),
    })
    pffn = st.fixed_dictionaries({"block": st.just("pffn"), "act": st.sampled_from(["relu", "silu", "gelu"])})
    decoy = st.fixed_dictionaries({"block": st.just("decoy"), "kind": st.sampled_from(DECOYS)})
    norm = st.fixed_dictionaries({"block": st.just("norm")})
    choices = [attn, attn, pffn, decoy, norm]
    if xattn:
        choices += [xattn_strategy(), xattn_strategy()]
    if train_blocks:
        choices += [st.fixed_dictionaries({"block": st.just("dropout"), "p": st.sampled_from([0.1, 0.5])}),
                    st.fixed_dictionaries({"block": st.just("batchnorm")})]
    return st.fixed_dictionaries({
        "d": st.sampled_from([4, 8]),
        "batch": st.integers(1, 4),
        "T": st.integers(1, 7),
        "blocks": st.lists(st.one_of(*choices), min_size=1, max_size=3),
        "pool": st.sampled_from(["masked_mean", "first"]),
        "init_seed": st.integers(0, 2 ** 16),
    })


def xattn_strategy():
    """A hypothesis strategy of :class:`XAttn` block configs."""
    from hypothesis import strategies as st

    return st.fixed_dictionaries({
        "block": st.just("xattn"), "query": st.sampled_from(XQUERY), "nq": st.integers(1, 4),
        "layout": st.sampled_from(XLAYOUTS), "heads": st.sampled_from([1, 2]), "gqa": st.sampled_from(XGQA),
        "mask": st.sampled_from(XMASKS), "fill": st.sampled_from(XFILLS), "scale": st.sampled_from(XSCALES),
        "act": st.sampled_from(["softmax", "softmax", "silu"]),
    })
