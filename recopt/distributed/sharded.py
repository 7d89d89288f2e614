"""shard_2d: place a model's TorchRec collections on T = L × G ranks (docs/sparse2d.md).

Called inside every rank after ``torch.distributed`` is initialised. The model
is a module that contains TorchRec ``EmbeddingBagCollection`` /
``EmbeddingCollection`` modules — a model written with TorchRec, or the output
of ``recopt.optimize(..., passes=[..., "sparse2d"])``.

- **CUDA** (NCCL): TorchRec's own ``DMPCollection`` does everything (process
  groups, plan remap, DDP for dense parameters, ``sync()``).
- **CPU** (gloo): ``DMPCollection`` asserts a CUDA/MTIA device, so the same
  layout is composed from TorchRec parts: ``DeviceMesh`` process groups,
  ``ShardingEnv2D``, the plan remapped to global ranks, and plain
  ``DistributedModelParallel``; the replica sync is an average over the
  replica group of every TBE's weights and row-wise AdaGrad state.

Embedding tables train with FBGEMM's fused ``EXACT_ROWWISE_ADAGRAD`` inside
backward; with ``momentum_scaling=True`` its learning rate and ε are scaled by
√G, which is :class:`recopt.optim.MomentumScaledRowWiseAdagrad` with
``replicas=G`` (see :func:`recopt.optim.fbgemm_rowwise_adagrad_params`).
Dense parameters are data parallel (DDP) over all T ranks; give them any
``torch.optim`` optimizer over :meth:`Sharded2DModel.dense_parameters`.

Training step on every rank::

    loss = loss_fn(model(*local_batch), labels)   # local batch: 1/T of the global batch
    loss.backward()                               # embedding rows update here (fused)
    model.maybe_sync()                            # replica average every sync_every steps
    dense_opt.step(); dense_opt.zero_grad()
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import require
from .plan import Layout2D, TableShard, TableSpec, check_layout, format_plan, place_tables


def _torchrec():
    require("torchrec", "rec", "2D sparse parallelism (recopt.distributed)")
    require("fbgemm_gpu", "rec", "2D sparse parallelism (recopt.distributed)")
    import torchrec

    return torchrec


def find_collections(model: nn.Module) -> Dict[str, nn.Module]:
    """``{fqn: module}`` of the TorchRec embedding collections in ``model`` (outermost only)."""
    _torchrec()
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    out: Dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection)) and not any(
                name.startswith(p + ".") for p in out):
            out[name] = m
    return out


def table_specs(collection: nn.Module) -> List[TableSpec]:
    """:class:`~recopt.distributed.plan.TableSpec` for each table of a TorchRec collection."""
    configs = collection.embedding_bag_configs() if hasattr(collection, "embedding_bag_configs") \
        else collection.embedding_configs()
    out = []
    for c in configs:
        pooling = getattr(getattr(c, "pooling", None), "name", "none").lower()
        out.append(TableSpec(c.name, c.num_embeddings, c.embedding_dim, 4, pooling, len(c.feature_names),
                             float(len(c.feature_names))))
    return out


def _generator(shard: TableShard, layout: Layout2D):
    from torchrec.distributed.sharding_plan import column_wise, row_wise, table_wise

    if shard.sharding_type == "table_wise":
        (r,) = shard.shards
        return table_wise(rank=r, compute_kernel="fused")
    if shard.sharding_type == "row_wise":
        return row_wise(compute_kernel="fused")
    return column_wise(ranks=sorted(shard.shards), compute_kernel="fused")


def make_plan(model: nn.Module, layout: Layout2D, sharding_types=None, sharders=None, device_type: str = "cpu"):
    """A TorchRec ``ShardingPlan`` for one sharding group (world of size L), plus our placements.

    Returns ``(plan, {fqn: [TableShard]})``. Tables are placed by
    :func:`recopt.distributed.plan.place_tables`; the per-table plans are
    built with TorchRec's ``construct_module_sharding_plan``.
    """
    _torchrec()
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan
    from torchrec.distributed.types import ShardingPlan

    L = layout.sharding_group_size
    plan, placements = {}, {}
    sharder_by_type = {s.module_type: s for s in (sharders or [])}
    for fqn, coll in find_collections(model).items():
        shards = place_tables(table_specs(coll), L, sharding_types)
        placements[fqn] = shards
        plan[fqn] = construct_module_sharding_plan(
            coll, {s.table.name: _generator(s, layout) for s in shards},
            sharder=sharder_by_type.get(type(coll)), local_size=L, world_size=L, device_type=device_type)
    return ShardingPlan(plan), placements


def remap_plan(plan, layout: Layout2D, rank: int, device_type: str) -> None:
    """Rewrite, in place, a plan made for shard ranks 0..L−1 to the global ranks of ``rank``'s
    sharding group (``ParameterSharding.ranks`` and every shard placement)."""
    from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
    from torch.distributed.remote_device import _remote_device

    local = max(1, torch.cuda.device_count()) if device_type == "cuda" else 1
    for module_plan in plan.plan.values():
        for ps in module_plan.values():
            ps.ranks = [layout.remap(r, rank) for r in ps.ranks] if ps.ranks else ps.ranks
            spec = ps.sharding_spec
            if isinstance(spec, EnumerableShardingSpec):
                for shard in spec.shards:
                    g = layout.remap(shard.placement.rank(), rank)
                    dev = f"{device_type}:{g % local}" if device_type == "cuda" else device_type
                    shard.placement = _remote_device(f"rank:{g}/{dev}")


def _sharders(fused_params: dict):
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    return [EmbeddingBagCollectionSharder(fused_params=dict(fused_params)),
            EmbeddingCollectionSharder(fused_params=dict(fused_params))]


def _tbes(module: nn.Module) -> list:
    """The FBGEMM TBE kernels under ``module``'s sharded collections (they sit in ``_lookups``,
    which are not registered submodules), each once."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

    return _find_in_lookups(module, lambda sub: isinstance(sub, SplitTableBatchedEmbeddingBagsCodegen))


