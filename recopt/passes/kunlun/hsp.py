"""HSP in place of PMA (Kunlun). Architecture pass: retrain.

Recognises a PMA-style pooler: a module that owns learned queries
(``seeds [k, d]`` or ``[1, k, d]``) and attends with them over one sequence
``S [B, T, d]`` (optionally with a ``[B, T]`` bool key mask), returning one
``[B, k, d]`` value. It is replaced by
:class:`recopt.modules.attention.HSP` ``(d, heads, n_out=k, n_seeds, rank)``
called on the same ``(S, key_keep)``; the output shape is unchanged, so the
consumers are untouched.

Warm start (``HSPConfig.warm_start``, default on; inferred):
``E_seed[:k] = seeds``, ``Z_1 = [I_k; 0]``, ``W_1 = I``, the other Kronecker
terms small random, and the attention projections copied from the PMA
(recopt ``MultiHeadAttention`` or ``nn.MultiheadAttention``). HSP normalises
its seeds (LayerNorm) before attending and PMA does not, so the warm-started
HSP is close to, not equal to, the PMA.

Reason codes: ``already_hsp``, ``summarizer_shape`` (not one sequence in / one
value out), ``layout`` (output not ``[B, k, d]``), ``heads`` (``d`` not divisible
by the head count).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from recopt.graph import canon as C
from recopt.graph.nodes import fresh_attr_name, get_module, node_shape, tidy_graph
from recopt.modules.attention import HSP
from recopt.ops.masks import all_keys

from ..base import Pass, PassConfig, PassContext, PassResult, Semantics
from ..registry import register_pass
from . import structure as S


@dataclass
class HSPConfig(PassConfig):
    """``seed_factor``: n_seeds = seed_factor * k (over-complete seeds);
    ``rank``: SumKronLinear rank r; ``n_heads``: attention heads (None = the PMA's);
    ``warm_start``: initialise from the PMA (see module docstring)."""

    seed_factor: int = 4
    rank: int = 4
    n_heads: Optional[int] = None
    warm_start: bool = True

    def __post_init__(self):
        if self.seed_factor < 1 or self.rank < 1:
            raise ValueError("seed_factor and rank must be >= 1")


@register_pass
class PMAToHSP(Pass):
    name = "hsp"
    semantics = Semantics.ARCHITECTURE
    config_cls = HSPConfig
    before = ("compskip", "gdpa")
    description = "replace PMA (learned-query attention pooling) by Kunlun's HSP"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sites = []
        summarizers, rejected = S.find_summarizers(gm)
        classes = S.scope_classes(gm)
        for scope, node, code, reason in rejected:
            sites.append(self.rejected(node, code, reason, module_path=scope))
        args = tuple(ctx.example_inputs)
        flops0 = S.node_flops(gm, args) if args and summarizers else {}
        done = []
        for summ in summarizers:
            cls = classes.get(summ.scope)
            if cls is not None and issubclass(cls, HSP):
                sites.append(self.rejected(summ.output, "already_hsp", f"{summ.scope} is already an HSP",
                                           module_path=summ.scope))
                continue
            site = self._replace(gm, summ, flops0)
            sites.append(site)
            if site.status == "rewritten":
                done.append(site)
        if done:
            tidy_graph(gm)
            S.prune_unused(gm)
            if args:
                flops1 = S.node_flops(gm, args)
                for site in done:
                    site.flops_after = float(sum(f for n, f in flops1.items() if n == site.details["hsp_node"]))
        S.mark_flops_incomplete(sites, flops0, *([flops1] if done and args else []))
        return PassResult(gm, sites)

    def _replace(self, gm, summ: S.Summarizer, flops0: dict):
        out_shape = node_shape(summ.output)
        seq_shape = node_shape(summ.sequence)
        seeds = gm.get_parameter(str(summ.seeds.target))
        k, d = seeds.shape[-2], seeds.shape[-1]
        if out_shape is None or seq_shape is None or tuple(out_shape[1:]) != (k, d) or out_shape[0] != seq_shape[0] \
                or seq_shape[-1] != d:
            return self.rejected(summ.output, "layout", f"{summ.scope} returns {out_shape} for a sequence "
                                 f"{seq_shape}; HSP needs [B, T, d] -> [B, k={k}, d={d}]", module_path=summ.scope)
        heads, attn_kind, src = self._attention_of(gm, summ)
        heads = self.config.n_heads or heads
        if d % heads:
            return self.rejected(summ.output, "heads", f"d={d} is not divisible by {heads} heads",
                                 module_path=summ.scope)
        act, post = attn_kind
        n_seeds = self.config.seed_factor * k
        hsp = HSP(d, heads, k, n_seeds, self.config.rank, act, post).to(seeds.device, seeds.dtype)
        notes = []
        if self.config.warm_start:
            notes.append(_warm_start(hsp, seeds.detach().reshape(k, d), src))
        owner = gm.get_submodule(summ.scope) if summ.scope else gm
        name = fresh_attr_name(owner, "hsp")
        path = f"{summ.scope}.{name}" if summ.scope else name
        gm.add_submodule(path, hsp)
        g = gm.graph
        with g.inserting_before(summ.output):
            keep = summ.key_mask if summ.key_mask is not None else g.call_function(all_keys, (summ.sequence,))
            new = g.call_module(path, (summ.sequence, keep))
        new.meta.update({kk: v for kk, v in summ.output.meta.items() if kk in ("tensor_meta", "stack_trace")})
        summ.output.replace_all_uses_with(new)
        nodes = {n.name for n in S.nodes_in_scope(gm, summ.scope)}
        before = float(sum(f for n, f in flops0.items() if n in nodes))
        return self.rewritten(summ.output, f"PMA {summ.scope} ({k} seeds, d={d}, {heads} heads) -> HSP("
                              f"n_seeds={n_seeds}, n_tokens={k}, rank={self.config.rank}); output shape unchanged; "
                              + "; ".join(notes) + " (architecture change: retrain)",
                              module_path=summ.scope, flops_before=before,
                              details={"n_seeds": n_seeds, "n_tokens": k, "d": d, "heads": heads, "rank":
                                       self.config.rank, "activation": act, "hsp_node": new.name,
                                       "hsp_module": path, "warm_start": self.config.warm_start})

    def _attention_of(self, gm, summ: S.Summarizer):
        """(heads, (activation, post_scale), source projections or None) of the pooler's attention."""
        nodes = S.nodes_in_scope(gm, summ.scope)
        for n in nodes:
            if n.op == "call_module" and isinstance(get_module(gm, n), nn.MultiheadAttention):
                mha = get_module(gm, n)
                return mha.num_heads, ("softmax", 1.0), mha
        heads = 1
        for n in nodes:
            if n.op == "call_method" and n.target == "unflatten" and len(n.args) >= 3 \
                    and isinstance(n.args[2], (tuple, list)) and len(n.args[2]) == 2:
                heads = int(n.args[2][0])
                break
        act = ("softmax", 1.0)
        for n in nodes:
            av = C.as_activation(n, gm)
            if av is not None and av.name and av.name != "softmax":
                T = node_shape(summ.sequence)[1]
                act = (av.name, 1.0 / T)
                break
        src = None
        projs = {}
        for n in nodes:
            if n.op == "call_module" and isinstance(get_module(gm, n), nn.Linear):
                last = str(n.target).rpartition(".")[2]
                if last in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    projs[last] = get_module(gm, n)
        if len(projs) == 4:
            src = projs
        return heads, act, src


def _warm_start(hsp: HSP, seeds: torch.Tensor, src) -> str:
    k, d = seeds.shape
    r = hsp.Z.shape[0]
    with torch.no_grad():
        hsp.seeds[:k].copy_(seeds)
        hsp.Z.normal_(0.0, 1e-3)
        hsp.W.normal_(0.0, 1e-3 / math.sqrt(d))
        hsp.Z[0].zero_()
        hsp.Z[0, :k].copy_(torch.eye(k))
        hsp.W[0].copy_(torch.eye(d))
        a = hsp.attn
        if isinstance(src, nn.MultiheadAttention):
            wq, wk, wv = src.in_proj_weight.chunk(3)
            for lin, w in ((a.q_proj, wq), (a.k_proj, wk), (a.v_proj, wv)):
                lin.weight.copy_(w)
            if src.in_proj_bias is not None:
                for lin, b in zip((a.q_proj, a.k_proj, a.v_proj), src.in_proj_bias.chunk(3)):
                    lin.bias.copy_(b)
            a.out_proj.weight.copy_(src.out_proj.weight)
            if src.out_proj.bias is not None:
                a.out_proj.bias.copy_(src.out_proj.bias)
            copied = "attention copied from nn.MultiheadAttention"
        elif isinstance(src, dict):
            for name, lin in src.items():
                dst = getattr(a, name)
                dst.weight.copy_(lin.weight)
                if lin.bias is not None and dst.bias is not None:
                    dst.bias.copy_(lin.bias)
            copied = "attention projections copied"
        else:
            copied = "attention freshly initialised"
    del r
    return f"warm start: seeds[:{k}] = PMA seeds, Z_1 = [I; 0], W_1 = I, {copied} (approximate: HSP normalises seeds)"
