"""End-to-end ExFM stream loop on a tiny in-memory source (seconds)."""
import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow")

from recopt.data import Batch, FeatureSpec, example_batch  # noqa: E402
from recopt.distill.loop import VARIANTS, StreamConfig, StudentSpec, run_stream, split_stream  # noqa: E402
from recopt.models import build_model  # noqa: E402

SPEC = FeatureSpec(n_dense=4, sparse_cardinalities=(30, 40, 5), seq_feature_tables=(1,), max_seq_len=5,
                   event_names=("a", "b"))


class TinySource:
    """600 examples whose label depends on the dense features, in 'time order'."""

    def __init__(self, n=600):
        self.full = example_batch(SPEC, n, seed=3)
        logits = self.full.dense[:, 0] * 2 - self.full.dense[:, 1]
        self.labels = (torch.sigmoid(logits) > torch.rand(n, generator=torch.Generator().manual_seed(4))).float()

    def __len__(self):
        return len(self.labels)

    def make_batch(self, idx):
        i = torch.as_tensor(np.asarray(idx, np.int64))
        return Batch(*(t[i] for t in self.full[:5]), self.labels[i])


def test_split_stream_is_contiguous_and_complete():
    chunks = split_stream(103, 4)
    assert np.array_equal(np.concatenate(chunks), np.arange(103))
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1
    with pytest.raises(ValueError):
        split_stream(3, 4)


def test_run_stream_end_to_end(tmp_path):
    torch.manual_seed(0)
    source = TinySource()
    teacher = build_model("dlrm", SPEC, embedding_dim=8, top_hidden=(16,))
    students = [
        StudentSpec("s_dcn", lambda: build_model("dlrm", SPEC, embedding_dim=4, bottom_hidden=(8,),
                                                 top_hidden=(8, 4))),
        StudentSpec("s_dot", lambda: build_model("dlrm", SPEC, interaction="dot", embedding_dim=4,
                                                 bottom_hidden=(8,), top_hidden=(8,))),
    ]
    cfg = StreamConfig(n_chunks=4, refresh_every=2, teacher_epochs=1, batch_size=50, progress=False)
    logs = []
    result = run_stream(source, teacher, students, str(tmp_path / "das"), cfg, log=logs.append)
    assert [c["chunk"] for c in result.chunks] == [1, 2, 3]
    assert [c["teacher_lag_chunks"] for c in result.chunks] == [0, 1, 0]  # refreshed before chunk 3
    assert result.chunks[2]["teacher_version"] == "through-chunk-2"
    keys = set(result.chunks[0]["metrics"])
    assert keys == {"teacher"} | {f"{s.name}/{v}" for s in students for v in VARIANTS}
    for c in result.chunks:
        for m in c["metrics"].values():
            assert 0.0 <= m["auc"] <= 1.0 and np.isfinite(m["ne"])
    # before any streamed training, all variants of a student share the warmed-up model
    first = result.chunks[0]["metrics"]
    assert len({first[f"s_dcn/{v}"]["ne"] for v in VARIANTS}) == 1
    assert len({result.chunks[1]["metrics"][f"s_dcn/{v}"]["ne"] for v in VARIANTS}) > 1
    assert result.das["calls_per_example_shared"] == 1.0
    assert result.das["calls_per_example_without_das"] == 2.0
    assert result.das["unique_examples"] == sum(c["n"] for c in result.chunks)
    assert set(result.mean_metrics()) == keys
    assert len(logs) == 4