class Sharded2DModel(nn.Module):
    """One rank's part of a 2D-sharded model (returned by :func:`shard_2d`).

    Call it like the original model on this rank's local batch. Attributes:
    ``layout`` (:class:`~recopt.distributed.plan.Layout2D`), ``dmp`` (the
    TorchRec ``DistributedModelParallel``/``DMPCollection``), ``plan``
    (remapped TorchRec plan), ``placements``, ``sharding_pg``, ``replica_pg``,
    ``sync_every``, ``steps`` (backward steps seen by :meth:`maybe_sync`).
    """

    def __init__(self, dmp, layout, plan, placements, sharding_pg, replica_pg, sync_every, fused_params,
                 dense_param_bytes, uses_dmp_collection):
        super().__init__()
        self.dmp = dmp
        self.layout, self.plan, self.placements = layout, plan, placements
        self.sharding_pg, self.replica_pg = sharding_pg, replica_pg
        self.sync_every, self.steps = sync_every, 0
        self.fused_params = fused_params
        self.dense_param_bytes = dense_param_bytes
        self._uses_dmp_collection = uses_dmp_collection

    def forward(self, *args, **kwargs):
        return self.dmp(*args, **kwargs)

    def dense_parameters(self) -> List[nn.Parameter]:
        """Parameters outside the sharded collections (DDP-averaged over all T ranks)."""
        from torchrec.distributed.types import ShardedModule

        sharded = {id(p) for m in self.dmp.modules() if isinstance(m, ShardedModule) for p in m.parameters()}
        sharded |= {id(p) for t in _tbes(self.dmp) for p in t.parameters()}
        return [p for p in self.dmp.parameters() if id(p) not in sharded and p.requires_grad]

    # -- replica sync
    def sync_tensors(self, include_optimizer_state: bool = True) -> List[torch.Tensor]:
        """The tensors a sync averages: every local TBE table's weights, then its ``"sum"`` state."""
        out: List[torch.Tensor] = []
        for tbe in _tbes(self.dmp):
            out.extend(tbe.split_embedding_weights())
            if include_optimizer_state:
                out.extend(s["sum"] for s in tbe.get_optimizer_state() if "sum" in s)
        return out

    @torch.no_grad()
    def sync(self, include_optimizer_state: bool = True) -> None:
        """Average embedding weights (and AdaGrad state) over this rank's replica group."""
        if self.layout.num_replicas == 1:
            return
        if self._uses_dmp_collection:
            self.dmp.sync(include_optimizer_state=include_optimizer_state)
            return
        by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
        for t in self.sync_tensors(include_optimizer_state):
            by_dtype.setdefault(t.dtype, []).append(t)
        G = self.layout.num_replicas
        for tensors in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.replica_pg)
            flat.div_(G)
            offset = 0
            for t in tensors:
                n = t.numel()
                t.copy_(flat[offset: offset + n].view_as(t))
                offset += n

    def maybe_sync(self, include_optimizer_state: bool = True) -> bool:
        """Count a step; sync when ``steps % sync_every == 0``. Call after ``backward()``.
        Returns whether it synced."""
        self.steps += 1
        if self.sync_every and self.steps % self.sync_every == 0:
            self.sync(include_optimizer_state)
            return True
        return False

    # -- introspection
    def local_embedding_bytes(self) -> int:
        """Bytes of embedding weights held by this rank."""
        return sum(w.numel() * w.element_size() for t in _tbes(self.dmp) for w in t.split_embedding_weights())

    def local_table_shards(self) -> Dict[tuple, torch.Tensor]:
        """``{(table, row offset, col offset): tensor}``: views of this rank's table shards."""
        out = {}
        for kernel in _embedding_kernels(self.dmp):
            for table, w in zip(kernel.config.embedding_tables, kernel.split_embedding_weights()):
                (r0, c0) = table.local_metadata.shard_offsets
                out[(table.name, r0, c0)] = w
        return out

    def local_optimizer_state_bytes(self) -> int:
        return sum(s["sum"].numel() * s["sum"].element_size()
                   for t in _tbes(self.dmp) for s in t.get_optimizer_state() if "sum" in s)

    def describe(self, batch_size_per_rank: int = 1) -> str:
        """The printed plan (see :func:`recopt.distributed.plan.format_plan`)."""
        shards = [s for ss in self.placements.values() for s in ss]
        return format_plan(shards, self.layout, batch_size_per_rank, self.dense_param_bytes, self.sync_every)


