"""decompose_attention: open ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` leaves.

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

Reason codes: ``encoder_subclass``, ``encoder_options``, ``nested_tensor_padding``,
``not_faster_on_target``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from recopt.graph.canon import arg
from recopt.graph.nodes import get_module, node_dtype, tidy_graph
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


class _Traced(nn.Module):
    """Root for tracing :func:`encoder`/:func:`encoder_layer` on the real submodules."""

    def __init__(self, mod: nn.Module, fn, has_mask: bool, has_kpm: bool):
        super().__init__()
        self.m, self.fn, self.has_mask, self.has_kpm = mod, fn, has_mask, has_kpm

    def forward(self, src, mask, kpm, training):
        return self.fn(self.m, src, mask if self.has_mask else None, kpm if self.has_kpm else None, training)


@dataclass
class DecomposeConfig(PassConfig):
    """``encoders``: open nn.TransformerEncoder / nn.TransformerEncoderLayer calls.
    ``cpu_sites``: ``"faster"`` keeps them closed on a target without a fused GDPA
    kernel (the CPU), ``"all"`` opens them there too."""

    encoders: bool = True
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
    description = "open nn.TransformerEncoder(Layer) leaves into MHA + norms + FFN (exact)"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sites = []
        if not self.config.encoders:
            return PassResult(gm, sites)
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            mod = get_module(gm, node)
            if not isinstance(mod, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
                continue
            skip = _cpu.leave_alone(self.config, ctx.target, "encoder")
            if skip is not None:
                sites.append(self.rejected(node, _cpu.NOT_FASTER, skip))
                continue
            if isinstance(mod, nn.TransformerEncoderLayer):
                site = self._open(gm, node, mod, encoder_layer, ("src_mask", "src_key_padding_mask"))
            elif isinstance(mod, nn.TransformerEncoder):
                site = self._open(gm, node, mod, encoder, ("mask", "src_key_padding_mask"))
            else:
                continue
            sites.append(site)
        if any(s.status == "rewritten" for s in sites):
            tidy_graph(gm)
        return PassResult(gm, sites)

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
        env = {}
        g = gm.graph
        with g.inserting_before(node):
            inputs = {"src": src, "mask": mask, "kpm": kpm,
                      "training": g.create_node("get_attr", "training")}   # self.training, at run time
            for n in sub.nodes:
                if n.op == "placeholder":
                    env[n] = inputs[n.target]
                elif n.op == "output":
                    out = fx.node.map_arg(n.args[0], lambda x: env[x])
                else:
                    new = g.node_copy(n, lambda x: env[x])
                    if n.op in ("call_module", "get_attr"):
                        new.target = path + str(n.target)[1:]      # "m.xxx" -> "<path>.xxx"
                    new.meta.pop("tensor_meta", None)
                    env[n] = new
        node.replace_all_uses_with(out)
        g.erase_node(node)
        return self.rewritten(out, f"{type(mod).__name__} {path} opened into self-attention, norms and "
                                   f"feed-forward ({len(layers)} layer{'s' if len(layers) > 1 else ''})",
                              module_path=path,
                              details={"layers": len(layers),
                                       "norm_first": [bool(m.norm_first) for m in layers]})
