"""SDPA routing: ``F.scaled_dot_product_attention`` calls and ``nn.MultiheadAttention``
modules → GDPA's softmax mode (MHA split into its projections so later passes see the linears)."""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from recopt.graph import canon as C
from recopt.graph.nodes import get_module, is_getitem, node_dtype, node_shape
from recopt.ops import gdpa as gdpa_fn
from recopt.ops.gdpa import gdpa_flops
from recopt.ops.gdpa_softmax import static_note as softmax_note
from recopt.ops.mha_fastpath import fastpath_nan_rows

from .emit import _copy_meta, _training_flag


def try_sdpa(p, gm, node, erased):
    if not p.config.sdpa_calls:
        return None
    q, k, v = node.args[:3]
    mask = C.arg(node, 3, "attn_mask")
    dropout = C.arg(node, 4, "dropout_p", 0.0)
    causal = C.arg(node, 5, "is_causal", False)
    scale = C.arg(node, 6, "scale")
    gqa = node.kwargs.get("enable_gqa", False)
    if causal and mask is not None:
        return p.rejected(node, "unsupported_op", "SDPA with both attn_mask and is_causal")
    if not isinstance(causal, bool):
        return p.rejected(node, "unsupported_op", f"is_causal={causal!r} is not a constant")
    if dropout:
        return p.rejected(node, "sdpa_dropout", f"dropout_p={dropout}: left as SDPA")
    shapes = [node_shape(t) for t in (q, k, v)]
    if any(s is None or len(s) != 4 for s in shapes):
        return p.rejected(node, "rank", "SDPA call on non-4-D tensors: left as is")
    if not isinstance(scale, (int, float, type(None))):
        return p.rejected(node, "unsupported_op", "non-constant SDPA scale")
    if shapes[1][1] != shapes[0][1] and not gqa:
        return p.rejected(node, "unsupported_op", "head counts differ without enable_gqa")
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
    return p.rewritten(out, "sdpa: F.scaled_dot_product_attention routed through gdpa(softmax)",
                          flops_before=fl, flops_after=fl,
                          details={"pattern": "sdpa", "activation": "softmax", "kernel": softmax_note()})

# ------------------------------------------------------------------ nn.MultiheadAttention


def try_mha(p, gm, node, erased):
    if not p.config.mha_modules:
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
    if mod.training and mod.dropout > 0:
        # MHA draws its dropout inside SDPA: that random stream cannot be reproduced
        problems.append(f"dropout {mod.dropout} in training mode")
    if problems:
        return p.rejected(node, "mha_options", "nn.MultiheadAttention with " + ", ".join(problems))
    for u in node.users:
        if not is_getitem(u):
            return p.rejected(node, "mha_options", f"output used directly by {u.name}")
        if u.args[1] == 1 and len(u.users) > 0:
            return p.rejected(node, "attention_weights_used",
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
        if mask is not None and not need_weights and _mha_fastpath_static(mod, query, key, value, kpm, attn_mask):
            # eval without grad: the module's fused path gives NaN where every key is masked
            tensors = (query, g.get_attr(f"{path}.in_proj_weight"), g.get_attr(f"{path}.in_proj_bias"), ow, ob)
            out = g.call_function(fastpath_nan_rows, (out, kpm, attn_mask, H, True, _training_flag(g), True,
                                                      tensors))
    for u in list(node.users):
        if u.args[1] == 0:
            _copy_meta(out, u)
            u.replace_all_uses_with(out)
        g.erase_node(u)  # the weights output has no users (checked above)
    g.erase_node(node)
    erased.add(node)
    return p.rewritten(out, f"mha: nn.MultiheadAttention {path} split into projections + gdpa(softmax)",
                          module_path=path, details={"pattern": "mha", "activation": "softmax",
                                                     "masked_rows": kwargs.get("masked_rows", "zero"),
                                                     "kernel": softmax_note(dropout=mod.dropout > 0)})



def _mha_fastpath_static(mod: nn.MultiheadAttention, query, key, value, kpm, attn_mask) -> bool:
    """The configuration half of ``nn.MultiheadAttention``'s fast-path conditions (the run-time
    half is checked by :func:`recopt.ops.mha_fastpath.fastpath_taken`)."""
    masks_bool = all(m is None or node_dtype(m) in (torch.bool, None) for m in (kpm, attn_mask))
    return (query is key and key is value and masks_bool and mod.batch_first and mod.num_heads % 2 == 0
            and mod.bias_k is None and mod.bias_v is None and not mod.add_zero_attn
            and mod._qkv_same_embed_dim and mod.in_proj_bias is not None
            and len(node_shape(query) or ()) == 3)


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