def _embedding_kernels(module: nn.Module) -> list:
    """TorchRec's batched embedding kernels (one per TBE): each has ``config.embedding_tables``
    (with each table's ``local_metadata``) and ``split_embedding_weights()`` in the same order."""
    return _find_in_lookups(module, lambda sub: hasattr(sub, "emb_module") and hasattr(
        sub, "split_embedding_weights") and hasattr(sub, "config"))


def _find_in_lookups(module: nn.Module, match) -> list:
    """Modules under ``module`` for which ``match(sub)`` holds, each once, also inside
    TorchRec's ``_lookups`` (which are not registered submodules)."""
    found, seen = [], set()

    def visit(m: nn.Module) -> None:
        for sub in m.modules():
            if id(sub) not in seen and match(sub):
                seen.add(id(sub))
                found.append(sub)
            for lookup in getattr(sub, "_lookups", None) or []:
                if isinstance(lookup, nn.Module) and lookup is not sub:
                    visit(lookup)

    visit(module)
    return found


def _copy_weights_into_shards(dmp: nn.Module, full_tables: Dict[str, torch.Tensor]) -> None:
    """Load full-table weights (``{table name: [rows, dim]}``) into this rank's shards.

    Works from each kernel's shard metadata, so it is the same on CPU (ShardedTensor
    state) and CUDA (DTensor state)."""
    with torch.no_grad():
        for kernel in _embedding_kernels(dmp):
            for table, w in zip(kernel.config.embedding_tables, kernel.split_embedding_weights()):
                full = full_tables.get(table.name)
                md = table.local_metadata
                if full is None or md is None:
                    continue
                (r0, c0), (nr, nc) = md.shard_offsets, md.shard_sizes
                w.copy_(full[r0:r0 + nr, c0:c0 + nc].to(w.dtype))


