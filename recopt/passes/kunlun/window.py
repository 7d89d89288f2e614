"""Sliding-window self-attention (Kunlun).

Two passes read attention through the one matcher of every attention pass,
:func:`recopt.graph.attention.match_attention` (anchored at ``P @ v``; any
matmul/einsum/transpose spelling, scale before or after the mask, masks read
symbolically by :mod:`recopt.graph.masks`), plus :func:`~recopt.graph.attention.same_sequence`
for self-attention and :func:`~recopt.graph.attention.bias_mask_factors` for
additive masks ``scores + where(keep, 0, -1e9)``:

* ``band_attention`` (exact): the model already masks its self-attention scores
  with a constant band ``|i - j| <= w`` built from index differences (e.g.
  ``(arange(T)[:, None] - arange(T)[None, :]).abs() <= w``); ``w`` is read from
  that construction, never from the example's length. The region
  ``q kᵀ -> scale -> mask -> softmax|act -> scale -> @ v`` becomes one
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
(masked scores filled so that the activation is not 0, or ``-inf`` with key
padding: a fully padded row is NaN in the model), ``layout``/``rank``
(not ``[B, H, T, d]``, or GQA), ``unsupported_op`` (a score bias that is not an
additive mask, per-row scales), the matcher's own codes (docs/gdpa.md) for
regions it cannot describe,
``dropout_training``, ``encoder_mask`` / ``encoder_attention``
(torch.nn encoder layers with a ``src_mask`` or unsupported attention options),
``gdpa_options`` (a gdpa call with an ``attn_mask`` or lengths).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from recopt.graph import attention as A
from recopt.graph import canon as C
from recopt.graph.masks import MaskParts
from recopt.graph.nodes import get_module, node_shape, set_submodule, tidy_graph
from recopt.modules.scheduled_encoder import ScheduledEncoder, ScheduledEncoderLayer, window_support
from recopt.ops import gdpa_ref as R
from recopt.ops.local_attention import local_attention, local_attention_flops

from ..base import Pass, PassConfig, PassContext, PassResult, Semantics
from ..gdpa.emit import _permute, _scalar_expr
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
    """A matched self-attention region as ``local_attention`` arguments."""

    match: A.AttentionMatch
    T: int                       # the example's length (cost decisions only)
    activation: str
    key_masks: list              # (node, invert): keep masks over the keys
    band: Optional[int]
    empty: str                   # local_attention's empty_rows


class _WindowBase(Pass):
    before = ("gdpa",)
    after = ("compskip",)
    add_windows = False

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sites = []
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node.op == "output":
                continue
            if C.as_matmul(node, gm) is not None:
                site = self._try_chain(gm, node)
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

    def _try_chain(self, gm, m2_node):
        """A region of the one attention matcher (:mod:`recopt.graph.attention`) anchored at
        ``P @ v``; everything about it (scale, masks, band width) is read from how the graph
        builds it, never from the example's sizes."""
        region = A.find_region(gm, m2_node)
        if region is None:
            return None
        m1, m2, path = region
        try:
            q_axis = m1.lhs_perm[-2] if m1.lhs_perm is not None else -2
            k_axis = m1.rhs_perm[-1] if m1.rhs_perm is not None else -1    # scores = q @ X: keys on X's last dim
            if not A.same_sequence(m1.lhs, m1.rhs, q_axis=q_axis, k_axis=k_axis, gm=gm):
                raise _Reject("not_self_attention", f"{m1.node.name}: query and key do not come from one "
                              "sequence (cross-attention / pooling); a sliding window applies to "
                              "self-attention only")
            match = A.match_attention(gm, m1, m2, path)
            chain = self._describe(gm, match)
            window, n_global, kind = self._decide(chain)
        except (_Reject, A.Mismatch) as r:
            return self.rejected(m2_node, r.code, r.reason, details={"first_matmul": m1.node.name})
        return self._emit(gm, chain, window, n_global, kind)

    def _describe(self, gm, match: A.AttentionMatch) -> _Chain:
        """What ``local_attention`` needs, or :class:`_Reject` with the reason it cannot run it."""
        plan = match.plan
        if match.rank != 4 or any(len(s) != 4 for s in (match.q_shape, match.k_shape, match.v_shape)):
            raise _Reject("rank", "expected q, k, v of shape [B, H, T, d]")
        if not (match.q_shape[:2] == match.k_shape[:2] == match.v_shape[:2]):
            raise _Reject("layout", f"q, k, v batch/head dims differ ({list(match.q_shape[:2])}, "
                          f"{list(match.k_shape[:2])}, {list(match.v_shape[:2])}): local_attention has no GQA")
        Tq, Tk = match.q_shape[-2], match.k_shape[-2]
        if Tq != Tk:
            raise _Reject("not_self_attention", f"scores of {Tq} queries x {Tk} keys are not square")
        if plan.pre_tensors or plan.post_tensors:
            raise _Reject("unsupported_op", "scores or outputs scaled by a per-row tensor")
        if plan.dropout is not None and (gm.training or plan.dropout[1] is True):
            raise _Reject("dropout_training", "attention dropout is active")
        factors = list(match.mask_factors)
        if plan.biases:
            as_masks = A.bias_mask_factors(gm, match)
            if as_masks is None:
                raise _Reject("unsupported_op", "a score bias that is not an additive mask "
                              "where(keep, 0, -big) is added to the scores")
            factors += as_masks
        act = plan.act if plan.act == R.SOFTMAX else R.canonical_activation(plan.act)
        key_masks, band = [], None
        for f in factors:
            got = f.parts
            if not isinstance(got, MaskParts):
                raise _Reject("mask_not_band", got[1])
            if got.causal or got.q_lengths or got.query_masks:
                raise _Reject("mask_not_band", f"mask {f.node.name} is causal or masks queries: "
                              "not a symmetric band or key padding")
            if (got.key_masks or got.kv_lengths) and got.window is not None:
                raise _Reject("mask_not_band", f"mask {f.node.name} combines a band and key padding in "
                              "one tensor; write them as two masks joined by &")
            if got.key_masks or got.kv_lengths:
                shape = node_shape(f.node)
                if len(shape) >= 3 and shape[-3] != 1:
                    raise _Reject("mask_not_band", f"key mask {f.node.name} of shape {list(shape)} varies "
                                  "per head; local_attention takes one key mask per sample")
                key_masks.append((f.node, f.invert))
            if got.window is not None:
                band = got.window if band is None else min(band, got.window)
        fills = {f.fill for f in factors}
        empty = "zero"
        if act == R.SOFTMAX and factors:
            if any(not fl <= -1e4 for fl in fills):
                raise _Reject("mask_fill", f"softmax scores masked with {sorted(fills)}; expected a large negative")
            inf = {math.isinf(fl) for fl in fills}
            if len(inf) > 1:
                raise _Reject("mask_fill", "scores masked with both -inf and a finite fill")
            if inf.pop():
                if key_masks:
                    # a query row whose keys are all padded is NaN in the model
                    raise _Reject("mask_fill", "-inf masking with key padding: a fully padded row is NaN "
                                  "in the model, local_attention returns 0 there")
            else:
                empty = "uniform"
        elif factors:
            for fl in fills:
                if float(R.act_fwd(torch.tensor([fl]), act).abs().max()) != 0.0:
                    raise _Reject("mask_fill", f"masked scores filled with {fl} and {act}({fl}) != 0")
        return _Chain(match, int(Tq), act, key_masks, band, empty)

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
        match = chain.match
        m1, m2, plan = match.m1, match.m2, match.plan
        with g.inserting_before(m2.node):
            keep = None
            for node, invert in chain.key_masks:
                node = g.call_function(operator.invert, (node,)) if invert else node
                keep = node if keep is None else g.call_function(operator.and_, (keep, node))
            if keep is not None:       # [.., Tk] -> [B | 1, 1, 1, Tk], the key length read at run time
                keep = g.call_method("reshape", (keep, -1, 1, 1, g.call_method("size", (keep, -1))))
            q = _permute(g, m1.lhs, m1.lhs_perm)
            k = _permute(g, match.key, match.k_perm)
            v = _permute(g, m2.rhs, m2.rhs_perm)
            out = g.call_function(local_attention, (q, k, v, window), dict(
                activation=chain.activation, pre_scale=_scalar_expr(g, plan.pre_scale, plan.pre_nodes),
                post_scale=_scalar_expr(g, plan.qk_scale, plan.post_nodes),
                key_keep=keep, n_global=n_global, empty_rows=chain.empty, block=self.config.block))
            if m2.out_perm is not None:
                out = g.call_method("permute", (out, *m2.out_perm))
        out.meta.update({k: v for k, v in m2.node.meta.items() if k in ("tensor_meta", "nn_module_stack",
                                                                        "stack_trace")})
        m2.node.replace_all_uses_with(out)
        B, H, T, d = match.q_shape
        dv = match.v_shape[-1]
        dense = 2 * B * H * T * T * (d + dv)
        after = local_attention_flops(B, H, T, d, dv, window, n_global,
                                      self.config.block)
        what = ("band already in the graph: rewrite is exact" if kind == "exact"
                else f"band |i-j| <= {window} added" + (f", first {n_global} tokens global" if n_global else "")
                + " (architecture change: retrain)")
        return self.rewritten(out, f"{chain.activation} self-attention -> local_attention(window={window}); "
                              f"{what}", flops_before=float(dense), flops_after=float(after),
                              details={"window": window, "n_global": n_global, "T": T, "kind": kind,
                                       "activation": chain.activation, "first_matmul": m1.node.name,
                                       "empty_rows": chain.empty})

    # ------------------------------------------------------------------ recopt.ops.gdpa calls

    def _try_gdpa(self, gm, node):
        q, k = node.args[0], node.args[1]
        if not A.same_sequence(q, k, gm=gm):
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
