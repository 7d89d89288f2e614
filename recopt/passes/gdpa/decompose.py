"""decompose_attention: open ``nn.TransformerEncoder(Layer)`` and ``nn.MultiheadAttention`` leaves.

Symbolic tracing keeps ``torch.nn`` modules as opaque leaves, so the attention
inside an encoder was never a candidate of any pass. This canonicalisation
pass runs first and replaces each encoder (layer) call by the plain ops of
its documented computation — ``self_attn`` (an ``nn.MultiheadAttention``
call that the ``gdpa`` pass then fuses), the norms, the feed-forward block
and the dropout modules — traced from :func:`encoder_layer` below. Both
``norm_first`` settings are covered. The dropout modules stay modules, so
they follow ``.train()`` / ``.eval()`` at run time exactly as in the layer.

Only the exact classes are opened (a subclass may override ``forward``).
Numerics: the layer's own "fast path" (eval, no grad) is a fused kernel of
the same math; outputs agree to float tolerance except in two places, both
reproduced at run time by :mod:`recopt.ops.mha_fastpath` under the module's
own conditions: a query row with every key masked is NaN there (0 in the
documented math), and ``nn.TransformerEncoder``'s nested-tensor path returns
0 at padded positions (``nested_tensor_padding`` is reported only for a float
padding mask).

On a target without a fused GDPA kernel (the CPU) encoders stay closed with
``not_faster_on_target`` (:mod:`recopt.passes.gdpa.cpu`) unless
``cpu_sites="all"``.


Every ``nn.MultiheadAttention`` call (those opened from encoders included)
then becomes the plain ops of ``F.multi_head_attention_forward``
(:func:`mha_forward`): in-projection, heads, the attention core and the
out-projection. The core is one ``F.scaled_dot_product_attention`` call when
the weights are not asked for (``need_weights=False``) — the ``gdpa`` pass
routes it — and ``baddbmm → softmax → dropout → bmm`` when they are, which
the one attention matcher fuses; when the weights output is used it is
computed exactly as the module does (averaged over heads or not). Dropout
reads the graph's ``self.training`` at run time and draws the module's
random stream (same call, same shapes). A fully masked query row is what the
module gives: NaN with weights; without weights 0 from SDPA, and NaN where the
module would take its eval fast path (``torch._native_multi_head_attention``:
eval, no grad, batched self-attention, ...), reproduced at run time by
:func:`recopt.ops.mha_fastpath.fastpath_nan_rows`.

Reason codes: ``encoder_subclass``, ``encoder_options``, ``nested_tensor_padding``,
``mha_subclass``, ``mha_options``, ``not_faster_on_target`` (encoders and
``nn.MultiheadAttention`` alike stay modules on a target without a fused GDPA kernel).
"""
from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from recopt.graph.canon import arg
from recopt.graph.nodes import get_module, node_dtype, node_shape, tidy_graph
from recopt.ops.mha_fastpath import fastpath_nan_rows, nested_fastpath_zero_pad

from . import cpu as _cpu
from ..base import Pass, PassConfig, PassContext, PassResult, Semantics
from ..registry import register_pass

# one call in the traced graph: its run-time checks must run at run time, not be traced through
fx.wrap("fastpath_nan_rows")
fx.wrap("nested_fastpath_zero_pad")

REASONS = {
    "encoder_subclass": "a subclass of nn.TransformerEncoder(Layer) (its forward may differ)",
    "encoder_options": "an encoder call whose options are not constants",
    "nested_tensor_padding": "nn.TransformerEncoder that may take its nested-tensor fast path "
                             "(outputs 0 at padded positions)",
    "mha_subclass": "a subclass of nn.MultiheadAttention (its forward may differ)",
    "mha_options": "nn.MultiheadAttention options the decomposition does not cover "
                   "(add_bias_kv, add_zero_attn, unbatched input, non-constant flags, is_causal without attn_mask)",
    _cpu.NOT_FASTER: "a target with no fused GDPA kernel (the CPU): the layer's own fused kernel is "
                     "faster than its opened ops (DecomposeConfig.cpu_sites='all' opens it)",
}


def _layer_fastpath_static(layer: nn.TransformerEncoderLayer) -> bool:
    """The configuration half of ``nn.TransformerEncoderLayer``'s fast-path conditions."""
    sa = layer.self_attn
    return bool(sa.batch_first and sa.in_proj_bias is not None and sa._qkv_same_embed_dim
                and layer.activation_relu_or_gelu and layer.norm1.eps == layer.norm2.eps
                and sa.num_heads % 2 == 0)


