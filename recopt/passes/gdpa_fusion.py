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
- ``F.scaled_dot_product_attention`` calls (``is_causal`` included) → GDPA's
  softmax mode. Encoders and ``nn.MultiheadAttention`` are opened first by
  the ``decompose_attention`` pass (:mod:`recopt.passes.gdpa.decompose`) into
  plain ops that reach this pass as SDPA calls or softmax chains.

Every candidate gets a :class:`~recopt.passes.base.Site`; a rejected one
carries a reason code (``REASONS`` lists them).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch.fx as fx

from recopt.graph import attention as A
from recopt.graph import canon as C
from recopt.graph.nodes import erase_absorbed, node_dtype, node_shape, tidy_graph
from recopt.ops import gdpa as gdpa_fn
from recopt.ops import gdpa_ref as R
from recopt.ops.gdpa import backward_note, gdpa_flops, reference_reason
from recopt.ops.gdpa_softmax import static_note as softmax_note

from .gdpa import cpu, pffn, sdpa
from .gdpa.emit import (
    _broadcast, _combine_softmax_mask, _copy_meta, _from4d, _key_mask_column, _lengths_expr,
    _mask_shape, _materialize, _permute, _permuted, _rebuild_shape_sources, _scalar_expr, _scaled_bias,
    _to4d, _training_flag, _zero_bias_where_masked,
)
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
    cpu.NOT_FASTER: "a target with no fused GDPA kernel (the CPU): the call would run the same ops "
                    "as the model plus its own overhead (GDPAConfig.cpu_sites='all' forces it)",
}


@dataclass
class GDPAConfig(PassConfig):
    """Options of the GDPA fusion pass.

    ``attention``: pointwise-activation attention and PFFN chains (pattern A).
    ``softmax``: manual softmax attention → GDPA softmax mode (SDPA).
    ``sdpa_calls``: rewrite ``F.scaled_dot_product_attention`` calls
    (``nn.MultiheadAttention`` reaches this pass opened by ``decompose_attention``;
    ``DecomposeConfig.mha`` switches that off). ``reassociate_pffn``: pattern C.
    ``convert_nan_masks``: treat -inf masking before silu/gelu/hardswish as
    zero masking (the original computes NaN there; off by default so the
    output never silently changes). ``min_q_len``/``min_kv_len``: skip
    smaller sites. ``cpu_sites``: on a target without a fused GDPA kernel
    (the CPU), ``"faster"`` rewrites only sites that remove FLOPs (pattern C)
    and leaves the rest with reason ``not_faster_on_target``
    (:mod:`recopt.passes.gdpa.cpu`); ``"all"`` rewrites every site there too.
    """

    attention: bool = True
    softmax: bool = True
    sdpa_calls: bool = True
    reassociate_pffn: bool = True
    convert_nan_masks: bool = False
    min_q_len: int = 1
    min_kv_len: int = 1
    cpu_sites: str = "faster"

    def __post_init__(self):
        if self.cpu_sites not in cpu.CPU_SITES:
            raise ValueError(f"GDPAConfig.cpu_sites must be one of {cpu.CPU_SITES}, got {self.cpu_sites!r}")




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
        self._target = ctx.target
        for node in list(gm.graph.nodes):
            if node in erased or node.graph is not gm.graph or getattr(node, "_erased", False):
                continue
            kind = C.op_kind(node, gm)
            site = None
            if kind in ("matmul", "einsum"):
                site = self._try_matmul(gm, node, erased)
            elif kind == "sdpa":
                skip = cpu.leave_alone(self.config, ctx.target, kind) if self.config.sdpa_calls else None
                if skip is not None:
                    site = self.rejected(node, cpu.NOT_FASTER, skip)
                else:
                    site = sdpa.try_sdpa(self, gm, node, erased)
            if site is not None:
                sites.append(site)
        tidy_graph(gm)
        return PassResult(gm, sites)

    # ------------------------------------------------------------------ pattern A / C

    def _try_matmul(self, gm, m2_node, erased):
        region = A.find_region(gm, m2_node)
        if region is None:
            m2 = C.as_matmul(m2_node, gm)
            if m2 is not None and self.config.reassociate_pffn:
                return pffn.try_reassociate(self, gm, m2, erased)
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
        skip = cpu.leave_alone(self.config, getattr(self, "_target", None), "attention")
        if skip is not None:
            return self.rejected(m2_node, cpu.NOT_FASTER, skip,
                                 details={"first_matmul": m1.node.name, "activation": act,
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

        _rebuild_shape_sources(g, m1, [m1.node] + list(match.path))
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
                kwargs["bias"] = _zero_bias_where_masked(g, _combine_softmax_mask(g, biases, rank, nb),
                                                         list(q_masks) + list(k_masks), rank, nb)
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
        erase_absorbed(g, m2.node)   # the chain's dropout now draws inside gdpa
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
            "kernel": (softmax_note(dropout=plan.dropout is not None) if plan.act == R.SOFTMAX
                       else reference_reason(bool(mp["causal"]), plan.biases or None) or "default backend"),
            **({} if plan.act == R.SOFTMAX else {"backward": backward_note()}),
            "first_matmul": m1.node.name, "masks_folded": len(q_masks) + len(k_masks) + len(mp["kv_len"]) + len(mp["q_len"]),
            "lengths_from_masks": len(mp["kv_len"]) + len(mp["q_len"]),
        }

    # ------------------------------------------------------------------ pattern C


def _pattern_name(plan: A.AttentionPlan, nb: int, Tq: int, Tk: int) -> str:
    if plan.act == R.SOFTMAX:
        return "softmax_attention"
    if plan.act == "silu" and plan.qk_scale != 1.0:
        return "hstu_attention"
    if nb <= 1 and Tq != Tk:
        return "pffn"
    return "attention"
