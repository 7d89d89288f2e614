"""The 2D layout T = L × G, the plan remap, and the printed plan with its costs.

Pure Python (no TorchRec, no process groups), so a plan can be inspected on a
laptop before any job starts.

**Layout** (TorchRec ``DMPCollection``'s default): ``T`` ranks,
sharding-group size ``L``, ``G = T // L`` replica groups; ``step = G``::

    sharding group g ∈ [0, G): ranks [g, G+g, 2G+g, …, (L−1)G+g]   (lookup all-to-alls)
    replica  group r ∈ [0, L): ranks [rG, rG+1, …, rG+G−1]           (weight/state all-reduce)

so a shard rank ``s`` of sharding group ``g`` is global rank ``s·G + g``.
With ``inter_host_allreduce=True`` the sharding groups are contiguous
(``[gL … gL+L−1]``) and a shard rank maps to ``s + g·L``.

**Costs** (per rank, per training step; bytes):

- embedding memory: this rank's shards of every table (rows × dim × dtype) plus
  row-wise AdaGrad state (one float32 per local row);
- lookup all-to-all: ids out (input dist) + pooled embeddings back (output
  dist) in forward, and the pooled gradients in backward; only the fraction
  ``(L−1)/L`` that leaves the rank counts. Per table and sample:
  ``ids·(index bytes)`` + ``2·dim·4``;
- replica sync all-reduce (every ``k`` steps, amortised per step): a ring
  all-reduce moves ``2·(G−1)/G`` × (local embedding + optimizer-state bytes);
- dense data-parallel all-reduce: ``2·(T−1)/T`` × dense parameter bytes
  (the same for every L).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise")


class LayoutError(ValueError):
    """World size and sharding-group size that do not form a T = L × G layout."""


@dataclass(frozen=True)
class Layout2D:
    """Which global ranks shard together and which replicate each other."""

    world_size: int
    sharding_group_size: int
    inter_host_allreduce: bool = False

    def __post_init__(self):
        check_layout(self.world_size, self.sharding_group_size)

    @property
    def num_replicas(self) -> int:
        """G, the number of replica groups (copies of every table)."""
        return self.world_size // self.sharding_group_size

    @property
    def peer_matrix(self) -> List[List[int]]:
        """G rows (sharding groups) of L global ranks; column s holds the replicas of shard rank s."""
        L, G = self.sharding_group_size, self.num_replicas
        return [[self.global_rank(g, s) for s in range(L)] for g in range(G)]

    def global_rank(self, sharding_group: int, shard_rank: int) -> int:
        L, G = self.sharding_group_size, self.num_replicas
        if self.inter_host_allreduce:
            return sharding_group * L + shard_rank
        return shard_rank * G + sharding_group

    def sharding_group_of(self, rank: int) -> int:
        return rank // self.sharding_group_size if self.inter_host_allreduce else rank % self.num_replicas

    def shard_rank_of(self, rank: int) -> int:
        return rank % self.sharding_group_size if self.inter_host_allreduce else rank // self.num_replicas

    def sharding_group(self, rank: int) -> List[int]:
        return self.peer_matrix[self.sharding_group_of(rank)]

    def replica_group(self, rank: int) -> List[int]:
        s = self.shard_rank_of(rank)
        return [row[s] for row in self.peer_matrix]

    def remap(self, shard_rank: int, rank: int) -> int:
        """The global rank holding ``shard_rank``'s shard in ``rank``'s sharding group."""
        return self.global_rank(self.sharding_group_of(rank), shard_rank)


def check_layout(world_size: int, sharding_group_size: int) -> None:
    """Raise :class:`LayoutError` unless ``world_size = L × G`` with positive integers."""
    for name, v in (("world_size", world_size), ("sharding_group_size", sharding_group_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise LayoutError(f"{name} must be a positive integer, got {v!r}")
    if world_size % sharding_group_size:
        raise LayoutError(
            f"world_size={world_size} is not a multiple of sharding_group_size={sharding_group_size}: "
            f"2D parallelism needs T = L × G (G whole replicas of an L-rank sharding group); "
            f"choose L among {[d for d in range(1, world_size + 1) if world_size % d == 0]}")


# ----------------------------------------------------------------------------- tables and shards

@dataclass(frozen=True)
class TableSpec:
    """One embedding table as the planner sees it.

    ``ids_per_sample``: average ids one sample looks up in this table (summed
    over the table's features); ``features``: how many pooled outputs it
    produces per sample (one per feature).
    """

    name: str
    rows: int
    dim: int
    dtype_bytes: int = 4
    pooling: str = "sum"
    features: int = 1
    ids_per_sample: float = 1.0

    @property
    def bytes(self) -> int:
        return self.rows * self.dim * self.dtype_bytes


@dataclass(frozen=True)
class TableShard:
    """A table's placement inside one sharding group: shard rank → (rows, cols)."""

    table: TableSpec
    sharding_type: str
    shards: Dict[int, tuple]        # shard rank -> (rows, cols) held there

    def bytes_on(self, shard_rank: int) -> int:
        r, c = self.shards.get(shard_rank, (0, 0))
        return r * c * self.table.dtype_bytes

    def state_bytes_on(self, shard_rank: int) -> int:
        """Row-wise AdaGrad state: one float32 per local row (per column shard, too)."""
        r, _ = self.shards.get(shard_rank, (0, 0))
        return r * 4


def even_split(n: int, parts: int) -> List[int]:
    """``n`` split into ``parts`` near-equal ints, larger first (TorchRec's row-wise split)."""
    block = -(-n // parts)
    out, left = [], n
    for _ in range(parts):
        take = max(0, min(block, left))
        out.append(take)
        left -= take
    return out


def place_tables(tables: Sequence[TableSpec], sharding_group_size: int,
                 sharding_types: Optional[object] = None,
                 row_wise_threshold_bytes: Optional[int] = None) -> List[TableShard]:
    """Place tables on the L shard ranks of one sharding group.

    ``sharding_types``: None (auto), one of :data:`SHARDING_TYPES` for all
    tables, or ``{table name: type}``. Auto: a table larger than
    ``row_wise_threshold_bytes`` (default: total bytes / L) is row-wise over
    all L ranks; the others are table-wise, largest first, on the rank with
    the fewest bytes so far (ties → lowest rank). Column-wise splits the dim
    into L near-equal slices. ``tables`` are one collection: if a mean-pooled
    table ends up row-wise, every table of the collection is made row-wise
    (auto) or the request is refused (explicit), see
    :func:`_avoid_mixed_mean_row_wise`.
    """
    L = sharding_group_size
    total = sum(t.bytes for t in tables)
    threshold = row_wise_threshold_bytes if row_wise_threshold_bytes is not None else total / max(L, 1)
    per_table = {}
    for t in tables:
        if sharding_types is None:
            st = "row_wise" if L > 1 and t.bytes > threshold else "table_wise"
        elif isinstance(sharding_types, str):
            st = sharding_types
        else:
            st = dict(sharding_types).get(t.name, "table_wise")
        if st not in SHARDING_TYPES:
            raise ValueError(f"sharding type {st!r} for table {t.name!r}; valid: {SHARDING_TYPES}")
        if st == "column_wise" and t.dim < L:
            raise ValueError(f"table {t.name!r} has dim {t.dim} < L={L}: it cannot be split column-wise over L ranks")
        per_table[t.name] = st
    _avoid_mixed_mean_row_wise(tables, per_table, explicit=sharding_types is not None)
    load = [0] * L
    out: Dict[str, TableShard] = {}
    for t in sorted(tables, key=lambda t: (-t.bytes, t.name)):
        st = per_table[t.name]
        if st == "table_wise":
            r = min(range(L), key=lambda i: (load[i], i))
            shards = {r: (t.rows, t.dim)}
        elif st == "row_wise":
            shards = {i: (n, t.dim) for i, n in enumerate(even_split(t.rows, L)) if n}
        else:
            shards = {i: (t.rows, n) for i, n in enumerate(even_split(t.dim, L)) if n}
        for i in shards:
            load[i] += shards[i][0] * shards[i][1] * t.dtype_bytes
        out[t.name] = TableShard(t, st, shards)
    return [out[t.name] for t in tables]


def _avoid_mixed_mean_row_wise(tables: Sequence[TableSpec], per_table: Dict[str, str], explicit: bool) -> None:
    """Work around a TorchRec (1.8.0) limitation, measured on gloo: in a collection with a
    mean-pooled row-wise table, TorchRec divides the output of *every* non-row-wise table by its
    bag lengths (a table-wise sum table comes out as a mean; a table-wise mean table is divided
    twice). So such a collection is placed all row-wise (auto), or refused (explicit types)."""
    mean_rw = [t.name for t in tables if t.pooling == "mean" and per_table[t.name] == "row_wise"]
    others = [t.name for t in tables if per_table[t.name] != "row_wise"]
    if not mean_rw or not others:
        return
    if explicit:
        raise ValueError(
            f"mean-pooled table(s) {mean_rw} are row-wise while {others} are not, in one collection: "
            "TorchRec then divides the other tables' outputs by their bag lengths (wrong results). "
            "Make every table of this collection row-wise, or none of its mean-pooled tables")
    for name in others:
        per_table[name] = "row_wise"


# ----------------------------------------------------------------------------- costs and the printed plan

@dataclass
class PlanCosts:
    """Per-rank memory and per-step communication of one (T, L) layout."""

    world_size: int
    sharding_group_size: int
    embedding_bytes: List[int]          # per shard rank (same for every replica)
    optimizer_state_bytes: List[int]
    all_to_all_bytes: float             # per rank per step, forward + backward
    replica_all_reduce_bytes: float     # per rank per step, amortised over sync_every
    dense_all_reduce_bytes: float       # per rank per step

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.sharding_group_size

    @property
    def max_rank_bytes(self) -> int:
        return max(e + s for e, s in zip(self.embedding_bytes, self.optimizer_state_bytes))


def plan_costs(shards: Sequence[TableShard], world_size: int, sharding_group_size: int,
               batch_size_per_rank: int, dense_param_bytes: int = 0, sync_every: int = 1,
               include_optimizer_state: bool = True, index_bytes: int = 8) -> PlanCosts:
    """Memory and communication per rank for a placement (see the module doc for the model)."""
    check_layout(world_size, sharding_group_size)
    if sync_every < 1:
        raise ValueError(f"sync_every must be >= 1, got {sync_every}")
    L, G, T, B = sharding_group_size, world_size // sharding_group_size, world_size, batch_size_per_rank
    emb = [sum(s.bytes_on(r) for s in shards) for r in range(L)]
    state = [sum(s.state_bytes_on(r) for s in shards) if include_optimizer_state else 0 for r in range(L)]
    remote = (L - 1) / L
    a2a = 0.0
    for s in shards:
        t = s.table
        ids = B * t.ids_per_sample * index_bytes
        pooled = B * t.features * t.dim * 4
        # TW/CW: ids go to the owning rank and pooled [B, dim] come back (grads in backward);
        # RW: ids go to the row owner and partial sums come back reduce-scattered: same volume.
        a2a += remote * (ids + 2 * pooled)
    local = max(e + st for e, st in zip(emb, state))
    replica = 2 * (G - 1) / G * local / sync_every if G > 1 else 0.0
    dense = 2 * (T - 1) / T * dense_param_bytes if T > 1 else 0.0
    return PlanCosts(T, L, emb, state, a2a, replica, dense)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def format_plan(shards: Sequence[TableShard], layout: Layout2D, batch_size_per_rank: int,
                dense_param_bytes: int = 0, sync_every: int = 1) -> str:
    """The printed plan: per table (type, global ranks of sharding group 0, bytes per rank), per
    rank memory, and per-step communication for this L, G against full sharding (G = 1)."""
    T, L, G = layout.world_size, layout.sharding_group_size, layout.num_replicas
    lines = [f"2D sparse plan: T={T} ranks = L={L} (sharding group) x G={G} (replicas), "
             f"sync every {sync_every} step(s), {batch_size_per_rank} samples per rank",
             f"  sharding groups: {layout.peer_matrix}",
             f"  replica groups:  {[layout.replica_group(layout.global_rank(0, s)) for s in range(L)]}",
             "", f"  {'table':<28}{'rows':>10}{'dim':>6}  {'type':<12}{'ranks (group 0)':<22}{'bytes/rank':>12}"]
    for s in shards:
        ranks = [layout.global_rank(0, r) for r in sorted(s.shards)]
        per = human_bytes(max(s.bytes_on(r) for r in s.shards))
        lines.append(f"  {s.table.name:<28}{s.table.rows:>10}{s.table.dim:>6}  {s.sharding_type:<12}"
                     f"{str(ranks):<22}{per:>12}")
    cost = plan_costs(shards, T, L, batch_size_per_rank, dense_param_bytes, sync_every)
    lines += ["", f"  {'rank':<8}{'shard rank':>11}{'embeddings':>14}{'adagrad state':>15}{'total':>14}"]
    for rank in range(T):
        r = layout.shard_rank_of(rank)
        e, st = cost.embedding_bytes[r], cost.optimizer_state_bytes[r]
        lines.append(f"  {rank:<8}{r:>11}{human_bytes(e):>14}{human_bytes(st):>15}{human_bytes(e + st):>14}")
    one_d = plan_costs(place_tables([s.table for s in shards], T,
                                    {s.table.name: s.sharding_type for s in shards}),
                       T, T, batch_size_per_rank, dense_param_bytes, sync_every)
    lines += ["", f"  per rank per step     {'this plan (G=' + str(G) + ')':>20}{'full sharding (G=1)':>22}"]
    for label, a, b in (("all-to-all", cost.all_to_all_bytes, one_d.all_to_all_bytes),
                        ("replica all-reduce", cost.replica_all_reduce_bytes, one_d.replica_all_reduce_bytes),
                        ("dense all-reduce", cost.dense_all_reduce_bytes, one_d.dense_all_reduce_bytes),
                        ("max embedding+state", cost.max_rank_bytes, one_d.max_rank_bytes)):
        lines.append(f"  {label:<22}{human_bytes(a):>20}{human_bytes(b):>22}")
    return "\n".join(lines)