def describe_plan(model: nn.Module, *, world_size: int, sharding_group_size: int, batch_size_per_rank: int,
                  sync_every: int = 1, sharding_types=None, inter_host_allreduce: bool = False,
                  example_inputs=None) -> str:
    """The plan :func:`shard_2d` would make, printed without starting any process.

    Same placement rules and cost model as :meth:`Sharded2DModel.describe`;
    ``example_inputs`` runs the ``sparse2d`` pass first for a plain model."""
    _torchrec()
    layout = Layout2D(world_size, sharding_group_size, inter_host_allreduce)
    module = getattr(model, "graph_module", model)
    if not find_collections(module) and example_inputs is not None:
        from ..api import optimize

        module = optimize(module, example_inputs, target="cpu", passes=["sparse2d"], backend="eager",
                          strict=True).graph_module
    collections = find_collections(module)
    if not collections:
        raise ValueError("the model has no TorchRec collection; pass example_inputs= to run the sparse2d pass")
    shards = [s for c in collections.values() for s in place_tables(table_specs(c), sharding_group_size,
                                                                     sharding_types)]
    dense = sum(p.numel() * p.element_size() for n, p in module.named_parameters()
                if not any(n.startswith(f + ".") for f in collections))
    return format_plan(shards, layout, batch_size_per_rank, dense, sync_every)


