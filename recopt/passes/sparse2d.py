"""Pass "sparse2d": gather plain embedding tables into TorchRec collections.

The first half of 2D sparse parallelism. On one process the
pass is EXACT: it changes where the tables live, not what the model computes.
Sharding happens later, when :func:`recopt.distributed.shard_2d` places the
rewritten model on ranks.

**Sees** (every candidate is reported, with rows, dim, pooling, bytes and the
model inputs that feed it):

- ``call_module`` ``nn.EmbeddingBag`` called as ``(input, offsets[, per_sample_weights])``
  or with a 2-D ``input [B, L]``; ``nn.Embedding(indices)``;
- the functional spellings Dynamo leaves behind,
  ``F.embedding_bag(input, weight, offsets, ...)`` / ``F.embedding(input, weight)``
  with a ``get_attr`` weight;
- TorchRec ``EmbeddingBagCollection`` / ``EmbeddingCollection`` (and their
  weighted variants) already in the graph: reported (``already_collection``),
  left as they are — :func:`~recopt.distributed.shard_2d` shards them directly.

**Does:** all eligible bag lookups with the same batch size become one
``EmbeddingBagCollection`` call (one weighted collection for lookups with
``per_sample_weights``), fed by a ``KeyedJaggedTensor`` built in the graph from
the per-table ``(input, offsets)``; each old lookup's users now read
``take_bags(collection(kjt).to_dict()[feature], ...)``, the same ``[B, D]`` tensor.
The example's batch sizes only choose which lookups share a call (a cost
choice); correctness does not depend on them: when lookups of one call get
different numbers of bags at run time, :func:`recopt.ops.kjt.build_bag_kjt`
pads the shorter keys with empty bags and ``take_bags`` cuts each output back
to its own rows (exact, outputs and gradients).
``nn.Embedding`` lookups with the same dim become one ``EmbeddingCollection``
call whose per-feature values are reshaped back to ``indices.shape + (D,)``.
The collections reuse the original ``Parameter`` objects, so no weight is
copied and the old modules are removed.

**Rejects**, with a reason code: ``max_pooling`` (TorchRec pools SUM/MEAN),
``padding_idx``, ``max_norm`` (renormalises weights in place),
``scale_grad_by_freq``, ``sparse_gradients`` (``sparse=True``: its sparse weight gradient would
become a dense one), ``dtype`` (only float32 tables), ``offsets_dynamic``
(the lookup's ids are computed after another table's output is used, so one
collection call cannot serve both), ``shared_weight`` (the weight is also used
outside embedding lookups, e.g. tied to an output layer), ``shared_table``
(another lookup of the same table was rejected).

**Checkpoints:** ``gm.meta["recopt_sparse2d"]["state_dict_mapping"]`` maps each
old state-dict key to its new one; :func:`remap_state_dict` and
:func:`load_state_dict_from_before_sparse2d` apply it.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..graph.nodes import fresh_attr_name, get_attr_value, tidy_graph
from ..ops.kjt import build_bag_kjt, build_sequence_kjt, take_bags, unflatten_sequence_embedding
from .base import Pass, PassConfig, PassContext, PassResult, Semantics, Site
from .registry import register_pass

META_KEY = "recopt_sparse2d"


@dataclass
class EmbeddingSite:
    """One embedding lookup in the graph, normalised over the two spellings."""

    node: fx.Node
    kind: str                      # "bag" | "embedding"
    table_ref: str                 # module path (call_module) or weight attribute (get_attr)
    weight_key: str                # state-dict key of the weight
    weight: nn.Parameter
    input: fx.Node
    offsets: Optional[fx.Node] = None
    per_sample_weights: Optional[fx.Node] = None
    mode: str = "mean"
    padding_idx: Optional[int] = None
    max_norm: Optional[float] = None
    scale_grad_by_freq: bool = False
    include_last_offset: bool = False
    sparse: bool = False
    problems: list = field(default_factory=list)   # [(reason_code, sentence)]

    @property
    def rows(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])


_EB_FIELDS = ("input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq", "mode", "sparse",
              "per_sample_weights", "include_last_offset", "padding_idx")
_EMB_FIELDS = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")


def _bind(node: fx.Node, names: tuple) -> dict:
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _site_from_node(gm: fx.GraphModule, node: fx.Node) -> Optional[EmbeddingSite]:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod) is nn.EmbeddingBag:
            a = _bind(node, ("input", "offsets", "per_sample_weights"))
            return EmbeddingSite(node, "bag", str(node.target), f"{node.target}.weight", mod.weight, a["input"],
                                 a.get("offsets"), a.get("per_sample_weights"), mod.mode, mod.padding_idx,
                                 mod.max_norm, mod.scale_grad_by_freq, mod.include_last_offset, mod.sparse)
        if type(mod) is nn.Embedding:
            a = _bind(node, ("input",))
            return EmbeddingSite(node, "embedding", str(node.target), f"{node.target}.weight", mod.weight,
                                 a["input"], padding_idx=mod.padding_idx, max_norm=mod.max_norm,
                                 scale_grad_by_freq=mod.scale_grad_by_freq, sparse=mod.sparse)
        return None
    if node.op == "call_function" and node.target in (F.embedding_bag, torch.embedding_bag, F.embedding):
        is_bag = node.target is not F.embedding
        a = _bind(node, _EB_FIELDS if is_bag else _EMB_FIELDS)
        w = a.get("weight")
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            return None
        weight = get_attr_value(gm, w)
        ref = w.target[: -len(".weight")] if w.target.endswith(".weight") else w.target
        site = EmbeddingSite(node, "bag" if is_bag else "embedding", ref, w.target, weight, a["input"],
                             padding_idx=a.get("padding_idx"), max_norm=a.get("max_norm"),
                             scale_grad_by_freq=bool(a.get("scale_grad_by_freq", False)),
                             sparse=bool(a.get("sparse", False)))
        if is_bag:
            site.offsets, site.per_sample_weights = a.get("offsets"), a.get("per_sample_weights")
            site.mode = a.get("mode", "mean")
            site.include_last_offset = bool(a.get("include_last_offset", False))
        return site
    return None


def _feeding_inputs(node: Optional[fx.Node]) -> List[str]:
    """Names of the graph placeholders a value is computed from."""
    if node is None or not isinstance(node, fx.Node):
        return []
    seen, stack, out = set(), [node], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            out.append(n.name)
        stack.extend(n.all_input_nodes)
    return sorted(out)


def _table_details(site: EmbeddingSite) -> dict:
    w = site.weight
    return {
        "table": site.table_ref, "rows": site.rows, "dim": site.dim, "dtype": str(w.dtype),
        "pooling": site.mode if site.kind == "bag" else "none (sequence)",
        "bytes": w.numel() * w.element_size(),
        "inputs": list(dict.fromkeys(_feeding_inputs(site.input) + _feeding_inputs(site.offsets)
                                     + _feeding_inputs(site.per_sample_weights))),
        "weighted": site.per_sample_weights is not None,
    }


def _check_options(site: EmbeddingSite) -> None:
    p = site.problems
    if site.weight.dim() != 2:
        p.append(("shape", f"the weight has shape {tuple(site.weight.shape)}; a table is [rows, dim]"))
    if site.weight.dtype != torch.float32:
        p.append(("dtype", f"the table is {site.weight.dtype}; the rewrite handles float32 tables only"))
    if site.kind == "bag" and site.mode not in ("sum", "mean"):
        p.append(("max_pooling", f"mode={site.mode!r}: TorchRec collections pool with SUM or MEAN only; "
                                 "keep this table plain or switch it to sum/mean pooling"))
    if site.padding_idx is not None:
        p.append(("padding_idx", f"padding_idx={site.padding_idx}: TorchRec tables have no padding row; "
                                 "drop the padding ids from the input (jagged lengths) and remove padding_idx"))
    if site.max_norm is not None:
        p.append(("max_norm", "max_norm renormalises rows in place during lookup, which TorchRec does not do"))
    if site.scale_grad_by_freq:
        p.append(("scale_grad_by_freq", "scale_grad_by_freq changes gradients in a way the fused "
                                        "TorchRec/FBGEMM optimizers do not reproduce"))
    if site.sparse:
        p.append(("sparse_gradients", "sparse=True: the lookup's weight gradient is a sparse tensor (for "
                                      "SparseAdam / sparse SGD), a TorchRec collection's is dense (as large as "
                                      "the table); remove sparse=True to gather this table, or keep it plain"))
    if site.per_sample_weights is not None and site.mode != "sum":
        p.append(("per_sample_weights", "per_sample_weights need sum pooling (a weighted collection pools by sum)"))
    if site.kind == "bag" and site.input.meta.get("tensor_meta") is not None:
        nd = len(site.input.meta["tensor_meta"].shape)
        if nd == 2 and site.offsets is not None or nd not in (1, 2):
            p.append(("input_shape", f"unsupported input rank {nd} with offsets={site.offsets is not None}"))
        if nd == 1 and site.offsets is None:
            p.append(("input_shape", "1-D ids without offsets"))


def _batch_size(site: EmbeddingSite) -> Optional[int]:
    tm = site.node.meta.get("tensor_meta")
    return int(tm.shape[0]) if tm is not None and len(tm.shape) == 2 else None


# ----------------------------------------------------------------------------- the pass

@dataclass
class Sparse2DConfig(PassConfig):
    """``collection_name``: attribute name of the new bag collection (suffixes
    ``_weighted``, ``_seq`` and ``_1``, ``_2`` … are added for further ones).
    ``rewrite_embeddings``: also turn ``nn.Embedding`` lookups into an
    ``EmbeddingCollection``."""

    collection_name: str = "sparse_ebc"
    rewrite_embeddings: bool = True


@register_pass
class Sparse2DPass(Pass):
    name = "sparse2d"
    semantics = Semantics.EXACT
    config_cls = Sparse2DConfig
    description = ("gather plain nn.EmbeddingBag/nn.Embedding tables into TorchRec collections fed by an "
                   "in-graph KeyedJaggedTensor, ready for 2D sparse sharding (recopt.distributed.shard_2d)")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sites: List[Site] = []
        candidates: List[EmbeddingSite] = []
        for node in gm.graph.nodes:
            if node.op == "call_module" and _is_torchrec_collection(gm.get_submodule(node.target)):
                sites.append(self._report_collection(gm, node))
                continue
            s = _site_from_node(gm, node)
            if s is not None:
                candidates.append(s)
        if not candidates:
            return PassResult(gm, sites)
        try:
            import torchrec  # noqa: F401
        except ImportError:
            for s in candidates:
                sites.append(self.rejected(s.node, "torchrec_missing",
                                           "TorchRec is not installed: pip install 'recopt[rec]'",
                                           details=_table_details(s)))
            return PassResult(gm, sites)

        for s in candidates:
            _check_options(s)
            if s.kind == "embedding" and not self.config.rewrite_embeddings:
                s.problems.append(("disabled", "nn.Embedding rewriting is off (rewrite_embeddings=False)"))
        self._check_weight_uses(gm, candidates)
        groups = self._group(candidates)
        rewritten = self._rewrite(gm, groups) if groups else set()
        for s in candidates:
            details = _table_details(s)
            if s.node in rewritten:
                details.update(rewritten[s.node])
                sites.append(self.rewritten(
                    s.node, f"lookup of {s.table_ref} ({s.rows}x{s.dim}, {details['pooling']}, "
                    f"{details['bytes']} B, from {', '.join(details['inputs']) or '-'}) moved into "
                    f"{details['collection']}[{details['feature']!r}]", details=details))
            else:
                code, why = s.problems[0] if s.problems else ("not_grouped", "not grouped")
                sites.append(self.rejected(s.node, code, why, details=details))
        return PassResult(gm, sites)

    # -- reporting of existing collections
    def _report_collection(self, gm, node) -> Site:
        mod = gm.get_submodule(node.target)
        tables = []
        for cfg in mod.embedding_bag_configs() if hasattr(mod, "embedding_bag_configs") else mod.embedding_configs():
            tables.append({"table": cfg.name, "rows": cfg.num_embeddings, "dim": cfg.embedding_dim,
                           "pooling": getattr(getattr(cfg, "pooling", None), "name", "none (sequence)"),
                           "bytes": cfg.num_embeddings * cfg.embedding_dim * 4, "features": list(cfg.feature_names)})
        return self.rejected(node, "already_collection",
                             f"already a TorchRec {type(mod).__name__} ({len(tables)} tables); "
                             "recopt.distributed.shard_2d shards it as it is",
                             details={"tables": tables, "inputs": _feeding_inputs(node)})

    # -- eligibility across sites
    def _check_weight_uses(self, gm, candidates):
        site_nodes = {s.node for s in candidates}
        by_table: Dict[str, List[EmbeddingSite]] = {}
        for s in candidates:
            by_table.setdefault(s.table_ref, []).append(s)
        other_uses = set()
        for node in gm.graph.nodes:
            if node.op != "get_attr" or all(u in site_nodes for u in node.users):
                continue
            for ref, ss in by_table.items():
                if node.target == ss[0].weight_key or node.target.startswith(ref + "."):
                    other_uses.add(ref)
        # A weight tied by assignment (``out.weight = emb.weight``) is used by a call_module node
        # (an nn.Linear), not by a get_attr: find it by identity under another state-dict key.
        keys_of = {id(ss[0].weight): (ref, {s.weight_key for s in ss}) for ref, ss in by_table.items()}
        for key, p in gm.named_parameters(remove_duplicate=False):
            hit = keys_of.get(id(p))
            if hit is not None and key not in hit[1]:
                other_uses.add(hit[0])
        for ref, ss in by_table.items():
            if len({s.kind for s in ss}) > 1:
                other_uses.add(ref)
            if ref in other_uses:
                for s in ss:
                    s.problems.append(("shared_weight", f"the weight of {ref} is also used outside embedding "
                                                        "lookups (e.g. tied to another layer), so it cannot "
                                                        "move into a collection"))

    def _group(self, candidates: List[EmbeddingSite]) -> List[dict]:
        """Collections to build: {kind, weighted, sites}; marks sites that cannot join."""
        graph_nodes = list(candidates[0].node.graph.nodes)
        pos = {n: i for i, n in enumerate(graph_nodes)}
        output_pos = len(graph_nodes)
        while True:
            bad_tables = {s.table_ref for s in candidates if s.problems}
            for s in candidates:
                if not s.problems and s.table_ref in bad_tables:
                    s.problems.append(("shared_table", f"another lookup of {s.table_ref} could not be "
                                                       "rewritten, and a table lives in one place"))
            groups: Dict[tuple, dict] = {}
            changed = False
            for s in sorted((s for s in candidates if not s.problems), key=lambda s: pos[s.node]):
                if s.kind == "bag":
                    key = ("bag", s.per_sample_weights is not None, _batch_size(s))
                else:
                    key = ("embedding", False, s.dim)
                g = groups.setdefault(key, {"kind": s.kind, "weighted": key[1], "sites": [],
                                            "last_input": -1, "first_use": output_pos})
                inputs = [n for n in (s.input, s.offsets, s.per_sample_weights) if isinstance(n, fx.Node)]
                last_input = max([g["last_input"]] + [pos[n] for n in inputs])
                first_use = min([g["first_use"]] + [pos[u] for u in s.node.users])
                if last_input < first_use:
                    g["sites"].append(s)
                    g["last_input"], g["first_use"] = last_input, first_use
                else:
                    s.problems.append(("offsets_dynamic", "its ids are computed after another table's output "
                                                          "is used, so one collection call cannot serve both"))
                    changed = True
            if not changed:
                return [g for g in groups.values() if g["sites"]]

    # -- graph surgery
    def _rewrite(self, gm: fx.GraphModule, groups: List[dict]) -> dict:
        from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
        from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

        graph_nodes = list(gm.graph.nodes)
        done: dict = {}
        mapping: dict = {}
        collections: dict = {}
        for gi, g in enumerate(groups):
            suffix = "_weighted" if g["weighted"] else ("_seq" if g["kind"] == "embedding" else "")
            coll_name = fresh_attr_name(gm, self.config.collection_name + suffix)
            # one table per distinct weight, one feature per lookup site
            tables: Dict[str, dict] = {}
            feature_of = {}
            for s in g["sites"]:
                t = tables.setdefault(s.table_ref, {"name": s.table_ref.replace(".", "__"), "site": s,
                                                     "features": []})
                fname = t["name"] if not t["features"] else f"{t['name']}__{len(t['features'])}"
                t["features"].append(fname)
                feature_of[s.node] = fname
            pool = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
            if g["kind"] == "bag":
                configs = [EmbeddingBagConfig(name=t["name"], embedding_dim=t["site"].dim,
                                              num_embeddings=t["site"].rows, feature_names=list(t["features"]),
                                              pooling=pool[t["site"].mode]) for t in tables.values()]
                coll = EmbeddingBagCollection(tables=configs, is_weighted=g["weighted"], device=torch.device("meta"))
                holder = coll.embedding_bags
            else:
                configs = [EmbeddingConfig(name=t["name"], embedding_dim=t["site"].dim,
                                           num_embeddings=t["site"].rows, feature_names=list(t["features"]))
                           for t in tables.values()]
                coll = EmbeddingCollection(tables=configs, device=torch.device("meta"))
                holder = coll.embeddings
            for ref, t in tables.items():
                holder[t["name"]].weight = t["site"].weight   # the same Parameter: no copy, exact
                kind_attr = "embedding_bags" if g["kind"] == "bag" else "embeddings"
                mapping[t["site"].weight_key] = f"{coll_name}.{kind_attr}.{t['name']}.weight"
            gm.add_submodule(coll_name, coll)
            collections[coll_name] = {"kind": type(coll).__name__,
                                      "tables": {t["name"]: list(t["features"]) for t in tables.values()}}

            first_use = min(g["first_use"], len(graph_nodes) - 1)
            anchor = graph_nodes[first_use]
            ordered = g["sites"]
            keys = [feature_of[s.node] for s in ordered]
            with gm.graph.inserting_before(anchor):
                if g["kind"] == "bag":
                    kjt = gm.graph.call_function(build_bag_kjt, (
                        keys, [s.input for s in ordered], [s.offsets for s in ordered],
                        [s.include_last_offset for s in ordered],
                        [s.per_sample_weights for s in ordered]))
                    out = gm.graph.call_module(coll_name, (kjt,))
                    as_dict = gm.graph.call_method("to_dict", (out,))
                    for s, key in zip(ordered, keys):
                        pooled = gm.graph.call_function(operator.getitem, (as_dict, key))
                        # the key's own bag count: the call pads keys that got fewer bags than others
                        new = gm.graph.call_function(take_bags, (pooled, s.input, s.offsets,
                                                                 s.include_last_offset))
                        new.meta.update({k: v for k, v in s.node.meta.items() if k in ("tensor_meta", "val")})
                        s.node.replace_all_uses_with(new)
                else:
                    kjt = gm.graph.call_function(build_sequence_kjt, (keys, [s.input for s in ordered]))
                    out = gm.graph.call_module(coll_name, (kjt,))
                    for s, key in zip(ordered, keys):
                        jt = gm.graph.call_function(operator.getitem, (out, key))
                        new = gm.graph.call_function(unflatten_sequence_embedding, (jt, s.input))
                        new.meta.update({k: v for k, v in s.node.meta.items() if k in ("tensor_meta", "val")})
                        s.node.replace_all_uses_with(new)
            for s in ordered:
                done[s.node] = {"collection": coll_name, "feature": feature_of[s.node],
                                "new_weight_key": mapping[s.weight_key]}
        for s_node in done:
            gm.graph.erase_node(s_node)
        tidy_graph(gm)
        gm.delete_all_unused_submodules()
        _delete_unused_get_attr_params(gm, set(mapping))
        meta = gm.meta.setdefault(META_KEY, {"state_dict_mapping": {}, "collections": {}})
        meta["state_dict_mapping"].update(mapping)
        meta["collections"].update(collections)
        return done


def _is_torchrec_collection(mod: nn.Module) -> bool:
    names = {c.__name__ for c in type(mod).__mro__}
    return type(mod).__module__.startswith("torchrec.") and bool(
        names & {"EmbeddingBagCollection", "EmbeddingCollection"})


def _delete_unused_get_attr_params(gm: fx.GraphModule, keys: set) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for key in keys:
        if key in used:
            continue
        owner_path, _, attr = key.rpartition(".")
        try:
            owner = gm.get_submodule(owner_path) if owner_path else gm
        except AttributeError:
            continue
        if attr in owner._parameters:
            del owner._parameters[attr]
            if owner_path and not list(owner.parameters()) and not list(owner.buffers()) \
                    and not list(owner.children()) and type(owner) in (nn.EmbeddingBag, nn.Embedding):
                parent_path, _, child = owner_path.rpartition(".")
                delattr(gm.get_submodule(parent_path) if parent_path else gm, child)


# ----------------------------------------------------------------------------- checkpoints

def state_dict_mapping(model: nn.Module) -> Dict[str, str]:
    """Old → new state-dict keys recorded by the pass on ``model`` (a rewritten
    GraphModule, or a :class:`recopt.OptimizedModel` holding one); ``{}`` if none."""
    gm = getattr(model, "graph_module", model)
    meta = getattr(gm, "meta", {}) or {}
    return dict(meta.get(META_KEY, {}).get("state_dict_mapping", {}))


def remap_state_dict(state_dict: dict, mapping: Dict[str, str], prefix: str = "") -> dict:
    """A copy of ``state_dict`` with keys renamed by ``mapping`` (other keys kept).

    ``prefix`` is prepended to both sides (e.g. ``"graph_module."`` when loading
    into an :class:`recopt.OptimizedModel`)."""
    out = {}
    for k, v in state_dict.items():
        bare = k[len(prefix):] if prefix and k.startswith(prefix) else k
        out[prefix + mapping[bare] if bare in mapping else k] = v
    return out


def load_state_dict_from_before_sparse2d(model: nn.Module, state_dict: dict, strict: bool = True):
    """Load a checkpoint saved from the model *before* the sparse2d rewrite.

    ``model`` is the rewritten GraphModule or the OptimizedModel; returns what
    ``load_state_dict`` returns."""
    mapping = state_dict_mapping(model)
    target = getattr(model, "graph_module", model)
    return target.load_state_dict(remap_state_dict(state_dict, mapping), strict=strict)
