"""PFFN re-association: ``s @ (A @ B)ᵀ`` with a per-sample weight built from a shared one
(InterFormer's single-layer PFFN) → ``gdpa(s, B, Aᵀ, "raw")`` when that saves FLOPs."""
from __future__ import annotations

import math

from recopt.graph import canon as C
from recopt.graph.nodes import is_parameter, node_dtype, node_shape
from recopt.ops import gdpa as gdpa_fn

from .emit import _broadcast, _copy_meta, _from4d, _permute, _permuted, _swap, _to4d


def try_reassociate(p, gm, m2: C.MatmulView, erased):
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
    if not p.config.reassociate_pffn:
        return None
    if after >= before:
        return p.rejected(m2.node, "no_flop_gain",
                             f"re-associating would cost {after:.3g} FLOPs vs {before:.3g}",
                             flops_before=before, flops_after=after)
    dts = {node_dtype(m2.lhs), node_dtype(m1.lhs), node_dtype(m1.rhs)}
    if len(dts) != 1:
        return p.rejected(m2.node, "mixed_dtypes", f"dtypes {sorted(map(str, dts))}")
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
    return p.rewritten(
        m2.node, f"pffn_reassociated: s @ ({m1.spelling} product) re-associated; the per-sample "
        f"{m_}x{e_} weight is no longer built", flops_before=before, flops_after=after,
        details={"pattern": "pffn_reassociated", "activation": "raw", "first_matmul": m1.node.name},
    )

# ------------------------------------------------------------------ SDPA calls

