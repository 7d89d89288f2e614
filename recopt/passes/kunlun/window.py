"""Sliding-window self-attention (Kunlun).

Two passes share one matcher:

* ``band_attention`` (exact): the model already masks its self-attention scores
  with a constant band ``|i - j| <= w`` built from index differences (e.g.
  ``(arange(T)[:, None] - arange(T)[None, :]).abs() <= w``). The chain
  ``q @ kᵀ -> scale -> mask -> softmax|act -> scale -> @ v`` becomes one
  :func:`~recopt.ops.local_attention.local_attention` call with
  ``window=w`` that skips out-of-band tiles. Verified by the manager like any
  exact pass.
* ``sliding_window`` (architecture; retrain): also adds a band of half width
  ``SlidingWindowConfig.window`` to self-attention that has none, keeping the
  first ``n_global`` tokens (CLS / global tokens) global. Already banded sites
  keep their band (exact). ``recopt.ops.gdpa`` calls that are self-attention
  get GDPA's ``window`` argument (GDPA's kernel skips out-of-band tiles);
  ``nn.TransformerEncoderLayer`` leaves are swapped for
  :class:`~recopt.modules.scheduled_encoder.ScheduledEncoderLayer` with the window.

Relation to the ``gdpa`` fusion pass: ``gdpa`` maps a band that already exists
in *pointwise* attention to GDPA's ``window`` too (exactly). Both passes are
declared to run before ``gdpa``, so their ``local_attention`` call is what
``gdpa`` later sees (and leaves alone); run ``gdpa`` alone when you want
GDPA's Triton kernel for pointwise banded attention.

Reason codes: ``not_self_attention``, ``no_band`` (exact pass, nothing to do),
``too_short`` (T <= 2w + 1: a window saves nothing), ``mask_not_band``
(a query x key mask that is neither a band nor key padding), ``mask_fill``
(masked scores filled so that the activation is not 0), ``layout``/``rank``
(not ``[B, H, T, d]`` with ``q @ k.transpose(-2, -1)``), ``unsupported_op``
(something between the matmuls the matcher does not know),
``dropout_training``, ``encoder_mask`` / ``encoder_attention``
(torch.nn encoder layers with a ``src_mask`` or unsupported attention options),
``gdpa_options`` (a gdpa call with an ``attn_mask`` or lengths).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from recopt.graph import canon as C
from recopt.graph.masks import MaskParts, keep_parts
from recopt.graph.nodes import const_value, depends_on_inputs, get_module, node_shape, set_submodule, tidy_graph
from recopt.modules.scheduled_encoder import ScheduledEncoder, ScheduledEncoderLayer, window_support
from recopt.ops import gdpa_ref as R
from recopt.ops.local_attention import local_attention, local_attention_flops

from ..base import Pass, PassConfig, PassContext, PassResult, Semantics
from ..registry import register_pass
from . import structure as S


@dataclass
class SlidingWindowConfig(PassConfig):
    """``window``: half width w of the band ``|i - j| <= w`` added where there is none;
    ``n_global``: leading tokens that stay global (CLS / global tokens);
    ``block``: query tile size of ``local_attention`` (None = about w/2);
    ``min_len``: skip sequences shorter than this."""

    window: int = 16
    n_global: int = 0
    block: Optional[int] = None
    min_len: int = 1

    def __post_init__(self):
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")
        if self.n_global < 0:
            raise ValueError(f"n_global must be >= 0, got {self.n_global}")


class _Reject(Exception):
    def __init__(self, code, reason):
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass
class _Chain:
    m1: fx.Node
    m2: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    T: int
    pre_scale: float = 1.0
    post_scale: float = 1.0
    activation: str = "softmax"
    key_masks: list = None      # bool nodes broadcastable to [B, 1, 1, T] (True = keep)
    band: Optional[int] = None
    fill: float = 0.0


_BIG = 1e4


class _WindowBase(Pass):
    before = ("gdpa",)
    after = ("compskip",)
    add_windows = False

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sites = []
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node.op == "output":
                continue
            mm = C.as_matmul(node, gm)
            if mm is not None:
                site = self._try_chain(gm, node, mm)
            elif node.op == "call_function" and getattr(node.target, "__name__", "") == "gdpa" \
                    and self.add_windows:
                site = self._try_gdpa(gm, node)
            elif node.op == "call_module" and isinstance(get_module(gm, node),
                                                         (nn.TransformerEncoderLayer, nn.TransformerEncoder,
                                                          ScheduledEncoderLayer, ScheduledEncoder)) \
                    and self.add_windows:
                site = self._try_encoder(gm, node)
            else:
                site = None
            if site is not None:
                sites.append(site)
        if any(s.status == "rewritten" for s in sites):
            tidy_graph(gm)
            S.prune_unused(gm)
        return PassResult(gm, sites)

    # ------------------------------------------------------------------ raw attention chains

    def _try_chain(self, gm, m1_node, m1):
        # Anchor on score products q @ kᵀ whose result feeds a second matmul through a pointwise chain.
        try:
            chain = self._match(gm, m1_node, m1)
        except _Reject as r:
            return self.rejected(m1_node, r.code, r.reason)
        if chain is None:
            return None
        try:
            window, n_global, kind = self._decide(chain)
        except _Reject as r:
            return self.rejected(chain.m2, r.code, r.reason)
        return self._emit(gm, chain, window, n_global, kind)

    def _match(self, gm, m1_node, m1) -> Optional[_Chain]:
        # walk forward: single-user pointwise ops up to a matmul whose lhs is the chain
        path, cur = [], m1_node
        m2 = None
        for _ in range(12):
            if len(cur.users) != 1:
                return None
            nxt = next(iter(cur.users))
            mm2 = C.as_matmul(nxt, gm)
            if mm2 is not None:
                if mm2.lhs is not cur:
                    return None
                m2 = mm2
                break
            path.append(nxt)
            cur = nxt
        if m2 is None or not path:
            return None
        kinds = [C.op_kind(n, gm) for n in path]
        acts = [n for n in path if C.as_activation(n, gm) is not None]
        if len(acts) != 1:
            return None
        # self-attention: q and k come from one sequence tensor
        q, kt = m1.lhs, m1.rhs
        if m1.lhs_perm is not None or m1.rhs_perm is not None or m2.rhs_perm is not None \
                or m2.out_perm is not None:
            raise _Reject("layout", "an einsum/permuted spelling of attention; expected q @ k.transpose(-2, -1)")
        if not _self_attention(q, kt):
            raise _Reject("not_self_attention", f"{m1_node.name}: query and key do not come from one sequence "
                          "(cross-attention / pooling); a sliding window applies to self-attention only")
        k = _untranspose(kt)
        shp = node_shape(m1_node)
        if k is None or shp is None or len(shp) != 4 or node_shape(q) is None or len(node_shape(q)) != 4:
            raise _Reject("layout" if k is None else "rank",
                          "expected q, k, v of shape [B, H, T, d] and q @ k.transpose(-2, -1)")
        if shp[-1] != shp[-2]:
            raise _Reject("not_self_attention", f"scores of shape {list(shp)} are not square")
        chain = _Chain(m1_node, m2.node, q, k, m2.rhs, int(shp[-1]), key_masks=[])
        act_node = acts[0]
        seen_act = False
        for n, kind in zip(path, kinds):
            if n is act_node:
                av = C.as_activation(n, gm)
                if av is None or av.name is None:
                    raise _Reject("unsupported_op", f"activation {n.name} is not supported"
                                  + (f": {av.unsupported}" if av is not None else ""))
                if av.name == "softmax" and av.dim not in (-1, 3):
                    raise _Reject("unsupported_op", f"softmax over dim {av.dim}, not the keys")
                chain.activation = av.name if av.name == "softmax" else R.canonical_activation(av.name)
                seen_act = True
                continue
            if kind == "dropout":
                mod = get_module(gm, n) if n.op == "call_module" else None
                if (mod is not None and mod.training and mod.p > 0) or (n.op != "call_module" and
                                                                        C.arg(n, 2, "training", True)):
                    raise _Reject("dropout_training", "attention dropout is active")
                continue
            if kind in ("mul", "div"):
                other = _other(n, path, m1_node)
                val = _scalar_of(gm, other)
                if val is None:
                    raise _Reject("unsupported_op", f"{n.name} scales the scores by a tensor")
                val = val if kind == "mul" else 1.0 / val
                if seen_act:
                    chain.post_scale *= val
                else:
                    chain.pre_scale *= val
                continue
            if seen_act:
                raise _Reject("unsupported_op", f"{n.name} ({kind}) after the activation")
            if kind == "add":
                other = _other(n, path, m1_node)
                keep, fill = _additive_keep(gm, other)
                if keep is None:
                    raise _Reject("unsupported_op", f"{n.name} adds a score bias that is not a mask")
                self._split_keep(gm, keep, chain, invert=False)
                chain.fill = fill
                continue
            if kind == "where":
                cond, a, b = n.args[0], n.args[1], n.args[2]
                main = a if (a in path or a is m1_node) else b
                fill = b if main is a else a
                fv = _scalar_of(gm, fill)
                if fv is None:
                    raise _Reject("unsupported_op", f"{n.name} fills scores with a tensor")
                self._split_keep(gm, cond, chain, invert=main is not a)
                chain.fill = fv
                continue
            if kind == "masked_fill":
                fv = _scalar_of(gm, C.arg(n, 2, "value"))
                if fv is None:
                    raise _Reject("unsupported_op", f"{n.name} fills with a tensor")
                self._split_keep(gm, C.arg(n, 1, "mask"), chain, invert=True)
                chain.fill = fv
                continue
            if kind in ("identity", "cast"):
                continue
            raise _Reject("unsupported_op", f"{n.name} ({kind or n.target}) between the attention matmuls")
        if chain.activation == "softmax":
            if chain.key_masks or chain.band is not None:
                if not chain.fill <= -_BIG:
                    raise _Reject("mask_fill", f"softmax scores masked with {chain.fill}; expected a large negative")
        elif chain.key_masks or chain.band is not None:
            if float(R.act_fwd(torch.tensor([chain.fill]), chain.activation).abs().max()) != 0.0:
                raise _Reject("mask_fill", f"masked scores filled with {chain.fill} and "
                              f"{chain.activation}({chain.fill}) != 0")
        return chain

    def _split_keep(self, gm, keep, chain: _Chain, invert: bool):
        """Key masks and bands, read symbolically (:func:`recopt.graph.masks.keep_parts`):
        a band's width comes from how it is built, never from the example's length."""
        factors = [keep] if invert else _and_factors(gm, keep)
        for f in factors:
            if node_shape(f) is None:
                raise _Reject("unsupported_op", f"no shape for mask {f.name}")
            got = keep_parts(gm, f, invert, 4)
            if not isinstance(got, MaskParts):
                raise _Reject("mask_not_band", got[1])
            if got.causal or got.q_lengths or got.query_masks:
                raise _Reject("mask_not_band", f"mask {f.name} is causal or masks queries: "
                              "not a symmetric band or key padding")
            if (got.key_masks or got.kv_lengths) and got.window is not None:
                raise _Reject("mask_not_band", f"mask {f.name} combines a band and key padding in "
                              "one tensor; write them as two masks joined by &")
            if got.key_masks or got.kv_lengths:
                # key-only: kept as the original factor (multiplied into k)
                chain.key_masks.append(("not", f) if invert else f)
            if got.window is not None:
                chain.band = got.window if chain.band is None else min(chain.band, got.window)

    def _decide(self, chain: _Chain):
        T = chain.T
        if chain.band is not None:
            if T <= 2 * chain.band + 1:
                raise _Reject("too_short", f"T={T} <= 2w+1={2 * chain.band + 1}: the band covers every key")
            return chain.band, 0, "exact"
        if not self.add_windows:
            raise _Reject("no_band", "self-attention without a band mask: adding one changes the model "
                          "(use the architecture pass 'sliding_window')")
        w = self.config.window
        if T <= 2 * w + 1 or T < self.config.min_len:
            raise _Reject("too_short", f"T={T} <= 2w+1={2 * w + 1}: a window of {w} covers every key")
        return w, self.config.n_global, "added"

    def _emit(self, gm, chain: _Chain, window: int, n_global: int, kind: str):
        g = gm.graph
        with g.inserting_before(chain.m2):
            keep = None
            for f in chain.key_masks:
                node = g.call_function(operator.invert, (f[1],)) if isinstance(f, tuple) else f
                keep = node if keep is None else g.call_function(operator.and_, (keep, node))
            if keep is not None:
                shape = node_shape(chain.key_masks[0][1] if isinstance(chain.key_masks[0], tuple)
                                   else chain.key_masks[0])
                if shape is not None and len(shape) < 4:
                    keep = g.call_method("reshape", (keep, -1, 1, 1, chain.T))
            empty = "uniform" if chain.fill > -math.inf and chain.activation == "softmax" else "zero"
            out = g.call_function(local_attention, (chain.q, chain.k, chain.v, window), dict(
                activation=chain.activation, pre_scale=chain.pre_scale, post_scale=chain.post_scale,
                key_keep=keep, n_global=n_global, empty_rows=empty, block=self.config.block))
        out.meta.update({k: v for k, v in chain.m2.meta.items() if k in ("tensor_meta", "nn_module_stack",
                                                                        "stack_trace")})
        chain.m2.replace_all_uses_with(out)
        qs, vs = node_shape(chain.q), node_shape(chain.v)
        B, H, T, d = (qs + (0,) * 4)[:4] if qs else (0, 0, 0, 0)
        dv = vs[-1] if vs else d
        dense = 2 * B * H * T * T * (d + dv)
        after = local_attention_flops(B, H, T, d, dv, window, n_global,
                                      self.config.block)
        what = ("band already in the graph: rewrite is exact" if kind == "exact"
                else f"band |i-j| <= {window} added" + (f", first {n_global} tokens global" if n_global else "")
                + " (architecture change: retrain)")
        return self.rewritten(chain.m2, f"{chain.activation} self-attention -> local_attention(window={window}); "
                              f"{what}", flops_before=float(dense), flops_after=float(after),
                              details={"window": window, "n_global": n_global, "T": T, "kind": kind,
                                       "activation": chain.activation, "first_matmul": chain.m1.name,
                                       "empty_rows": empty})

    # ------------------------------------------------------------------ recopt.ops.gdpa calls

    def _try_gdpa(self, gm, node):
        q, k = node.args[0], node.args[1]
        if not _self_attention(q, k, transposed=False):
            return self.rejected(node, "not_self_attention", "gdpa call whose query and key do not come from one "
                                 "sequence")
        kw = node.kwargs
        if kw.get("window") is not None:
            return self.rejected(node, "already_windowed", f"gdpa already has window={kw['window']}")
        if kw.get("attn_mask") is not None or kw.get("q_lengths") is not None or kw.get("broadcast_q"):
            return self.rejected(node, "gdpa_options", "gdpa call with attn_mask / q_lengths / broadcast_q: run "
                                 "sliding_window before gdpa (the default order) instead")
        if self.config.n_global:
            return self.rejected(node, "gdpa_options", "GDPA's window has no global-token exemption; run "
                                 "sliding_window before gdpa to get local_attention with n_global")
        qs = node_shape(q)
        T = qs[-2] if qs else 0
        w = self.config.window
        if T <= 2 * w + 1:
            return self.rejected(node, "too_short", f"T={T} <= 2w+1={2 * w + 1}")
        node.kwargs = {**kw, "window": w}
        B, H, _, d = qs
        dv = node_shape(node.args[2])[-1]
        return self.rewritten(node, f"gdpa self-attention gets window={w} (GDPA skips out-of-band tiles; "
                              "architecture change: retrain)", flops_before=float(2 * B * H * T * T * (d + dv)),
                              flops_after=float(2 * B * H * T * min(T, 2 * w + 1) * (d + dv)),
                              details={"window": w, "T": T, "kind": "added", "flops_note":
                                       "band FLOPs; the FLOP counter's gdpa formula counts the dense product"})

    # ------------------------------------------------------------------ torch.nn encoder layers

    def _try_encoder(self, gm, node):
        mod = get_module(gm, node)
        is_stack = isinstance(mod, (nn.TransformerEncoder, ScheduledEncoder))
        mask = C.arg(node, 1, "mask" if is_stack else "src_mask")
        if mask is not None or C.arg(node, 3, "is_causal", False):
            return self.rejected(node, "encoder_mask", f"{node.target} is called with an attention mask / causal; "
                                 "the band would have to be merged with it")
        layers = list(mod.layers) if is_stack else [mod]
        for layer in layers:
            why = window_support(layer)
            if why:
                return self.rejected(node, "encoder_attention", f"{node.target}: {why}")
        x = node.args[0]
        shp = node_shape(x)
        with_sa = [l for l in layers if getattr(l, "self_attn", None) is not None]
        if not with_sa:
            return self.rejected(node, "not_self_attention", f"{node.target} runs no self-attention")
        bf = with_sa[0].self_attn.batch_first
        T = (shp[1] if bf else shp[0]) if shp else 0
        w = self.config.window
        if T <= 2 * w + 1:
            return self.rejected(node, "too_short", f"T={T} <= 2w+1={2 * w + 1}")
        new = [ScheduledEncoderLayer(l, window=w, n_global=self.config.n_global) for l in layers]

        set_submodule(gm, str(node.target), ScheduledEncoder(mod, new) if is_stack else new[0])
        E = with_sa[0].self_attn.embed_dim
        B = (shp[0] if bf else shp[1]) if shp else 0
        dense = 4 * B * T * T * E * len(with_sa)
        after = local_attention_flops(B, 1, T, E, E, w, self.config.n_global, self.config.block) * len(with_sa)
        return self.rewritten(node, f"{len(with_sa)} nn.TransformerEncoderLayer(s): self-attention gets window={w}"
                              + (f", first {self.config.n_global} tokens global" if self.config.n_global else "")
                              + " (architecture change: retrain)", flops_before=float(dense),
                              flops_after=float(after), details={"window": w, "T": T, "kind": "added"})


@register_pass
class BandAttention(_WindowBase):
    """Exact: self-attention already masked by a constant band -> tile-skipping local_attention."""

    name = "band_attention"
    semantics = Semantics.EXACT
    config_cls = SlidingWindowConfig
    add_windows = False
    description = "existing band-masked self-attention -> local_attention that skips out-of-band tiles (exact)"


@register_pass
class SlidingWindow(_WindowBase):
    """Architecture: add a sliding window to self-attention (and keep existing bands, exactly)."""

    name = "sliding_window"
    semantics = Semantics.ARCHITECTURE
    config_cls = SlidingWindowConfig
    add_windows = True
    description = "Kunlun sliding-window self-attention (|i-j| <= w, global tokens exempt)"


# --------------------------------------------------------------------------- helpers


def _other(n: fx.Node, path: list, m1: fx.Node):
    for a in n.args[:2]:
        if not (isinstance(a, fx.Node) and (a in path or a is m1)):
            return a
    return None


def _scalar_of(gm, x) -> Optional[float]:
    v = C.scalar(x)
    if v is not None:
        return float(v)
    if isinstance(x, fx.Node):
        val = const_value(gm, x)
        if isinstance(val, (int, float)):
            return float(val)
        if isinstance(val, torch.Tensor) and val.numel() == 1:
            return float(val.item())
    return None


def _additive_keep(gm, node):
    """``(keep, fill)`` if ``node`` is ``where(keep, 0, fill)`` / ``masked_fill(zeros, ~keep, fill)``."""
    if not isinstance(node, fx.Node):
        return None, 0.0
    kind = C.op_kind(node, gm)
    if kind == "where":
        cond, a, b = node.args[0], node.args[1], node.args[2]
        va, vb = _scalar_of(gm, a), _scalar_of(gm, b)
        if va == 0.0 and vb is not None and vb <= -_BIG:
            return cond, vb
    return None, 0.0


def _and_factors(gm, node) -> list:
    if C.op_kind(node, gm) == "and" and all(isinstance(a, fx.Node) for a in node.args[:2]):
        return _and_factors(gm, node.args[0]) + _and_factors(gm, node.args[1])
    return [node]


def _untranspose(kt: fx.Node) -> Optional[fx.Node]:
    """``k`` if ``kt`` is ``k.transpose(-2, -1)`` / ``k.mT`` of a rank-4 ``k``."""
    if not isinstance(kt, fx.Node):
        return None
    p = C.as_permute(kt)
    if p is None:
        return None
    base, perm = p
    rank = len(perm)
    if rank == 4 and tuple(perm) == (0, 1, 3, 2):
        return base
    return None


def _lineage(node: fx.Node, depth: int = 14) -> set:
    out, frontier = set(), [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if a not in out and a.op != "get_attr":
                    out.add(a)
                    nxt.append(a)
        frontier = nxt
    return out


def _self_attention(q, kt, transposed: bool = True) -> bool:
    if not isinstance(q, fx.Node) or not isinstance(kt, fx.Node):
        return False
    lq, lk = _lineage(q) | {q}, _lineage(kt) | {kt}
    qs = node_shape(q)
    if qs is None:
        return False
    T = qs[-2]
    for n in lq & lk:
        s = node_shape(n)
        if s is not None and len(s) == 3 and s[1] == T and depends_on_inputs(n) and n.op != "placeholder" \
                or (n.op == "placeholder" and s is not None and len(s) == 3 and s[1] == T):
            return True
    return False