def encoder_layer(layer: nn.TransformerEncoderLayer, src, src_mask, key_padding_mask, training=False):
    """``nn.TransformerEncoderLayer.forward`` as plain ops on its submodules.

    ``training`` is the graph's own ``self.training`` (read at run time): in eval without grad the
    layer's fused path returns NaN for a query row with every key masked, reproduced by
    :func:`recopt.ops.mha_fastpath.fastpath_nan_rows`."""

    def sa_block(x):
        y = layer.self_attn(x, x, x, attn_mask=src_mask, key_padding_mask=key_padding_mask,
                            need_weights=False)[0]
        if src_mask is not None or key_padding_mask is not None:
            sa = layer.self_attn
            tensors = (src, sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight, sa.out_proj.bias,
                       layer.norm1.weight, layer.norm1.bias, layer.norm2.weight, layer.norm2.bias,
                       layer.linear1.weight, layer.linear1.bias, layer.linear2.weight, layer.linear2.bias)
            y = fastpath_nan_rows(y, key_padding_mask, src_mask, sa.num_heads, sa.batch_first, training,
                                  _layer_fastpath_static(layer), tensors)
        return layer.dropout1(y)

    def ff_block(x):
        return layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(x)))))

    x = src
    if layer.norm_first:
        x = x + sa_block(layer.norm1(x))
        x = x + ff_block(layer.norm2(x))
    else:
        x = layer.norm1(x + sa_block(x))
        x = layer.norm2(x + ff_block(x))
    return x


def encoder(enc: nn.TransformerEncoder, src, mask, key_padding_mask, training=False):
    """``nn.TransformerEncoder.forward`` (documented math) as its layers, then the final norm."""
    x = src
    for layer in enc.layers:
        x = encoder_layer(layer, x, mask, key_padding_mask, training)
    if enc.norm is not None:
        x = enc.norm(x)
    if getattr(enc, "use_nested_tensor", False) and mask is None and key_padding_mask is not None:
        first = enc.layers[0]
        sa = first.self_attn
        tensors = (src, sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight, sa.out_proj.bias,
                   first.norm1.weight, first.norm1.bias, first.norm2.weight, first.norm2.bias,
                   first.linear1.weight, first.linear1.bias, first.linear2.weight, first.linear2.bias)
        x = nested_fastpath_zero_pad(x, src, key_padding_mask, training, getattr(enc, "mask_check", True),
                                     tensors)
    return x


# ----------------------------------------------------------------------------- nn.MultiheadAttention


@dataclass(frozen=True)
class MHACall:
    """The static options of one ``nn.MultiheadAttention`` call (everything the traced ops branch on)."""

    qk_same: bool          # query, key and value are one tensor (one packed in-projection)
    kv_same: bool          # key and value are one tensor
    has_kpm: bool
    kpm_bool: bool
    has_mask: bool
    mask_bool: bool
    mask_3d: bool
    need_weights: bool
    average: bool
    is_causal: bool
    dropout: float
    fast_static: bool = False   # the configuration half of the module's eval fast-path conditions


def _float_mask(mask, bool_mask: bool, dtype):
    """MHA's canonical mask: a bool mask becomes 0 / -inf in the query's dtype; a float one is kept."""
    if not bool_mask:
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))


