"""A paper model of 2D sparse parallelism: per-GPU memory and per-step time for T = 8 … 4096.

Nothing here is measured. It turns a workload (table bytes, pooled width,
batch) and a network (bandwidths, latency) into per-GPU memory and step
time for 1D full sharding (L = T) and 2D (L fixed, G = T / L replicas), so
the trend the paper reports can be reasoned about and the knobs (L, k) compared.
``docs/sparse2d.md`` lists the assumptions and compares the output with the
paper's scaling table.

Model, per GPU and step (weak scaling: ``batch_per_gpu`` samples per GPU):

- **Weights + state:** ``S/L`` bytes of tables + one float32 per local row.
- **Lookup activations:** table-wise tables return ``b·D_tw`` pooled floats per
  rank (constant in L); row-wise tables return partial sums for the whole
  sharding group's batch, ``b·L·D_rw`` floats, before the reduce-scatter —
  this grows with L and is what exhausts memory in 1D at ~1K GPUs. Counted
  twice (forward buffer + its gradient).
- **All-to-all bytes:** ids ``b·ids·8`` + pooled outputs ``b·D_tw·4`` for TW
  and ``b·L·D_rw·4`` for RW, times ``(L−1)/L`` that leaves the GPU; forward
  and backward. Time = ``latency·(L−1)·calls`` + bytes at the intra-host
  bandwidth for the ``(h−1)/(L−1)`` share of peers on the same host (h GPUs
  per host) and at the inter-host bandwidth for the rest.
- **Replica sync (2D only):** ring all-reduce of weights + state,
  ``2·(G−1)/G·(S/L)(1 + 1/dim)`` bytes every ``k`` steps. With the default
  layout a replica group is G consecutive ranks, so it stays inside a host
  while ``G ≤ h`` (intra bandwidth) and crosses hosts beyond.
- **Dense all-reduce:** overlapped with backward (not on the critical path);
  reported only.
- **Step time** = ``compute_s`` + all-to-all + sync/k. QPS = ``T·b/step``.
  A configuration whose memory exceeds ``hbm_bytes`` is marked OOM.

Ignored (all make real systems slower than this model): load imbalance and
stragglers, hierarchical all-to-all, compute/communication overlap of the
lookups, congestion, and the planner's mixed TW/RW/CW/TWRW choices.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Iterable, List, Optional, Sequence

GB = 1e9


@dataclass(frozen=True)
class Workload:
    """Defaults sketch the paper's ExFM-scale model (1.7 TB of embeddings)."""

    embedding_bytes: float = 1.7e12     # S: all tables, fp32
    dim: int = 128                      # typical table width (for the optimizer-state size)
    pooled_dim_table_wise: int = 6144   # D_tw: pooled floats per sample from table-wise tables
    pooled_dim_row_wise: int = 3584     # D_rw: pooled floats per sample from row-wise tables
    ids_per_sample: int = 1000
    batch_per_gpu: int = 512
    dense_param_bytes: float = 4e9
    other_memory_bytes: float = 50e9    # dense model, optimizer, activations, workspace
    compute_s: float = 0.6              # dense forward+backward per step (constant per GPU)


@dataclass(frozen=True)
class Network:
    gpus_per_host: int = 8
    intra_host_bw: float = 150e9        # bytes/s per GPU, all-to-all over NVLink
    inter_host_bw: float = 25e9         # bytes/s per GPU, over the NIC
    latency_s: float = 10e-6            # per peer per collective call
    a2a_calls_per_step: int = 4         # ids + pooled, forward and backward
    hbm_bytes: float = 80e9


@dataclass(frozen=True)
class SimPoint:
    world_size: int
    sharding_group_size: int
    num_replicas: int
    weights_gb: float
    activations_gb: float
    memory_gb: float
    oom: bool
    all_to_all_gb: float
    all_to_all_s: float
    sync_gb: float
    sync_s: float
    dense_all_reduce_gb: float
    step_s: float
    qps: float

    @property
    def label(self) -> str:
        return "1D" if self.num_replicas == 1 else f"2D L={self.sharding_group_size}"


def _a2a_seconds(bytes_out: float, L: int, net: Network) -> float:
    if L <= 1:
        return 0.0
    local_peers = min(net.gpus_per_host, L) - 1
    share_local = local_peers / (L - 1)
    return (net.latency_s * (L - 1) * net.a2a_calls_per_step
            + bytes_out * share_local / net.intra_host_bw + bytes_out * (1 - share_local) / net.inter_host_bw)


