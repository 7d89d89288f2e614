"""The sparse2d padded route under shard_2d: two ranks (gloo), lookups of one collection given
different numbers of bags at run time. The padding is built in the graph before the collection, so
the sharded collection pools the same bags and the same rows are cut away: forward equals the
unsharded model."""
import pytest
import torch
import torch.nn as nn

from recopt.distributed import launch

pytest.importorskip("torchrec")


class Towers(nn.Module):
    def __init__(self):
        super().__init__()
        self.u = nn.EmbeddingBag(24, 4, mode="sum")
        self.i = nn.EmbeddingBag(24, 4, mode="mean", include_last_offset=True)

    def forward(self, uid, uoff, iid, ioff):
        return self.u(uid, uoff) * 2.0, self.i(iid, ioff) + 1.0


def _bags(b, g, last=False):
    lens = torch.randint(0, 4, (b,), generator=g)
    off = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    return torch.randint(0, 24, (int(lens.sum()),), generator=g), (off if last else off[:-1])


def padded_forward_worker(ctx):
    from recopt.distributed import shard_2d
    from recopt.ops.kjt import PADDED_CALLS

    torch.manual_seed(0)
    model = Towers().eval()
    g = torch.Generator().manual_seed(0)
    sm = shard_2d(model, example_inputs=_bags(6, g) + _bags(6, g, last=True), sharding_group_size=2)
    out = []
    g = torch.Generator().manual_seed(1 + ctx.rank)
    # every rank keeps the KJT stride (6) the example gave; the keys' own counts differ
    for bu, bi in ((6, 3), (2, 6), (0, 6)):
        x = _bags(bu, g) + _bags(bi, g, last=True)
        before = PADDED_CALLS["calls"]
        with torch.no_grad():
            got, want = sm(*x), model(*x)
        out.append((PADDED_CALLS["calls"] - before, [tuple(t.shape) for t in got],
                    [tuple(t.shape) for t in want], max((a - b).abs().max().item() if a.numel() else 0.0
                                                        for a, b in zip(got, want))))
    return out


def test_sharded_collection_serves_different_bag_counts_exactly():
    results = launch(padded_forward_worker, 2, sharding_group_size=2, timeout_s=300, job_timeout_s=600)
    for r in results:
        for padded, got_shapes, want_shapes, diff in r:
            assert padded == 1
            assert got_shapes == want_shapes
            assert diff < 2e-5   # row-wise mean pooling divides partial sums by (length + 1e-6)
