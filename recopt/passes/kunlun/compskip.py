"""CompSkip (Kunlun): a static per-layer schedule that skips
sub-blocks of a stack of identical layers. Architecture pass: retrain after it.

Default schedule (layer 0 is even)::

    even l: S = S + PF(S, X_sum)   [SA skipped]       summary: fresh   SUM_l(S)
    odd  l: S = S + SA(S)          [PF skipped]       summary: reused  SUM_{l-1}

``CompSkipConfig.skip`` replaces it: ``{"0": ["sa"], "1": ["pf", "sum"], ...}``
(layers not listed run everything). Roles (see :mod:`.structure`): ``"sa"``
self-attention, ``"pf"`` personalized cross block (a plain position-wise FFN
takes this role in layers without one, e.g. ``nn.TransformerEncoderLayer``),
``"sum"`` the learned-query summarizer reading the layer's input sequence.

A skipped residual branch ``x + f(x)`` becomes ``x``; for a post-norm
``LN(x + f(x))`` it becomes ``x`` (``post_norm="identity"``, default) or
``LN(x)`` (``"norm"``), and the site says which. Preconditions, each with its
reason code: the layers are structurally identical (``not_identical``) and
chained through one sequence output (``not_chained``, ``multiple_outputs``);
the skipped block is residual (``not_residual``); the role exists
(``no_sa_role``, ``no_pf_role``); the skipped branch has no side effects and
nothing outside it reads its intermediates (``side_effects``,
``branch_used_elsewhere``); a reused summary has the shape of the one it
replaces (``summary_shape_mismatch``) and there is exactly one per layer
(``ambiguous_summary``). Dead code and unused submodules are removed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.fx as fx
import torch.nn as nn

from recopt.graph.nodes import get_module, node_shape, set_submodule, tidy_graph

from ..base import Pass, PassConfig, PassContext, PassResult, Semantics
from ..registry import register_pass
from . import structure as S
from recopt.modules.scheduled_encoder import POST_NORM_SKIP, ScheduledEncoder, ScheduledEncoderLayer

ROLES = ("sa", "pf", "sum")


@dataclass
class CompSkipConfig(PassConfig):
    """``skip``: ``{layer index: [roles]}`` (None = Kunlun even/odd);
    ``stacks``: only stacks whose path starts with one of these (empty = all);
    ``post_norm``: what a skipped post-norm block becomes, ``"identity"`` or ``"norm"``."""

    skip: Optional[dict] = None
    stacks: list = None
    post_norm: str = "identity"

    def __post_init__(self):
        self.stacks = list(self.stacks or [])
        if self.post_norm not in POST_NORM_SKIP:
            raise ValueError(f"post_norm={self.post_norm!r}; expected one of {POST_NORM_SKIP}")
        if self.skip is not None:
            if not isinstance(self.skip, dict):
                raise ValueError("skip must be a dict {layer index: [roles]}, e.g. {'0': ['sa'], '1': ['pf', 'sum']}")
            clean = {}
            for k, roles in self.skip.items():
                if not str(k).isdigit():
                    raise ValueError(f"skip key {k!r} is not a layer index")
                bad = sorted(set(roles) - set(ROLES))
                if bad:
                    raise ValueError(f"unknown role(s) {bad} for layer {k}; roles are {list(ROLES)}")
                clean[str(int(k))] = list(roles)
            self.skip = clean

    def roles_to_skip(self, layer: int) -> list:
        if self.skip is not None:
            return list(self.skip.get(str(layer), []))
        return ["sa"] if layer % 2 == 0 else ["pf", "sum"]


@register_pass
class CompSkip(Pass):
    name = "compskip"
    semantics = Semantics.ARCHITECTURE
    config_cls = CompSkipConfig
    before = ("sliding_window",)
    description = "Kunlun CompSkip: skip self-attention / PFFN / summarizer per layer on a static schedule"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sites: list = []
        args = tuple(ctx.example_inputs)
        flops0 = S.node_flops(gm, args) if args else {}
        summarizers, _ = S.find_summarizers(gm)
        sum_paths = {s.scope for s in summarizers}
        by_sequence: dict = {}
        for s in summarizers:
            by_sequence.setdefault(s.sequence, []).append(s)
        layer_scopes: list = []            # (site, [scopes whose FLOPs it covers])
        changed = False

        for stack in S.find_stacks(gm):
            if self.config.stacks and not any(S.in_scope(stack.path, p) for p in self.config.stacks):
                continue
            if any(S.in_scope(c, p) for c in stack.children for p in sum_paths) or stack.path in sum_paths:
                continue  # a list of summarizers: handled as the "sum" role of the layers they read
            anchor = _first_node(gm, stack.children[0])
            if anchor is None:
                continue
            if not stack.identical:
                sites.append(self.rejected(anchor, "not_identical", stack.why + "; CompSkip needs identical layers",
                                           module_path=stack.path))
                continue
            if issubclass(stack.cls, nn.TransformerEncoderLayer):
                changed |= self._encoder_layers(gm, stack, sites, layer_scopes)
                continue
            changed |= self._graph_stack(gm, stack, by_sequence, sites, layer_scopes)

        for node in list(gm.graph.nodes):
            if node.op == "call_module" and type(get_module(gm, node)) is nn.TransformerEncoder:
                path = S.normalize_path(str(node.target))
                if self.config.stacks and not any(S.in_scope(path, p) for p in self.config.stacks):
                    continue
                changed |= self._encoder(gm, node, sites, layer_scopes)

        if changed:
            tidy_graph(gm)
            S.prune_unused(gm)
            if args:
                flops1 = S.node_flops(gm, args)
                for site, scopes in layer_scopes:
                    site.flops_before = _scoped(site.details.get("_names0", set()), flops0)
                    site.flops_after = _scoped_gm(gm, scopes, flops1)
        for site, _ in layer_scopes:
            site.details.pop("_names0", None)
        S.mark_flops_incomplete(sites, flops0, *([flops1] if changed and args else []))
        return PassResult(gm, sites)

    # ------------------------------------------------------------------ inlined layers (graph level)

    def _graph_stack(self, gm, stack, by_sequence, sites, layer_scopes) -> bool:
        layers = [S.analyze_layer(gm, c, i) for i, c in enumerate(stack.children)]
        bad = [L for L in layers if L.problem]
        if bad:
            L = bad[0]
            node = L.output or _first_node(gm, L.path)
            sites.append(self.rejected(node, L.problem, L.problem_text, module_path=L.path))
            return False
        for prev, cur in zip(layers, layers[1:]):
            if cur.stream_in is not prev.output:
                sites.append(self.rejected(cur.output, "not_chained",
                                           f"{cur.path} does not read {prev.path}'s output; CompSkip needs layers "
                                           "chained through the sequence", module_path=stack.path))
                return False
        changed = False
        last_fresh: Optional[S.Summarizer] = None
        for L in layers:
            want = self.config.roles_to_skip(L.index)
            sums = by_sequence.get(L.stream_in, [])
            summ = sums[0] if len(sums) == 1 else None
            names0 = {n.name for n in L.nodes} | ({n.name for n in S.nodes_in_scope(gm, summ.scope)} if summ else set())
            scopes = [L.path] + ([summ.scope] if summ else [])
            done, notes = [], []
            for role in ("sa", "pf"):
                if role not in want:
                    continue
                branches = L.role(role)
                if role == "pf" and not branches and L.role("ff"):
                    branches = L.role("ff")
                    notes.append("no personalized cross block: the position-wise FFN takes the PF role")
                if not branches:
                    sites.append(self.rejected(L.output, f"no_{role}_role",
                                               f"layer {L.index} ({L.path}) has no {_ROLE_NAME[role]} residual "
                                               f"branch to skip (found: {[b.role for b in L.branches]})",
                                               module_path=L.path))
                    continue
                for br in branches:
                    why = _branch_problem(br)
                    if why:
                        sites.append(self.rejected(br.add, why[0], why[1], module_path=L.path))
                        continue
                    stream = [a for a in br.add.args[:2] if a is not br.branch_out][0]
                    if br.norm is not None and self.config.post_norm == "identity":
                        br.norm.replace_all_uses_with(stream)
                        notes.append(f"post-norm block {br.norm.name}({br.add.name}) replaced by its input x "
                                     "(post_norm='identity'; the norm is skipped too)")
                    else:
                        br.add.replace_all_uses_with(stream)
                        if br.norm is not None:
                            notes.append(f"post-norm block kept its norm: LN(x) (post_norm='norm')")
                    done.append(role)
            summary_note = "fresh"
            if summ is not None and "sum" in want:
                problem = self._reuse_problem(summ, last_fresh)
                if problem:
                    sites.append(self.rejected(summ.output, problem[0], problem[1], module_path=summ.scope))
                else:
                    summ.output.replace_all_uses_with(last_fresh.output)
                    summary_note = f"reused from {last_fresh.scope}"
                    done.append("sum")
            elif "sum" in want and len(sums) > 1:
                sites.append(self.rejected(L.output, "ambiguous_summary",
                                           f"{len(sums)} summarizers read the input of {L.path} "
                                           f"({[s.scope for s in sums]}); cannot tell which to reuse",
                                           module_path=L.path))
            elif "sum" in want:
                notes.append("no summarizer reads this layer's input; nothing to reuse")
            if summ is not None and summary_note == "fresh":
                last_fresh = summ
            if not done:
                continue
            changed = True
            kept = [b.role for b in L.branches if b.role not in done and not (b.role == "ff" and "pf" in done)]
            site = self.rewritten(L.output, f"layer {L.index}: skipped {', '.join(_ROLE_NAME[r] for r in done)}; "
                                  f"runs {', '.join(_ROLE_NAME.get(r, r) for r in kept) or 'nothing'}; summary "
                                  f"{summary_note}" + (f" ({'; '.join(notes)})" if notes else ""),
                                  module_path=L.path,
                                  details={"layer": L.index, "stack": stack.path, "skipped": done, "kept": kept,
                                           "summary": summary_note, "notes": notes, "_names0": names0,
                                           "retrain": "architecture change: retrain the model"})
            sites.append(site)
            layer_scopes.append((site, scopes))
        return changed

    def _reuse_problem(self, summ: S.Summarizer, source: Optional[S.Summarizer]):
        if source is None:
            return ("no_summary_to_reuse", f"{summ.scope} would reuse the previous layer's summary, but no "
                    "earlier layer computes a fresh one (the schedule skips 'sum' in the first layer)")
        a, b = node_shape(summ.output), node_shape(source.output)
        if a is None or b is None or tuple(a) != tuple(b):
            return ("summary_shape_mismatch", f"{summ.scope} returns shape {a} but {source.scope} returns {b}; "
                    "a reused summary must have the same shape")
        nodes = S.nodes_in_scope(summ.output.graph.owning_module, summ.scope)
        if any(S.is_side_effect(n) for n in nodes):
            return ("side_effects", f"{summ.scope} has in-place or impure ops; skipping it would drop their effect")
        return None

    # ------------------------------------------------------------------ torch.nn encoder layers (leaf modules)

    def _encoder_layers(self, gm, stack, sites, layer_scopes) -> bool:
        calls = []
        for path in stack.children:
            nodes = [n for n in gm.graph.nodes if n.op == "call_module" and S.normalize_path(str(n.target)) == path]
            if len(nodes) != 1:
                sites.append(self.rejected(_first_node(gm, path), "not_called",
                                           f"{path} is called {len(nodes)} times; CompSkip needs one call per layer",
                                           module_path=path))
                return False
            calls.append(nodes[0])
        for prev, cur in zip(calls, calls[1:]):
            if not cur.args or cur.args[0] is not prev:
                sites.append(self.rejected(cur, "not_chained", f"{cur.target} does not read {prev.target}'s output",
                                           module_path=stack.path))
                return False
        changed = False
        for i, node in enumerate(calls):
            new, site = self._schedule_encoder_layer(gm, node, str(node.target), i)
            if site is None:
                continue
            set_submodule(gm, str(node.target), new)
            sites.append(site)
            layer_scopes.append((site, [S.normalize_path(str(node.target))]))
            changed = True
        return changed

    def _encoder(self, gm, node, sites, layer_scopes) -> bool:
        enc = get_module(gm, node)
        path = str(node.target)
        new_layers, new_sites = [], []
        for i, layer in enumerate(enc.layers):
            new, site = self._schedule_encoder_layer(gm, node, f"{path}.layers.{i}", i, layer)
            new_layers.append(new if site is not None else layer)
            if site is not None:
                new_sites.append(site)
        if not new_sites:
            return False
        set_submodule(gm, path, ScheduledEncoder(enc, new_layers))
        for site in new_sites:
            site.details["flops_scope"] = f"the whole nn.TransformerEncoder {path} (one leaf call)"
            sites.append(site)
            layer_scopes.append((site, [S.normalize_path(path)]))
        return True

    def _schedule_encoder_layer(self, gm, node, path, index, layer=None):
        layer = layer if layer is not None else gm.get_submodule(path)
        want = self.config.roles_to_skip(index)
        run_sa = "sa" not in want
        run_ff = "pf" not in want
        if run_sa and run_ff:
            return layer, None
        notes = []
        if not run_ff:
            notes.append("no personalized cross block: the position-wise FFN takes the PF role")
        if "sum" in want:
            notes.append("no summarizer in an encoder layer; nothing to reuse")
        if not layer.norm_first:
            notes.append(f"post-norm layer: a skipped block gives "
                         f"{'x' if self.config.post_norm == 'identity' else 'LN(x)'} (post_norm="
                         f"'{self.config.post_norm}')")
        new = ScheduledEncoderLayer(layer, run_sa, run_ff, post_norm_skip=self.config.post_norm)
        done = [r for r, keep in (("sa", run_sa), ("pf", run_ff)) if not keep]
        kept = [r for r, keep in (("sa", run_sa), ("ff", run_ff)) if keep]
        site = self.rewritten(node, f"layer {index}: skipped {', '.join(_ROLE_NAME[r] for r in done)}; runs "
                              f"{', '.join(_ROLE_NAME[r] for r in kept) or 'nothing'}"
                              + (f" ({'; '.join(notes)})" if notes else ""),
                              module_path=path,
                              details={"layer": index, "stack": path.rpartition(".")[0], "skipped": done,
                                       "kept": kept, "notes": notes, "encoder": str(node.target)
                                       if type(get_module(gm, node)) is nn.TransformerEncoder else "",
                                       "_names0": {node.name},
                                       "retrain": "architecture change: retrain the model"})
        return new, site


_ROLE_NAME = {"sa": "self-attention", "pf": "personalized FFN", "ff": "FFN", "sum": "summarizer"}


def _branch_problem(br: S.Branch):
    derived = S.descendants(br.stream, br.nodes)
    for n in br.nodes:
        if S.is_side_effect(n):
            return ("side_effects", f"the {br.role} branch ending at {br.branch_out.name} has an in-place or "
                    f"impure op ({n.name}); skipping it would drop its effect")
    for n in derived:
        outside = [u for u in n.users if u not in br.nodes and u is not br.add]
        impure = [u for u in outside if S.is_side_effect(u)]
        if impure:
            return ("side_effects", f"{impure[0].name} modifies {n.name} of the {br.role} branch in place; "
                    "skipping the branch would drop that effect")
        if outside:
            return ("branch_used_elsewhere", f"{n.name} inside the {br.role} branch is also read by "
                    f"{outside[0].name} outside it (a cross-layer dependency); it cannot be skipped")
    return None


def _first_node(gm, path):
    nodes = S.nodes_in_scope(gm, path)
    return nodes[0] if nodes else next(iter(gm.graph.nodes))


def _scoped(names: set, flops: dict) -> float:
    return float(sum(f for n, f in flops.items() if n in names))


def _scoped_gm(gm, scopes, flops) -> float:
    total = 0.0
    for n in gm.graph.nodes:
        if n.name in flops and any(S.in_scope(S.scope_of(n), p) for p in scopes):
            total += flops[n.name]
    return total