def shard_2d(model: nn.Module, *, sharding_group_size: int, world_size: Optional[int] = None,
             sync_every: int = 1, lr: float = 0.01, eps: float = 1e-8, momentum_scaling: bool = True,
             weight_decay: float = 0.0, sharding_types=None, device: Optional[torch.device] = None,
             inter_host_allreduce: bool = False, keep_weights: bool = True,
             example_inputs=None) -> Sharded2DModel:
    """Shard ``model``'s TorchRec collections 2D over the default process group (docs/sparse2d.md).

    - ``model``: an ``nn.Module`` holding TorchRec ``EmbeddingBagCollection`` /
      ``EmbeddingCollection`` modules, or a :class:`recopt.OptimizedModel`
      whose graph came out of the ``sparse2d`` pass. It is deep-copied; the
      caller's model is left alone.
    - ``sharding_group_size``: L; ``world_size``: T (default: the process
      group's size; a mismatch is an error). G = T / L replicas.
    - ``sync_every``: k, average embedding weights + AdaGrad state over the
      replica group every k calls of :meth:`Sharded2DModel.maybe_sync`.
    - ``lr``, ``eps``, ``weight_decay``: the row-wise AdaGrad of the tables;
      ``momentum_scaling``: divide the accumulator by G (fused ``lr·√G``, ``eps·√G``).
    - ``sharding_types``: None (auto: big tables row-wise, others table-wise,
      balanced), ``"table_wise"|"row_wise"|"column_wise"``, or ``{table: type}``.
    - ``device``: defaults to ``cuda:<local rank>`` with NCCL, else CPU.
    - ``keep_weights``: copy the model's current table weights into the shards
      (otherwise TorchRec's initialisation is kept). Collections built on the
      ``meta`` device are never materialised in full: TorchRec initialises
      their shards (the way to shard tables larger than one rank's memory).
    - ``example_inputs``: for a plain model (``nn.EmbeddingBag`` tables, no
      TorchRec collection yet): the ``sparse2d`` pass is run first with them.
    """
    _torchrec()
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_2d runs inside each rank after torch.distributed is initialised: "
                           "use recopt.distributed.launch(...) or torchrun + recopt.distributed.init_from_env()")
    T = dist.get_world_size()
    if world_size is not None and world_size != T:
        raise ValueError(f"world_size={world_size} but the process group has {T} ranks")
    check_layout(T, sharding_group_size)
    if sync_every < 1:
        raise ValueError(f"sync_every must be >= 1, got {sync_every}")
    layout = Layout2D(T, sharding_group_size, inter_host_allreduce)
    rank = dist.get_rank()
    backend = dist.get_backend()
    if device is None:
        device = torch.device(f"cuda:{torch.cuda.current_device()}") if backend == "nccl" else torch.device("cpu")

    from ..optim import fbgemm_rowwise_adagrad_params

    G = layout.num_replicas
    fused = fbgemm_rowwise_adagrad_params(lr, eps, G if momentum_scaling else 1, weight_decay)
    module = getattr(model, "graph_module", model)
    if not find_collections(module) and example_inputs is not None:
        from ..api import optimize

        module = optimize(module, example_inputs, target="cpu", passes=["sparse2d"], backend="eager",
                          strict=True).graph_module
    module = copy.deepcopy(module)
    if not find_collections(module):
        raise ValueError("the model has no TorchRec EmbeddingBagCollection/EmbeddingCollection to shard; "
                         "pass example_inputs= (or run recopt.optimize(model, example_inputs, "
                         "passes=['default', 'sparse2d']) first) to gather plain nn.EmbeddingBag tables "
                         "into one collection")
    originals: Dict[str, torch.Tensor] = {}
    for fqn, coll in find_collections(module).items():
        holder = getattr(coll, "embedding_bags", None) or getattr(coll, "embeddings")
        for name, table in holder.items():
            if table.weight.is_meta or not keep_weights:
                continue   # meta: TorchRec initialises the shards; nothing to copy
            if name in originals:
                raise ValueError(f"table name {name!r} appears in two collections; shard_2d needs unique "
                                 "table names across the model's collections")
            originals[name] = table.weight.detach().clone()
    sharders = _sharders(fused)
    plan, placements = make_plan(module, layout, sharding_types, sharders, device.type)
    dense_param_bytes = sum(p.numel() * p.element_size() for n, p in module.named_parameters()
                            if not any(n.startswith(f + ".") for f in placements))

    from torchrec.distributed.model_parallel import DistributedModelParallel

    if device.type == "cuda":
        from torchrec.distributed.model_parallel import DMPCollection

        dmp = DMPCollection(module=module, device=device, plan=plan, world_size=T,
                            sharding_group_size=sharding_group_size, global_pg=dist.group.WORLD,
                            sharders=sharders, use_inter_host_allreduce=inter_host_allreduce)
        sharding_pg, replica_pg = dmp._default_ctx.sharding_pg, dmp._default_ctx.replica_pg
        uses_collection = True
    else:
        from torch.distributed.device_mesh import DeviceMesh
        from torchrec.distributed.types import ShardingEnv2D

        mesh = DeviceMesh(device.type, layout.peer_matrix, mesh_dim_names=("replicate", "shard"))
        sharding_pg, replica_pg = mesh.get_group("shard"), mesh.get_group("replicate")
        remap_plan(plan, layout, rank, device.type)
        env = ShardingEnv2D(sharding_pg=sharding_pg, replica_pg=replica_pg, global_pg=dist.group.WORLD,
                            device_mesh=mesh, use_inter_host_allreduce=inter_host_allreduce)
        dmp = DistributedModelParallel(module, env=env, device=device, plan=plan, sharders=sharders)
        uses_collection = False
    if keep_weights:
        _copy_weights_into_shards(dmp, originals)
    return Sharded2DModel(dmp, layout, plan, placements, sharding_pg, replica_pg, sync_every, fused,
                          dense_param_bytes, uses_collection)
