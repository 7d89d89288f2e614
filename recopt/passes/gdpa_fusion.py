"""GDPA fusion: rewrite attention-like matmul chains in an fx graph into one GDPA call.

Patterns (docs/gdpa.md has the user-facing list):

- **A, attention** — described by the one attention matcher,
  :func:`recopt.graph.attention.match_attention` (scores, scale, bias, mask
  read symbolically, normaliser, dropout, layout), which raises a reason when
  the region is not expressible; this pass only emits the call, and never
  rejects after emitting. HSTU's ``silu(q kᵀ α + rab) / N * mask`` and the
  two-layer PFFN ``act(S W1ᵀ) W2`` (one head; never split into heads) are
  instances.
- **C, re-associated PFFN** — ``s @ (A @ B)ᵀ`` where ``A @ B`` builds a
  per-sample weight from a shared one (InterFormer's single-layer PFFN):
  rewritten to ``gdpa(s, B, Aᵀ, "raw")`` when that saves FLOPs; the d×d
  weight is never built.
- ``F.scaled_dot_product_attention`` calls (``is_causal`` included) and
  ``nn.MultiheadAttention`` modules (masks, either ``batch_first``, dropout
  following the graph's mode) → GDPA's softmax mode, MHA split into its
  projections so later passes see the linears. Encoders are opened first by
  the ``decompose_attention`` pass (:mod:`recopt.passes.gdpa.decompose`).

Every candidate gets a :class:`~recopt.passes.base.Site`; a rejected one
carries a reason code (``REASONS`` lists them).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from recopt.graph import attention as A
from recopt.graph import canon as C
from recopt.graph.nodes import get_module, is_getitem, is_parameter, node_dtype, node_shape
from recopt.ops import gdpa as gdpa_fn
from recopt.ops import gdpa_ref as R
from recopt.ops.gdpa import gdpa_flops, reference_reason

from .base import Pass, PassConfig, PassContext, PassResult, Semantics
from .registry import register_pass

# Stable reason codes of rejected sites (tests and tooling read these).
REASONS = {
    "reduction_between_matmuls": "a reduction (sum, softmax on another axis, norm, ...) sits between the matmuls",
    "score_used_twice": "an intermediate between the matmuls has another user",
    "unsupported_op": "an op between the matmuls that GDPA cannot express",
    "key_not_transposed": "the key operand is a permutation that does not contract over the key's feature (last) dim",
    "activation_unsupported": "activation outside GDPA's set",
    "two_activations": "more than one activation between the matmuls",
    "mask_fills_differ": "softmax scores masked with both -inf and a finite fill",
    "neg_inf_mask_nan": "-inf masking before an activation with act(-inf) = NaN (silu, gelu, hardswish)",
    "mask_fill_nonzero": "masked scores are filled with a value whose activation is not 0",
    "mask_after_softmax": "a mask applied after softmax (no renormalisation)",
    "zero_mask_before_softmax": "scores zeroed (not -inf) before softmax",
    "mask_not_separable": "a query x key mask that is not causal, a band, lengths or a key/query mask",
    "mask_layout": "a mask or tensor scale applied in a permuted/reshaped layout",
    "score_bias": "a score bias added after a mask, or a constant bias",
    "score_scaled_by_tensor": "scores multiplied by a tensor that varies along the keys",
    "dropout_training": "dropout before the activation, twice, or with non-constant p/training",
    "softmax_wrong_dim": "softmax over an axis other than the keys",
    "layout": "the second matmul does not contract over the keys of the first",
    "rank": "operand rank outside 2..4",
    "mixed_dtypes": "q, k, v have different dtypes",
    "shape_unknown": "no shape metadata (run ShapeProp / capture with example inputs)",
    "disabled": "pattern switched off in GDPAConfig",
    "too_small": "sizes below GDPAConfig minimums",
    "no_flop_gain": "re-association would not reduce FLOPs",
    "sdpa_dropout": "SDPA with dropout_p > 0",
    "mha_options": "nn.MultiheadAttention options the rewrite does not cover",
    "attention_weights_used": "the attention weights output of nn.MultiheadAttention is used",
}


@dataclass
class GDPAConfig(PassConfig):
    """Options of the GDPA fusion pass.

    ``attention``: pointwise-activation attention and PFFN chains (pattern A).
    ``softmax``: manual softmax attention → GDPA softmax mode (SDPA).
    ``sdpa_calls`` / ``mha_modules``: rewrite ``F.scaled_dot_product_attention``
    calls / ``nn.MultiheadAttention`` modules. ``reassociate_pffn``: pattern C.
    ``convert_nan_masks``: treat -inf masking before silu/gelu/hardswish as
    zero masking (the original computes NaN there; off by default so the
    output never silently changes). ``min_q_len``/``min_kv_len``: skip
    smaller sites.
    """

    attention: bool = True
    softmax: bool = True
    sdpa_calls: bool = True
    mha_modules: bool = True
    reassociate_pffn: bool = True
    convert_nan_masks: bool = False
    min_q_len: int = 1
    min_kv_len: int = 1




@register_pass
class GDPAFusion(Pass):
    """Rewrite attention, HSTU attention and personalized FFNs into GDPA."""

    name = "gdpa"
    semantics = Semantics.EXACT
    config_cls = GDPAConfig
    default_targets = ("*",)
    description = "fuse non-softmax attention / PFFN matmul chains into one GDPA op"

    # ------------------------------------------------------------------ driver

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sites = []
        erased: set = set()
        for node in list(gm.graph.nodes):
            if node in erased or node.graph is not gm.graph:
                continue
            kind = C.op_kind(node, gm)
            site = None
            if kind in ("matmul", "einsum"):
                site = self._try_matmul(gm, node, erased)
            elif kind == "sdpa":
                site = self._try_sdpa(gm, node, erased)
            elif kind == "mha":
                site = self._try_mha(gm, node, erased)
            if site is not None:
                sites.append(site)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, sites)

    # ------------------------------------------------------------------ pattern A / C

    def _try_matmul(self, gm, m2_node, erased):
        region = A.find_region(gm, m2_node)
        if region is None:
            m2 = C.as_matmul(m2_node, gm)
            if m2 is not None and self.config.reassociate_pffn:
                return self._try_reassociate(gm, m2, erased)
            return None
        m1, m2, path = region
        try:
            match = A.match_attention(gm, m1, m2, path, convert_nan_masks=self.config.convert_nan_masks)
            act = match.plan.act
            if act == R.SOFTMAX and not self.config.softmax:
                raise A.Mismatch("disabled", "softmax attention fusion is off (GDPAConfig.softmax)")
            if act != R.SOFTMAX and not self.config.attention:
                raise A.Mismatch("disabled", "attention fusion is off (GDPAConfig.attention)")
            Tq, Tk = match.q_shape[-2], match.v_shape[-2]
            if Tq < self.config.min_q_len or Tk < self.config.min_kv_len:
                raise A.Mismatch("too_small", f"Tq={Tq}, Tk={Tk} below the configured minimum")
        except A.Mismatch as r:
            return self.rejected(m2_node, r.code, r.reason,
                                 details={"first_matmul": m1.node.name,
                                          "chain": [n.name for n in path]})
        info = self._emit_attention(gm, match)
        erased.add(m2_node)
        return self.rewritten(m2_node, info.pop("reason"), flops_before=info["flops"],
                              flops_after=info["flops"], details=info)

    # ------------------------------------------------------------------ emission

    def _emit_attention(self, gm, match: "A.AttentionMatch") -> dict:
        """Emit the gdpa call for a match. Never rejects: every check is in the matcher."""
        g = gm.graph
        m1, m2, plan, mp = match.m1, match.m2, match.plan, match.masks
        base, k_perm, rank = match.key, match.k_perm, match.rank
        q_shape = _permuted(node_shape(m1.lhs), m1.lhs_perm)
        k_shape = _permuted(node_shape(base), k_perm)
        v_shape = _permuted(node_shape(m2.rhs), m2.rhs_perm)
        Tq, d = q_shape[-2:]
        Tk, dv = v_shape[-2:]
        window, q_masks, k_masks, attn_mask_parts = mp["window"], mp["q_masks"], mp["k_masks"], \
            mp["attn_mask_parts"]

        with g.inserting_before(m2.node):
            q = _permute(g, m1.lhs, m1.lhs_perm)
            k = _permute(g, base, k_perm)
            v = _permute(g, m2.rhs, m2.rhs_perm)
            for t, op in plan.pre_tensors:   # constant along the keys: scales q's rows
                q = g.call_function(operator.mul if op == "mul" else operator.truediv, (q, t))
                q_shape = _broadcast(q_shape, node_shape(t))
            for f in q_masks:  # [.., Tq, 1] row masks: zero query rows
                q = g.call_function(operator.mul, (q, _materialize(g, f)))
                q_shape = _broadcast(q_shape, _mask_shape(f))
            for f in k_masks:  # [.., 1, Tk] key masks: zero key rows (score = 0 exactly)
                col, col_shape = _key_mask_column(g, f)
                k = g.call_function(operator.mul, (k, col))
                k_shape = _broadcast(k_shape, col_shape)
            nb = match.nb
            q, k, v = (_to4d(g, t, len(s) - 2, nb) for t, s in ((q, q_shape), (k, k_shape), (v, v_shape)))
            kwargs = dict(activation=plan.act,
                          qk_scale=_scalar_expr(g, plan.qk_scale, plan.post_nodes),
                          pre_scale=_scalar_expr(g, plan.pre_scale, plan.pre_nodes),
                          window=window)
            biases = [("bias", _scaled_bias(g, b, plan), b.sign) for b in plan.biases]
            if plan.act == R.SOFTMAX:
                parts = (attn_mask_parts or []) + biases
                if parts:
                    kwargs["attn_mask"] = _combine_softmax_mask(g, parts, rank, nb)
                if plan.masked_rows != "zero":
                    kwargs["masked_rows"] = plan.masked_rows
            elif biases:
                kwargs["bias"] = _combine_softmax_mask(g, biases, rank, nb)
            if mp["causal"]:
                kwargs["causal"] = True
            if plan.dropout is not None:
                p, training = plan.dropout
                kwargs["dropout_p"] = p
                kwargs["training"] = _training_flag(g) if training == "graph" else True
            for key, lens in (("kv_lengths", mp["kv_len"]), ("q_lengths", mp["q_len"])):
                if lens:
                    kwargs[key] = _lengths_expr(g, lens)
            out = g.call_function(gdpa_fn, (q, k, v), kwargs)
            out = _from4d(g, out, nb)
            for t, op in plan.post_tensors:  # constant along the keys: scales output rows
                out = g.call_function(operator.mul if op == "mul" else operator.truediv, (out, t))
            if m2.out_perm is not None:
                out = g.call_method("permute", (out, *m2.out_perm))
            want = node_dtype(m2.node)
            if want is not None and want != node_dtype(m1.lhs):
                out = g.call_method("to", (out, want))
        _copy_meta(out, m2.node)
        m2.node.replace_all_uses_with(out)
        g.erase_node(m2.node)
        batch = math.prod(_broadcast(q_shape[:-2], k_shape[:-2], v_shape[:-2]))
        flops = gdpa_flops(batch, 1, Tq, Tk, d, dv)
        kind = _pattern_name(plan, nb, Tq, Tk)
        return {
            "reason": f"{kind}: {m1.spelling} -> {plan.act} -> {m2.spelling} fused into gdpa"
                      + (f" ({'; '.join(x for x in plan.notes if x != 'act')})" if len(plan.notes) > 1 else ""),
            "pattern": kind, "activation": plan.act, "pre_scale": plan.pre_scale,
            "qk_scale": plan.qk_scale, "window": window, "Tq": Tq, "Tk": Tk, "d": d, "dv": dv,
            "batch": batch, "batch_dims": nb, "flops": flops, "causal": bool(mp["causal"]),
            "bias": bool(plan.biases), "masked_rows": plan.masked_rows,
            "kernel": (reference_reason(bool(mp["causal"]), plan.biases or None)
                       if plan.act != R.SOFTMAX else None) or "default backend",
            "first_matmul": m1.node.name, "masks_folded": len(q_masks) + len(k_masks) + len(mp["kv_len"]) + len(mp["q_len"]),
            "lengths_from_masks": len(mp["kv_len"]) + len(mp["q_len"]),
        }

    # ------------------------------------------------------------------ pattern C

    def _try_reassociate(self, gm, m2: C.MatmulView, erased):
        base, perm, _ = C.strip_permutes(m2.rhs, gm)
        m1 = C.as_matmul(base, gm)
        if m1 is None or perm is None or len(base.users) != 1:
            return None
        rank = len(perm)
        xp = C.compose(perm, m2.rhs_perm) if m2.rhs_perm else perm   # X = C1_actual.permute(xp)
        cp = C.compose(m1.out_perm, xp) if m1.out_perm else xp       # X = C1_canon.permute(cp)
        ident, swap = tuple(range(rank)), C.swap_last(rank)
        if cp not in (ident, swap):
            return None
        a_shape = _permuted(node_shape(m1.lhs), m1.lhs_perm)
        b_shape = _permuted(node_shape(m1.rhs), m1.rhs_perm)
        s_shape = _permuted(node_shape(m2.lhs), m2.lhs_perm)
        if None in (a_shape, b_shape, s_shape):
            return None
        # Only a per-sample weight built from a shared one: one side batch-free.
        shared = len(a_shape) == 2 or len(b_shape) == 2 or is_parameter(gm, m1.lhs) or is_parameter(gm, m1.rhs)
        if not shared or rank < 3:
            return None
        Bsz = math.prod(_broadcast(a_shape[:-2], b_shape[:-2], s_shape[:-2]))
        (m_, n_), (_, e_) = a_shape[-2:], b_shape[-2:]
        T = s_shape[-2]
        # C1 = A @ B is [m, e]; s @ C1 (or C1ᵀ) costs T·m·e either way.
        before = 2 * Bsz * (m_ * n_ * e_ + T * m_ * e_)
        after = 2 * Bsz * T * n_ * (m_ + e_)
        if not self.config.reassociate_pffn:
            return None
        if after >= before:
            return self.rejected(m2.node, "no_flop_gain",
                                 f"re-associating would cost {after:.3g} FLOPs vs {before:.3g}",
                                 flops_before=before, flops_after=after)
        dts = {node_dtype(m2.lhs), node_dtype(m1.lhs), node_dtype(m1.rhs)}
        if len(dts) != 1:
            return self.rejected(m2.node, "mixed_dtypes", f"dtypes {sorted(map(str, dts))}")
        g = gm.graph
        with g.inserting_before(m2.node):
            a = _permute(g, m1.lhs, m1.lhs_perm)       # [*, m, n]
            b = _permute(g, m1.rhs, m1.rhs_perm)       # [*, n, e]
            q = _permute(g, m2.lhs, m2.lhs_perm)       # [*, T, din]
            if cp == ident:   # s @ (A B) = (s A) B: k = Aᵀ, v = B
                k, v = g.call_method("transpose", (a, -2, -1)), b
                k_shape, v_shape = _swap(a_shape), b_shape
            else:             # s @ (A B)ᵀ = (s Bᵀ) Aᵀ: k = B, v = Aᵀ
                k, v = b, g.call_method("transpose", (a, -2, -1))
                k_shape, v_shape = b_shape, _swap(a_shape)
            nb = max(len(s_shape), len(k_shape), len(v_shape)) - 2
            if nb > 2:
                return None
            q, k, v = (_to4d(g, t, len(s) - 2, nb) for t, s in ((q, s_shape), (k, k_shape), (v, v_shape)))
            out = g.call_function(gdpa_fn, (q, k, v), dict(activation="raw"))
            out = _from4d(g, out, nb)
            if m2.out_perm is not None:
                out = g.call_method("permute", (out, *m2.out_perm))
        _copy_meta(out, m2.node)
        m2.node.replace_all_uses_with(out)
        g.erase_node(m2.node)
        erased.add(m2.node)
        return self.rewritten(
            m2.node, f"pffn_reassociated: s @ ({m1.spelling} product) re-associated; the per-sample "
            f"{m_}x{e_} weight is no longer built", flops_before=before, flops_after=after,
            details={"pattern": "pffn_reassociated", "activation": "raw", "first_matmul": m1.node.name},
        )

    # ------------------------------------------------------------------ SDPA calls

    def _try_sdpa(self, gm, node, erased):
        if not self.config.sdpa_calls:
            return None
        q, k, v = node.args[:3]
        mask = C.arg(node, 3, "attn_mask")
        dropout = C.arg(node, 4, "dropout_p", 0.0)
        causal = C.arg(node, 5, "is_causal", False)
        scale = C.arg(node, 6, "scale")
        gqa = node.kwargs.get("enable_gqa", False)
        if causal and mask is not None:
            return self.rejected(node, "unsupported_op", "SDPA with both attn_mask and is_causal")
        if not isinstance(causal, bool):
            return self.rejected(node, "unsupported_op", f"is_causal={causal!r} is not a constant")
        if dropout:
            return self.rejected(node, "sdpa_dropout", f"dropout_p={dropout}: left as SDPA")
        shapes = [node_shape(t) for t in (q, k, v)]
        if any(s is None or len(s) != 4 for s in shapes):
            return self.rejected(node, "rank", "SDPA call on non-4-D tensors: left as is")
        if not isinstance(scale, (int, float, type(None))):
            return self.rejected(node, "unsupported_op", "non-constant SDPA scale")
        if shapes[1][1] != shapes[0][1] and not gqa:
            return self.rejected(node, "unsupported_op", "head counts differ without enable_gqa")
        pre = float(scale) if scale is not None else 1.0 / math.sqrt(shapes[0][-1])
        kwargs = dict(activation="softmax", pre_scale=pre)
        if mask is not None:
            kwargs["attn_mask"] = mask
        if causal:
            kwargs["causal"] = True
        g = gm.graph
        with g.inserting_before(node):
            out = g.call_function(gdpa_fn, (q, k, v), kwargs)
        _copy_meta(out, node)
        node.replace_all_uses_with(out)
        g.erase_node(node)
        erased.add(node)
        B, H, Tq, d = shapes[0]
        fl = gdpa_flops(B, H, Tq, shapes[1][2], d, shapes[2][3])
        return self.rewritten(out, "sdpa: F.scaled_dot_product_attention routed through gdpa(softmax)",
                              flops_before=fl, flops_after=fl,
                              details={"pattern": "sdpa", "activation": "softmax"})

    # ------------------------------------------------------------------ nn.MultiheadAttention

    def _try_mha(self, gm, node, erased):
        if not self.config.mha_modules:
            return None
        mod: nn.MultiheadAttention = get_module(gm, node)
        query = node.args[0] if node.args else node.kwargs.get("query")
        key = C.arg(node, 1, "key")
        value = C.arg(node, 2, "value")
        kpm = C.arg(node, 3, "key_padding_mask")
        attn_mask = C.arg(node, 5, "attn_mask")
        need_weights = C.arg(node, 4, "need_weights", True)
        problems = []
        if not isinstance(need_weights, bool):
            problems.append("need_weights that is not a constant")
        if mod.bias_k is not None or mod.add_zero_attn:
            problems.append("bias_k/bias_v or add_zero_attn")
        for name, m in (("key_padding_mask", kpm), ("attn_mask", attn_mask)):
            if m is not None and (not isinstance(m, fx.Node) or node_shape(m) is None):
                problems.append(f"{name} without shape metadata")
        if attn_mask is not None and len(node_shape(attn_mask) or ()) not in (2, 3):
            problems.append("attn_mask that is not [L, S] or [B*heads, L, S]")
        if problems:
            return self.rejected(node, "mha_options", "nn.MultiheadAttention with " + ", ".join(problems))
        for u in node.users:
            if not is_getitem(u):
                return self.rejected(node, "mha_options", f"output used directly by {u.name}")
            if u.args[1] == 1 and len(u.users) > 0:
                return self.rejected(node, "attention_weights_used",
                                     f"attention weights ({u.name}) are used downstream")
        E, H = mod.embed_dim, mod.num_heads
        dh = E // H
        g = gm.graph
        path = str(node.target)
        with g.inserting_before(node):
            if mod._qkv_same_embed_dim:
                w = g.get_attr(f"{path}.in_proj_weight")
                ws = [g.call_function(operator.getitem, (w, slice(i * E, (i + 1) * E))) for i in range(3)]
            else:
                ws = [g.get_attr(f"{path}.{n}") for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]
            if mod.in_proj_bias is not None:
                b = g.get_attr(f"{path}.in_proj_bias")
                bs = [g.call_function(operator.getitem, (b, slice(i * E, (i + 1) * E))) for i in range(3)]
            else:
                bs = [None] * 3
            heads = []
            for x, wi, bi in zip((query, key, value), ws, bs):
                if not mod.batch_first:   # [L, N, E] -> [N, L, E]
                    x = g.call_method("transpose", (x, 0, 1))
                y = g.call_function(F.linear, (x, wi, bi))
                y = g.call_method("unflatten", (y, -1, (H, dh)))
                heads.append(g.call_method("transpose", (y, 1, 2)))
            kwargs = dict(activation="softmax", pre_scale=1.0 / math.sqrt(dh))
            if mod.dropout > 0:   # attention-weight dropout, following the graph's mode
                kwargs["dropout_p"] = float(mod.dropout)
                kwargs["training"] = _training_flag(g)
            mask = _mha_mask(g, kpm, attn_mask, H)
            if mask is not None:
                # MHA turns every mask into -inf. A query row with no key left is
                # NaN when it computes the weights (need_weights=True, its default)
                # and 0 when it calls SDPA (need_weights=False).
                kwargs["attn_mask"] = mask
                kwargs["masked_rows"] = "nan" if need_weights else "zero"
            o = g.call_function(gdpa_fn, tuple(heads), kwargs)
            o = g.call_method("flatten", (g.call_method("transpose", (o, 1, 2)), -2))
            ow = g.get_attr(f"{path}.out_proj.weight")
            ob = g.get_attr(f"{path}.out_proj.bias") if mod.out_proj.bias is not None else None
            out = g.call_function(F.linear, (o, ow, ob))
            if not mod.batch_first:
                out = g.call_method("transpose", (out, 0, 1))
        for u in list(node.users):
            if u.args[1] == 0:
                _copy_meta(out, u)
                u.replace_all_uses_with(out)
            g.erase_node(u)  # the weights output has no users (checked above)
        g.erase_node(node)
        erased.add(node)
        return self.rewritten(out, f"mha: nn.MultiheadAttention {path} split into projections + gdpa(softmax)",
                              module_path=path, details={"pattern": "mha", "activation": "softmax",
                                                         "masked_rows": kwargs.get("masked_rows", "zero")})


def _mha_mask(g, kpm, attn_mask, heads: int):
    """MHA's key_padding_mask ``[B, S]`` and attn_mask ``[L, S]``/``[B*H, L, S]`` as one
    SDPA-convention mask over ``[B, H, L, S]``: bool keep-mask, or additive float when
    either is float (bool parts then become -inf, as MHA does)."""
    keep, add = None, None
    for m, kind in ((kpm, "kpm"), (attn_mask, "attn")):
        if m is None:
            continue
        if kind == "kpm":
            m = g.call_method("unsqueeze", (g.call_method("unsqueeze", (m, 1)), 1))   # [B,1,1,S]
        elif len(node_shape(attn_mask)) == 3:
            m = g.call_method("unflatten", (m, 0, (-1, heads)))                      # [B,H,L,S]
        is_bool = node_dtype(kpm if kind == "kpm" else attn_mask) in (torch.bool, None)
        if is_bool:
            k = g.call_function(operator.invert, (m,))
            keep = k if keep is None else g.call_function(operator.and_, (keep, k))
        else:
            add = m if add is None else g.call_function(operator.add, (add, m))
    if add is None:
        return keep
    if keep is not None:
        add = g.call_function(torch.masked_fill, (add, g.call_function(operator.invert, (keep,)),
                                                  float("-inf")))
    return add


# ---------------------------------------------------------------------------- helpers


def _scalar_expr(g, value: float, nodes: list):
    """``value`` times/divided by shape-derived scalar nodes, as a graph value."""
    out = value
    for node, op in nodes:
        out = g.call_function(operator.mul if op == "mul" else operator.truediv, (out, node))
    return out


def _permuted(shape, perm):
    if shape is None:
        return None
    return tuple(shape[p] for p in perm) if perm is not None else tuple(shape)


def _swap(shape):
    return tuple(shape[:-2]) + (shape[-1], shape[-2])


def _broadcast(*shapes):
    return tuple(torch.broadcast_shapes(*[torch.Size(s) for s in shapes]))


def _permute(g: fx.Graph, node, perm):
    if perm is None or C.is_identity(perm):
        return node
    return g.call_method("permute", (node, *perm))


def _materialize(g, f):
    if isinstance(f, A.Negated):
        return g.call_function(operator.invert, (f.node,))
    return f


def _mask_shape(f) -> tuple:
    return tuple(node_shape(f.node if isinstance(f, A.Negated) else f))


def _key_mask_column(g, f):
    """A key mask over [*batch, 1, Tk] (or [Tk]) as a column [*batch, Tk, 1] to multiply k."""
    shape = _mask_shape(f)
    m = _materialize(g, f)
    if len(shape) >= 2:
        m = g.call_function(torch.select, (m, -2, 0))
        shape = shape[:-2] + shape[-1:]
    return g.call_method("unsqueeze", (m, -1)), shape + (1,)


def _combine_softmax_mask(g, parts, rank: int, nb: int):
    """One SDPA attn_mask (bool keep or additive float) in [B, H, Tq, Tk] layout."""
    keep, bias = None, None
    for kind, node, flag in parts:
        r = len(node_shape(node) or ())
        for _ in range(rank - r):
            node = g.call_method("unsqueeze", (node, 0))
        node = _to4d(g, node, rank - 2, nb)
        if kind == "keep":
            k = g.call_function(operator.invert, (node,)) if flag else node
            keep = k if keep is None else g.call_function(operator.and_, (keep, k))
        else:
            b = node if flag > 0 else g.call_function(operator.neg, (node,))
            bias = b if bias is None else g.call_function(operator.add, (bias, b))
    if bias is None:
        return keep
    if keep is not None:
        bias = g.call_function(torch.masked_fill, (bias, g.call_function(operator.invert, (keep,)), float("-inf")))
    return bias


def _training_flag(g: fx.Graph) -> fx.Node:
    """``self.training`` of the graph module, read at run time (so ``.train()``/``.eval()``
    of the optimized model switch dropout on and off as in the original)."""
    return g.create_node("get_attr", "training")


def _scaled_bias(g, b, plan: A.AttentionPlan):
    """The bias as GDPA adds it: after the whole pre-activation scale.

    ``(s + b) * c`` is ``c*s + c*b``: scale factors applied after the bias
    scale it too (constants and shape-derived scalars alike)."""
    node = b.node
    ratio = plan.pre_scale / b.pre_scale_at
    if ratio != 1.0:
        node = g.call_function(operator.mul, (node, ratio))
    for sc, op in plan.pre_nodes[b.pre_nodes_at:]:
        node = g.call_function(operator.mul if op == "mul" else operator.truediv, (node, sc))
    if node is not b.node:
        _copy_meta(node, b.node)   # same shape: _combine_softmax_mask reads its rank
    return node


def _lengths_expr(g, lens: list):
    """``[B]`` lengths from ``(node, offset)`` parts (the tightest when several)."""
    out = None
    for node, off in lens:
        x = g.call_method("reshape", (node, -1))
        if off:
            x = g.call_function(operator.add, (x, off))
        out = x if out is None else g.call_function(torch.minimum, (out, x))
    return out


def _to4d(g, node, nbatch: int, nb: int):
    """Give an operand with ``nbatch`` batch dims the [B, H, T, d] layout (nb = target batch rank)."""
    for _ in range(nb - nbatch):
        node = g.call_method("unsqueeze", (node, 0))
    if nb == 1:
        node = g.call_method("unsqueeze", (node, 1))
    elif nb == 0:
        node = g.call_method("unsqueeze", (g.call_method("unsqueeze", (node, 0)), 0))
    return node


def _from4d(g, node, nb: int):
    if nb == 1:
        return g.call_method("squeeze", (node, 1))
    if nb == 0:
        return g.call_method("squeeze", (g.call_method("squeeze", (node, 0)), 0))
    return node


def _copy_meta(new: fx.Node, old: fx.Node):
    for key in ("tensor_meta", "val", "nn_module_stack", "stack_trace"):
        if key in old.meta:
            new.meta[key] = old.meta[key]


def _pattern_name(plan: A.AttentionPlan, nb: int, Tq: int, Tk: int) -> str:
    if plan.act == R.SOFTMAX:
        return "softmax_attention"
    if plan.act == "silu" and plan.qk_scale != 1.0:
        return "hstu_attention"
    if nb <= 1 and Tq != Tk:
        return "pffn"
    return "attention"
