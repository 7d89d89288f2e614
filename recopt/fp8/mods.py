"""LoKA Mods: architecture changes that make FP8 safe (LoKA's "FP8-friendly" model
changes). Each needs retraining.

- :func:`apply_no_bias` — drop every linear bias except the final head's.
- :func:`apply_blocknorm` — LayerNorm/RMSNorm fed by a linear site →
  :class:`~recopt.modules.blocknorm.BlockNorm` (parameter-free RMS norm over fixed 256-wide blocks).
- :func:`apply_hardswish` — SiLU and ``x·σ(x)`` → Hardswish;
  ``x·σ(norm(x))`` → ``x·hardsigmoid(norm(x))`` (the hard analogue, no exp).

Each returns one entry per candidate: ``(node_name, status, reason_code,
reason, details)`` where status is "rewritten" or "rejected"; the passes in
:mod:`recopt.passes.fp8` turn them into report sites.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..graph.nodes import fresh_attr_name, set_submodule
from ..modules.blocknorm import DEFAULT_BLOCK, BlockNorm  # noqa: F401  (BlockNorm re-exported: recopt.fp8.BlockNorm)
from .sites import NORM_FUNCS, NORM_MODULES, find_sites, head_sites, is_swish_mul


def apply_no_bias(gm: fx.GraphModule) -> list:
    """Drop biases of all linear sites except the heads (in place); return per-site outcomes."""
    sites = find_sites(gm)
    heads = head_sites(gm, sites)
    out = []
    for s in sites:
        if s.node.name in heads:
            out.append((s.node.name, "rejected", "final_head", "final prediction head keeps its bias", {"fqn": s.fqn}))
            continue
        if not s.has_bias:
            out.append((s.node.name, "rejected", "no_bias", "has no bias", {"fqn": s.fqn}))
            continue
        if s.kind == "module":
            old = gm.get_submodule(s.fqn)
            new = nn.Linear(old.in_features, old.out_features, bias=False, device=old.weight.device,
                            dtype=old.weight.dtype)
            new.weight = old.weight
            new.train(old.training)
            set_submodule(gm, s.fqn, new)
        else:
            args = list(s.node.args)
            if len(args) > 2:
                args[2] = None
                s.node.args = tuple(args)
            else:
                s.node.kwargs = {**s.node.kwargs, "bias": None}
        out.append((s.node.name, "rewritten", "", "bias dropped", {"fqn": s.fqn}))
    _finish(gm)
    return out


def apply_blocknorm(gm: fx.GraphModule, block: int = DEFAULT_BLOCK) -> list:
    """Replace LayerNorm/RMSNorm whose input is a linear site's output by BlockNorm (in place)."""
    site_nodes = {s.node: s for s in find_sites(gm)}
    modules = dict(gm.named_modules())
    out = []
    for node in list(gm.graph.nodes):
        is_mod = node.op == "call_module" and isinstance(modules.get(node.target), NORM_MODULES)
        is_fn = node.op == "call_function" and node.target in NORM_FUNCS
        if not (is_mod or is_fn):
            continue
        src = node.args[0] if node.args else None
        if src not in site_nodes:
            out.append((node.name, "rejected", "not_after_gemm",
                        "its input is not a linear layer's output (BlockNorm replaces norms after a GEMM)", {}))
            continue
        n = site_nodes[src].n
        shape = modules[node.target].normalized_shape if is_mod else (node.args[1] if len(node.args) > 1
                                                                       else node.kwargs.get("normalized_shape"))
        if tuple(shape or ()) != (n,):
            out.append((node.name, "rejected", "not_last_dim",
                        f"normalizes over {tuple(shape or ())}, not the GEMM's last dim ({n},)", {}))
            continue
        eff = block if n >= block else n
        if n % eff:
            out.append((node.name, "rejected", "block_mismatch",
                        f"N={n} is not a multiple of the {block}-wide block; kept (pad the layer to use BlockNorm)",
                        {"n": n}))
            continue
        name = fresh_attr_name(gm, f"{node.target if is_mod else node.name}_blocknorm")
        gm.add_submodule(name, BlockNorm(n, block))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (src,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        out.append((node.name, "rewritten", "", f"{'module' if is_mod else 'functional'} norm → BlockNorm(block={eff})",
                    {"n": n, "block": eff}))
    _finish(gm)
    return out


def apply_hardswish(gm: fx.GraphModule) -> list:
    """SiLU / x·σ(x) → Hardswish; x·σ(norm(x)) → x·hardsigmoid(norm(x)) (in place)."""
    modules = dict(gm.named_modules())
    out = []
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.SiLU):
            name = fresh_attr_name(gm, f"{node.target}_hardswish")
            gm.add_submodule(name, nn.Hardswish())
            node.target = name
            out.append((node.name, "rewritten", "", "SiLU → Hardswish", {}))
        elif node.op == "call_function" and node.target in (F.silu, torch.nn.functional.silu):
            node.target = F.hardswish
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
            node.args = node.args[:1]
            out.append((node.name, "rewritten", "", "F.silu → F.hardswish", {}))
        elif node.op == "call_function":
            sw = is_swish_mul(gm, node)
            if sw is None:
                continue
            kind, x, sig = sw
            if len(sig.users) != 1:
                out.append((node.name, "rejected", "sigmoid_shared",
                            "the sigmoid has other users; replacing it would change them too", {}))
                continue
            if kind == "swish":
                with gm.graph.inserting_after(node):
                    new = gm.graph.call_function(F.hardswish, (x,))
                new.meta = dict(node.meta)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                gm.graph.erase_node(sig)
                out.append((node.name, "rewritten", "", "x·sigmoid(x) → hardswish(x)", {}))
            else:
                with gm.graph.inserting_after(sig):
                    new = gm.graph.call_function(F.hardsigmoid, (sig.args[0],))
                new.meta = dict(sig.meta)
                sig.replace_all_uses_with(new)
                gm.graph.erase_node(sig)
                out.append((node.name, "rewritten", "", "x·sigmoid(norm(x)) → x·hardsigmoid(norm(x))", {}))
    _finish(gm)
    return out


def _finish(gm: fx.GraphModule) -> None:
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