def simulate_point(T: int, L: int, w: Workload = Workload(), net: Network = Network(),  # noqa: B008
                   sync_every: int = 1) -> SimPoint:
    """Memory and step time of one (T, L) configuration (see the module doc)."""
    if T % L:
        raise ValueError(f"T={T} is not a multiple of L={L}")
    G, b = T // L, w.batch_per_gpu
    weights = w.embedding_bytes / L * (1 + 1 / w.dim)
    acts = 2 * 4 * b * (w.pooled_dim_table_wise + L * w.pooled_dim_row_wise)
    memory = weights + acts + w.other_memory_bytes
    remote = (L - 1) / L
    per_dir = remote * (b * w.ids_per_sample * 8 / 2 + 4 * b * (w.pooled_dim_table_wise + L * w.pooled_dim_row_wise))
    a2a_bytes = 2 * per_dir
    a2a_s = _a2a_seconds(a2a_bytes, L, net)
    sync_bytes = 2 * (G - 1) / G * weights if G > 1 else 0.0
    sync_bw = net.intra_host_bw if G <= net.gpus_per_host else net.inter_host_bw
    sync_s = (sync_bytes / sync_bw + 2 * (G - 1) * net.latency_s) / sync_every if G > 1 else 0.0
    dense = 2 * (T - 1) / T * w.dense_param_bytes
    step = w.compute_s + a2a_s + sync_s
    return SimPoint(T, L, G, weights / GB, acts / GB, memory / GB, memory > net.hbm_bytes, a2a_bytes / GB, a2a_s,
                    sync_bytes / sync_every / GB, sync_s, dense / GB, step, T * b / step)


def sweep(worlds: Sequence[int] = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
          group_sizes: Sequence[Optional[int]] = (None, 64, 128, 256), w: Workload = Workload(),
          net: Network = Network(), sync_every: int = 1) -> List[SimPoint]:
    """Every (T, L) pair; ``None`` in ``group_sizes`` means 1D (L = T). Pairs with L > T are skipped."""
    out = []
    for L in group_sizes:
        for T in worlds:
            ell = T if L is None else L
            if ell > T or T % ell or (L is not None and ell == T and None in group_sizes):
                continue   # (L = T is the 1D point, listed once)
            out.append(simulate_point(T, ell, w, net, sync_every))
    return out


def scaling_efficiency(points: Iterable[SimPoint], base_world: int = 256) -> dict:
    """``{(label, T): efficiency}``: QPS per GPU relative to 1D full sharding at ``base_world``
    GPUs (the paper's 256-GPU baseline, where both schemes run the same); None if OOM."""
    pts = list(points)
    ref = next((p for p in pts if p.world_size == base_world and p.num_replicas == 1), None)
    if ref is None:
        ref = simulate_point(base_world, base_world)
    out = {}
    for p in pts:
        out[(p.label, p.world_size)] = None if p.oom or ref.oom else (p.qps / p.world_size) / (ref.qps / ref.world_size)
    return out


def format_sweep(points: Sequence[SimPoint], base_world: int = 256) -> str:
    eff = scaling_efficiency(points, base_world)
    head = (f"{'scheme':<11}{'T':>6}{'G':>5}{'mem GB':>9}{'(emb':>7}{'act)':>7}{'a2a GB':>8}{'a2a s':>8}"
            f"{'sync GB':>9}{'sync s':>8}{'step s':>8}{'QPS':>11}{'eff@' + str(base_world):>9}")
    lines = [head, "-" * len(head)]
    for p in points:
        e = eff.get((p.label, p.world_size))
        lines.append(f"{p.label:<11}{p.world_size:>6}{p.num_replicas:>5}"
                     f"{p.memory_gb:>9.1f}{p.weights_gb:>7.1f}{p.activations_gb:>7.1f}"
                     f"{p.all_to_all_gb:>8.2f}{p.all_to_all_s:>8.3f}{p.sync_gb:>9.2f}{p.sync_s:>8.3f}"
                     f"{p.step_s:>8.3f}{('OOM' if p.oom else f'{p.qps:.3g}'):>11}"
                     f"{('-' if e is None else f'{e:.0%}'):>9}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="2D sparse parallelism paper model (not a measurement)")
    ap.add_argument("--sync-every", type=int, default=1)
    ap.add_argument("--group-sizes", default="1d,64,128,256", help="comma list; '1d' = full sharding")
    ap.add_argument("--json", help="also write the points to this JSON file")
    args = ap.parse_args(argv)
    groups = [None if g.strip().lower() == "1d" else int(g) for g in args.group_sizes.split(",")]
    pts = sweep(group_sizes=groups, sync_every=args.sync_every)
    print(f"workload: {Workload()}\nnetwork: {Network()}\nsync every {args.sync_every} step(s)\n")
    print(format_sweep(pts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(p) for p in pts], f, indent=1)


if __name__ == "__main__":
    main()