def _packed(x, w, b, n: int, E: int):
    """One linear for ``n`` projections of the same input, split as torch does (same numbers)."""
    proj = F.linear(x, w, b)
    proj = proj.unflatten(-1, (n, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    return [proj[i] for i in range(n)]


def mha_forward(mod: nn.MultiheadAttention, c: MHACall, query, key, value, kpm, attn_mask, training):
    """``nn.MultiheadAttention.forward`` (its documented, non-fast path) as plain ops.

    Follows ``F.multi_head_attention_forward`` step by step, so outputs,
    gradients, the weights output and the dropout random stream are the
    module's: bool masks become 0/-inf floats; ``is_causal`` without a key
    padding mask and without weights becomes SDPA's ``is_causal``; with
    ``need_weights`` the scores are ``baddbmm(mask, q/sqrt(d), kᵀ)`` →
    softmax → dropout → bmm (a fully masked row is NaN, as in the module);
    without, one ``F.scaled_dot_product_attention`` call. ``training`` is the
    graph's ``self.training`` read at run time (dropout follows the mode).
    Without weights, a call whose configuration allows the module's eval fast
    path (``c.fast_static``) ends in :func:`recopt.ops.mha_fastpath.fastpath_nan_rows`,
    which makes fully masked rows NaN exactly when the module would have taken it.
    """
    kpm0, mask0 = kpm, attn_mask          # as given (fastpath_nan_rows reads them)
    if mod.batch_first:
        query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    dtype = query.dtype
    if c.has_kpm:
        kpm = _float_mask(kpm, c.kpm_bool, dtype)
    if c.has_mask:
        attn_mask = _float_mask(attn_mask, c.mask_bool, dtype)
    tgt_len, bsz, src_len = query.size(0), query.size(1), key.size(0)
    E, H = mod.embed_dim, mod.num_heads
    hd = E // H
    if mod._qkv_same_embed_dim:
        w, b = mod.in_proj_weight, mod.in_proj_bias
        if c.qk_same:
            q, k, v = _packed(query, w, b, 3, E)
        elif c.kv_same:
            w_q, w_kv = w.split([E, E * 2])
            b_q, b_kv = b.split([E, E * 2]) if b is not None else (None, None)
            q = F.linear(query, w_q, b_q)
            k, v = _packed(key, w_kv, b_kv, 2, E)
        else:
            ws = w.chunk(3)
            bs = b.chunk(3) if b is not None else (None, None, None)
            q, k, v = (F.linear(x, wi, bi) for x, wi, bi in zip((query, key, value), ws, bs))
    else:
        b = mod.in_proj_bias
        bs = (b[0:E], b[E:2 * E], b[2 * E:]) if b is not None else (None, None, None)
        q = F.linear(query, mod.q_proj_weight, bs[0])
        k = F.linear(key, mod.k_proj_weight, bs[1])
        v = F.linear(value, mod.v_proj_weight, bs[2])
    is_causal = c.is_causal
    if is_causal and not c.has_kpm and not c.need_weights:
        attn_mask = None
    else:
        if c.has_kpm:
            is_causal = False
        if c.has_mask and not c.mask_3d:
            attn_mask = attn_mask.unsqueeze(0)
    q = q.view(tgt_len, bsz * H, hd).transpose(0, 1)
    k = k.view(src_len, bsz * H, hd).transpose(0, 1)
    v = v.view(src_len, bsz * H, hd).transpose(0, 1)
    if c.has_kpm:
        kpm = kpm.view(bsz, 1, 1, src_len).expand(-1, H, -1, -1).reshape(bsz * H, 1, src_len)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    p = c.dropout
    if c.need_weights:
        q_scaled = q * math.sqrt(1.0 / float(hd))
        if attn_mask is not None:
            w = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            w = torch.bmm(q_scaled, k.transpose(-2, -1))
        w = F.softmax(w, dim=-1)
        if p > 0.0:
            w = F.dropout(w, p=p, training=training)
        out = torch.bmm(w, v)
        out = out.transpose(0, 1).reshape(tgt_len * bsz, E)
        out = F.linear(out, mod.out_proj.weight, mod.out_proj.bias)
        out = out.view(tgt_len, bsz, out.size(1))
        w = w.view(bsz, H, tgt_len, src_len)
        if c.average:
            w = w.mean(dim=1)
    else:
        if attn_mask is not None and (not c.has_kpm or c.kpm_bool) and (not c.has_mask or c.mask_bool):
            # bool masks: SDPA's keep-mask of the same masked set (kept scores are unchanged
            # by adding 0; a row with no key left is 0 either way)
            keep = None if not c.has_kpm else ~kpm0.view(bsz, 1, 1, src_len)
            if c.has_mask:
                m = ~mask0
                m = m.view(1, 1, tgt_len, src_len) if not c.mask_3d else m.view(bsz, H, -1, src_len)
                keep = m if keep is None else keep & m
            attn_mask = keep
        elif attn_mask is not None:
            if c.has_mask and not c.mask_3d and not c.has_kpm:
                attn_mask = attn_mask.unsqueeze(0)        # [1, 1, L, S]
            else:
                attn_mask = attn_mask.view(bsz, H, -1, src_len)
        q = q.view(bsz, H, tgt_len, hd)
        k = k.view(bsz, H, src_len, hd)
        v = v.view(bsz, H, src_len, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, p * training if p > 0.0 else 0.0,
                                             is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, E)
        out = F.linear(out, mod.out_proj.weight, mod.out_proj.bias)
        out = out.view(tgt_len, bsz, out.size(1))
        w = None
    if mod.batch_first:
        out = out.transpose(1, 0)
    if not c.need_weights and c.fast_static and (c.has_kpm or c.has_mask):
        tensors = (query, mod.in_proj_weight, mod.in_proj_bias, mod.out_proj.weight, mod.out_proj.bias)
        out = fastpath_nan_rows(out, kpm0, mask0, H, True, training, True, tensors)
    return out, w


class _Traced(nn.Module):
    """Root for tracing :func:`encoder`/:func:`encoder_layer` on the real submodules."""

    def __init__(self, mod: nn.Module, fn, has_mask: bool, has_kpm: bool):
        super().__init__()
        self.m, self.fn, self.has_mask, self.has_kpm = mod, fn, has_mask, has_kpm

    def forward(self, src, mask, kpm, training):
        return self.fn(self.m, src, mask if self.has_mask else None, kpm if self.has_kpm else None, training)


def _mha_fastpath_static(mod: nn.MultiheadAttention, c: MHACall) -> bool:
    """The configuration half of the conditions under which ``nn.MultiheadAttention`` runs
    ``torch._native_multi_head_attention`` (batched self-attention on one tensor, batch_first,
    even heads, packed biased projections, bool masks); the run-time half (eval, no grad, ...)
    is checked by :func:`recopt.ops.mha_fastpath.fastpath_taken`."""
    masks_bool = (not c.has_kpm or c.kpm_bool) and (not c.has_mask or c.mask_bool)
    return bool(c.qk_same and masks_bool and mod.batch_first and mod.num_heads % 2 == 0
                and mod.bias_k is None and not mod.add_zero_attn and mod._qkv_same_embed_dim
                and mod.in_proj_bias is not None)


class _TracedMHA(nn.Module):
    """Root for tracing :func:`mha_forward` on the real module."""

    def __init__(self, mod: nn.MultiheadAttention, call: MHACall):
        super().__init__()
        self.m, self.call = mod, call

    def forward(self, query, key, value, kpm, mask, training):
        c = self.call
        if c.qk_same:
            key = value = query
        elif c.kv_same:
            value = key
        return mha_forward(self.m, c, query, key, value, kpm if c.has_kpm else None,
                           mask if c.has_mask else None, training)


def _inline(gm: fx.GraphModule, node: fx.Node, sub: fx.Graph, inputs: dict, path: str):
    """Copy ``sub`` (traced on a root whose submodule ``m`` is ``gm``'s ``path``) before
    ``node``; placeholders map through ``inputs`` (a callable for lazily built ones).
    Returns the output value (nodes of ``gm``)."""
    env, out, g = {}, None, gm.graph
    with g.inserting_before(node):
        for n in sub.nodes:
            if n.op == "placeholder":
                val = inputs[n.target]
                env[n] = val() if callable(val) and n.users else (None if callable(val) else val)
            elif n.op == "output":
                out = fx.node.map_arg(n.args[0], lambda x: env[x])
            else:
                new = g.node_copy(n, lambda x: env[x])
                if n.op in ("call_module", "get_attr"):
                    new.target = path + str(n.target)[1:]      # "m.xxx" -> "<path>.xxx"
                new.meta.pop("tensor_meta", None)
                env[n] = new
    return out


@dataclass
class DecomposeConfig(PassConfig):
    """``encoders``: open nn.TransformerEncoder / nn.TransformerEncoderLayer calls;
    ``mha``: open nn.MultiheadAttention calls into projections + SDPA / softmax ops.
    ``cpu_sites``: ``"faster"`` keeps them closed on a target without a fused GDPA
    kernel (the CPU), ``"all"`` opens them there too."""

    encoders: bool = True
    mha: bool = True
    cpu_sites: str = "faster"

    def __post_init__(self):
        if self.cpu_sites not in _cpu.CPU_SITES:
            raise ValueError(f"DecomposeConfig.cpu_sites must be one of {_cpu.CPU_SITES}, got {self.cpu_sites!r}")


@register_pass
class DecomposeAttention(Pass):
    """Replace encoder leaves by their plain ops so attention passes see them."""

    name = "decompose_attention"
    semantics = Semantics.EXACT
    config_cls = DecomposeConfig
    default_targets = ("*",)
    before = ("gdpa", "band_attention", "sliding_window")
    after = ("hsp",)       # HSP replaces whole nn.MultiheadAttention poolers
    description = ("open nn.TransformerEncoder(Layer) leaves into attention + norms + FFN and "
                   "nn.MultiheadAttention into projections + SDPA/softmax (exact)")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sites = []
        if self.config.encoders:
            for node in list(gm.graph.nodes):
                if node.op != "call_module":
                    continue
                mod = get_module(gm, node)
                if not isinstance(mod, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
                    continue
                skip = _cpu.leave_alone(self.config, ctx.target, "encoder")
                if skip is not None:
                    sites.append(self.rejected(node, _cpu.NOT_FASTER, skip))
                elif isinstance(mod, nn.TransformerEncoderLayer):
                    sites.append(self._open(gm, node, mod, encoder_layer, ("src_mask", "src_key_padding_mask")))
                else:
                    sites.append(self._open(gm, node, mod, encoder, ("mask", "src_key_padding_mask")))
        if self.config.mha:
            mhas = [n for n in gm.graph.nodes if n.op == "call_module"
                    and isinstance(get_module(gm, n), nn.MultiheadAttention)]
            skip = _cpu.leave_alone(self.config, ctx.target, "mha") if mhas else None
            if skip is not None:
                sites += [self.rejected(n, _cpu.NOT_FASTER, skip) for n in mhas]
                mhas = []
            if any(node_shape(n.args[0] if n.args else n.kwargs.get("query")) is None for n in mhas) \
                    and ctx.example_inputs is not None:
                # attention opened from an encoder above has no metadata yet
                gm.graph.lint()
                gm.recompile()
                with torch.no_grad():
                    ShapeProp(gm).propagate(*ctx.example_inputs)
            # every call is judged before any is opened: opening one replaces the
            # inputs of the next (metadata-less new nodes)
            plans = [(node, self._plan_mha(gm, node, get_module(gm, node))) for node in mhas]
            for node, plan in plans:
                sites.append(plan if not isinstance(plan, MHACall) else self._open_mha(gm, node, plan))
        if any(s.status == "rewritten" for s in sites):
            tidy_graph(gm)
        return PassResult(gm, sites)

    def _plan_mha(self, gm, node, mod: nn.MultiheadAttention):
        """The call's static options (:class:`MHACall`), or a rejected site."""
        path = str(node.target)
        if type(mod) is not nn.MultiheadAttention:
            return self.rejected(node, "mha_subclass", f"{path} is {type(mod).__name__}: its forward may differ "
                                 "from nn.MultiheadAttention's; left as a module")
        query = node.args[0] if node.args else node.kwargs.get("query")
        key, value = arg(node, 1, "key"), arg(node, 2, "value")
        kpm, attn_mask = arg(node, 3, "key_padding_mask"), arg(node, 5, "attn_mask")
        need_weights = arg(node, 4, "need_weights", True)
        average = arg(node, 6, "average_attn_weights", True)
        is_causal = arg(node, 7, "is_causal", False)
        problems = []
        if mod.bias_k is not None or mod.add_zero_attn:
            problems.append("add_bias_kv / add_zero_attn (extra key and value rows); build it without them "
                            "to fuse")
        for name, flag in (("need_weights", need_weights), ("average_attn_weights", average),
                           ("is_causal", is_causal)):
            if not isinstance(flag, bool):
                problems.append(f"{name}={flag!r} that is not a Python bool")
        if not all(isinstance(x, fx.Node) for x in (query, key, value)):
            problems.append("query/key/value that are not tensors of the graph")
        elif any(len(node_shape(x) or ()) != 3 for x in (query, key, value)):
            problems.append("query/key/value that are not batched 3-D tensors (or have no shape metadata)")
        for name, m, ranks in (("key_padding_mask", kpm, (2,)), ("attn_mask", attn_mask, (2, 3))):
            if m is None:
                continue
            if not isinstance(m, fx.Node) or node_dtype(m) is None:
                problems.append(f"{name} that is not a graph tensor with dtype metadata")
            elif len(node_shape(m) or ()) not in ranks:
                problems.append(f"{name} of rank {len(node_shape(m) or ())} (expected {' or '.join(map(str, ranks))})")
        if is_causal is True and attn_mask is None:
            problems.append("is_causal=True without attn_mask (the module raises)")
        if problems:
            return self.rejected(node, "mha_options", f"nn.MultiheadAttention {path} with " + "; ".join(problems))
        for u in node.users:
            if not (u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1)):
                return self.rejected(node, "mha_options", f"nn.MultiheadAttention {path}: its output tuple is "
                                     f"used as a whole by {u.name}")
        call = MHACall(qk_same=query is key and key is value, kv_same=key is value,
                       has_kpm=kpm is not None, kpm_bool=kpm is not None and node_dtype(kpm) == torch.bool,
                       has_mask=attn_mask is not None,
                       mask_bool=attn_mask is not None and node_dtype(attn_mask) == torch.bool,
                       mask_3d=attn_mask is not None and len(node_shape(attn_mask)) == 3,
                       need_weights=need_weights, average=average, is_causal=is_causal,
                       dropout=float(mod.dropout))
        return dataclasses.replace(call, fast_static=_mha_fastpath_static(mod, call))

    def _open_mha(self, gm, node, call: MHACall):
        """Replace the call by :func:`mha_forward`'s ops (checked by :meth:`_plan_mha`)."""
        path, mod = str(node.target), get_module(gm, node)
        query = node.args[0] if node.args else node.kwargs.get("query")
        key, value = arg(node, 1, "key"), arg(node, 2, "value")
        kpm, attn_mask = arg(node, 3, "key_padding_mask"), arg(node, 5, "attn_mask")
        need_weights = call.need_weights
        weights_used = any(u.args[1] == 1 and u.users for u in node.users)
        sub = fx.Tracer().trace(_TracedMHA(mod, call))
        g = gm.graph
        inputs = {"query": query, "key": key, "value": value, "kpm": kpm, "mask": attn_mask,
                  "training": lambda: g.create_node("get_attr", "training")}
        out, weights = _inline(gm, node, sub, inputs, path)
        for u in list(node.users):
            u.replace_all_uses_with(out if u.args[1] == 0 else weights)
            g.erase_node(u)
        g.erase_node(node)
        core = "softmax(baddbmm) + dropout + bmm" if need_weights else "scaled_dot_product_attention"
        return self.rewritten(out, f"nn.MultiheadAttention {path} opened into in-projection, heads, {core} "
                                   "and out-projection" + (" (attention weights kept: they are used)"
                                                           if weights_used else ""),
                              module_path=path,
                              details={"pattern": "mha", "need_weights": need_weights,
                                       "weights_used": weights_used, "batch_first": bool(mod.batch_first),
                                       "dropout": float(mod.dropout), "is_causal": call.is_causal,
                                       "fast_path_nan_rows": call.fast_static and not need_weights})

    def _open(self, gm, node, mod, fn, mask_names):
        exact = type(mod) is (nn.TransformerEncoderLayer if fn is encoder_layer else nn.TransformerEncoder)
        layers = [mod] if fn is encoder_layer else list(mod.layers)
        if not exact or any(type(m) is not nn.TransformerEncoderLayer for m in layers):
            return self.rejected(node, "encoder_subclass",
                                 f"{node.target} is {type(mod).__name__}: its forward may differ from "
                                 "nn.TransformerEncoder(Layer)'s; left as a leaf")
        src = node.args[0] if node.args else node.kwargs.get("src")
        mask = arg(node, 1, mask_names[0])
        kpm = arg(node, 2, mask_names[1])
        for x in (mask, kpm):
            if x is not None and not isinstance(x, fx.Node):
                return self.rejected(node, "encoder_options", f"{node.target}: a mask that is not a tensor")
        if fn is encoder and kpm is not None and getattr(mod, "use_nested_tensor", False) \
                and node_dtype(kpm) not in (torch.bool, None):
            return self.rejected(node, "nested_tensor_padding",
                                 f"{node.target} was built with enable_nested_tensor=True and gets a "
                                 "float key padding mask: in eval without grad its fast path returns 0 at "
                                 "padded positions; pass a bool mask or build it with enable_nested_tensor=False")
        sub = fx.Tracer().trace(_Traced(mod, fn, mask is not None, kpm is not None))
        path = str(node.target)
        g = gm.graph
        out = _inline(gm, node, sub, {"src": src, "mask": mask, "kpm": kpm,
                                      "training": lambda: g.create_node("get_attr", "training")}, path)
        node.replace_all_uses_with(out)
        g.erase_node(node)
        return self.rewritten(out, f"{type(mod).__name__} {path} opened into self-attention, norms and "
                                   f"feed-forward ({len(layers)} layer{'s' if len(layers) > 1 else ''})",
                              module_path=path,
                              details={"layers": len(layers),
                                       "norm_first": [bool(m.norm_first) for m in layers]})
