"""Layout, placement, costs and the paper-model simulation (pure Python, no process groups)."""
import pytest

from recopt.distributed import Layout2D, LayoutError, TableSpec, check_layout, format_plan, place_tables, plan_costs
from recopt.distributed import simulate


def test_default_layout_matches_torchrec_dmpcollection():
    lay = Layout2D(8, 4)   # the blog's 2 hosts x 4 GPUs, L=4, G=2
    assert lay.num_replicas == 2
    assert lay.peer_matrix == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert [lay.replica_group(r) for r in (0, 2, 4, 6)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.sharding_group(5) == [1, 3, 5, 7] and lay.shard_rank_of(5) == 2
    # a plan made for shard ranks 0..3 lands on rank 5's group as s*G + 1
    assert [lay.remap(s, 5) for s in range(4)] == [1, 3, 5, 7]


def test_inter_host_layout_uses_contiguous_sharding_groups():
    lay = Layout2D(8, 4, inter_host_allreduce=True)
    assert lay.peer_matrix == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lay.replica_group(1) == [1, 5] and [lay.remap(s, 6) for s in range(4)] == [4, 5, 6, 7]


@pytest.mark.parametrize("T,L", [(6, 4), (4, 0), (0, 1), (4, 8)])
def test_bad_layouts_are_rejected_with_the_valid_choices(T, L):
    with pytest.raises(LayoutError):
        check_layout(T, L)


def test_layout_error_lists_valid_group_sizes():
    with pytest.raises(LayoutError, match=r"choose L among \[1, 2, 3, 6\]"):
        check_layout(6, 4)


def test_auto_placement_balances_and_splits_big_tables_row_wise():
    tables = [TableSpec("big", 1000, 8), TableSpec("a", 100, 8), TableSpec("b", 100, 8), TableSpec("c", 50, 8)]
    shards = {s.table.name: s for s in place_tables(tables, 2)}
    assert shards["big"].sharding_type == "row_wise" and shards["big"].shards == {0: (500, 8), 1: (500, 8)}
    tw = {n: next(iter(shards[n].shards)) for n in ("a", "b", "c")}
    assert tw["a"] != tw["b"]          # greedy: the two equal tables on different ranks
    cw = place_tables([TableSpec("t", 10, 6)], 4, "column_wise")[0]
    assert cw.shards == {0: (10, 2), 1: (10, 2), 2: (10, 2)}   # 6 columns in blocks of 2
    with pytest.raises(ValueError, match="sharding type"):
        place_tables(tables, 2, "grid")


def test_costs_per_rank_memory_is_total_over_L_and_sync_grows_with_G():
    tables = [TableSpec(f"t{i}", 64, 4) for i in range(4)]
    total = sum(t.bytes for t in tables)
    for T, L in ((4, 4), (4, 2), (8, 2)):
        c = plan_costs(place_tables(tables, L), T, L, batch_size_per_rank=16, dense_param_bytes=1000)
        assert c.embedding_bytes == [total // L] * L
        assert c.optimizer_state_bytes == [4 * 64 * 4 // L] * L
    one_d = plan_costs(place_tables(tables, 4), 4, 4, 16)
    two_d = plan_costs(place_tables(tables, 2), 4, 2, 16)
    assert one_d.replica_all_reduce_bytes == 0 and two_d.replica_all_reduce_bytes > 0
    assert two_d.all_to_all_bytes < one_d.all_to_all_bytes      # fewer remote peers


def test_printed_plan_has_tables_ranks_memory_and_comm_vs_full_sharding():
    tables = [TableSpec("user", 1000, 16), TableSpec("item", 500, 16)]
    text = format_plan(place_tables(tables, 2), Layout2D(4, 2), batch_size_per_rank=32, dense_param_bytes=4096)
    for needle in ("T=4 ranks = L=2", "user", "row_wise", "table_wise", "adagrad state", "all-to-all",
                   "replica all-reduce", "full sharding (G=1)", "sharding groups: [[0, 2], [1, 3]]"):
        assert needle in text, needle


def test_simulation_reproduces_the_papers_qualitative_trend():
    pts = simulate.sweep(group_sizes=(None, 256), sync_every=8)
    eff = simulate.scaling_efficiency(pts)
    one_d = {p.world_size: p for p in pts if p.num_replicas == 1}
    two_d = {p.world_size: p for p in pts if p.num_replicas > 1}
    assert one_d[4096].oom and not two_d[4096].oom              # 1D runs out of memory at scale
    assert eff[("2D L=256", 4096)] > 0.85                       # 2D near-linear (paper: 90%)
    assert eff[("1D", 1024)] < eff[("2D L=256", 1024)]
    # 1D activations grow with T; 2D's stay at their L=256 value
    assert one_d[1024].activations_gb > 3 * two_d[1024].activations_gb
    assert len({round(p.memory_gb, 6) for p in two_d.values()}) == 1
    text = simulate.format_sweep(pts)
    assert "OOM" in text and "2D L=256" in text


def test_simulation_rejects_non_divisible_worlds():
    with pytest.raises(ValueError):
        simulate.simulate_point(100, 64)


def test_missing_torchrec_names_the_extra(monkeypatch):
    import sys

    from recopt.distributed import sharded
    from recopt.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "torchrec", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'recopt\[rec\]'"):
        sharded.shard_2d(object(), sharding_group_size=1)


def test_shard_2d_outside_a_process_group_says_how_to_start_one():
    pytest.importorskip("torchrec")
    import torch

    from recopt.distributed import shard_2d

    with pytest.raises(RuntimeError, match="recopt.distributed.launch"):
        shard_2d(torch.nn.Linear(2, 2), sharding_group_size=1)


def test_mean_row_wise_table_makes_its_collection_all_row_wise():
    # TorchRec divides non-row-wise outputs by lengths when a mean table is row-wise (measured)
    tables = [TableSpec("big_mean", 1000, 8, pooling="mean"), TableSpec("small_sum", 10, 8, pooling="sum")]
    assert {s.sharding_type for s in place_tables(tables, 2)} == {"row_wise"}
    with pytest.raises(ValueError, match="bag lengths"):
        place_tables(tables, 2, {"big_mean": "row_wise", "small_sum": "table_wise"})
    sums = [TableSpec("big", 1000, 8, pooling="sum"), TableSpec("small", 10, 8, pooling="mean")]
    assert [s.sharding_type for s in place_tables(sums, 2)] == ["row_wise", "table_wise"]


def test_describe_plan_before_launch_from_a_plain_model():
    pytest.importorskip("torchrec")
    import torch
    import torch.nn as nn

    from recopt.distributed import describe_plan

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.user = nn.EmbeddingBag(1000, 8, mode="sum")
            self.item = nn.EmbeddingBag(50, 8, mode="sum")
            self.head = nn.Linear(16, 1)

        def forward(self, u, uo, i, io):
            return self.head(torch.cat([self.user(u, uo), self.item(i, io)], 1))

    x = (torch.tensor([1, 5, 9]), torch.tensor([0, 1]), torch.tensor([3, 4]), torch.tensor([0, 1]))
    text = describe_plan(Two(), world_size=8, sharding_group_size=4, batch_size_per_rank=64, example_inputs=x)
    assert "T=8 ranks = L=4 (sharding group) x G=2 (replicas)" in text
    assert "user" in text and "row_wise" in text and "table_wise" in text
    assert "sharding groups: [[0, 2, 4, 6], [1, 3, 5, 7]]" in text
