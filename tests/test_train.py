"""Training harness: metrics against brute force, reproducibility, short runs learn, quality parity."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from recopt.data import SyntheticConfig, SyntheticCTR, default_data_dir, load_movielens
from recopt.models import DLRM, DLRMConfig, EventTowerConfig, InterFormer, InterFormerConfig, Kunlun, KunlunConfig
from recopt.train import (LogisticRegression, TrainConfig, auc, binary_entropy, compute_metrics,
                          log_loss, max_output_difference, normalized_entropy, popularity_scores, quality_parity,
                          seed_everything, train)

ML_DIR = default_data_dir() / "ml-latest-small"


@pytest.fixture
def one_thread():
    """Training tests run single-threaded: on a shared 2-core machine a second OpenMP
    thread mostly spins. Restores the previous setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- metrics

def _pairwise_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200).astype(float)
    s = np.round(rng.normal(size=200) + y, 1)  # rounding creates many ties
    assert auc(y, s) == pytest.approx(_pairwise_auc(y, s), abs=1e-12)
    assert auc(torch.tensor(y), torch.tensor(s)) == pytest.approx(_pairwise_auc(y, s), abs=1e-12)


def test_auc_extremes_and_errors():
    y = np.array([0, 0, 1, 1])
    assert auc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5
    with pytest.raises(ValueError, match="only one class"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="entries"):
        auc([0, 1], [0.1])


def test_logloss_and_ne():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500).astype(float)
    z = rng.normal(size=500) * 3
    p = 1 / (1 + np.exp(-z))
    direct = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert log_loss(y, z) == pytest.approx(direct, rel=1e-9)
    assert log_loss(y, probs=p) == pytest.approx(direct, rel=1e-6)
    assert log_loss([1.0], [1000.0]) == pytest.approx(0.0, abs=1e-12)  # stable for huge logits
    rate = y.mean()
    const = np.full_like(y, math.log(rate / (1 - rate)))
    assert normalized_entropy(y, const) == pytest.approx(1.0, rel=1e-9)   # predicting the base rate
    assert binary_entropy(0.5) == pytest.approx(math.log(2))
    m = compute_metrics(y, z, base_rate=0.3)
    assert m.ne == pytest.approx(m.logloss / binary_entropy(0.3)) and m.n == 500 and m.base_rate == 0.3
    with pytest.raises(ValueError, match="exactly one"):
        log_loss(y)


# ----------------------------------------------------------------------------- loop

SYN = SyntheticCTR(SyntheticConfig(n_dense=8, sparse_cardinalities=(200, 100, 10), max_seq_len=12,
                                   length_distribution="uniform", base_ctr=0.3), n_train=2048, n_test=1024)
TINY_DLRM = DLRMConfig(embedding_dim=8, bottom_hidden=(16,), top_hidden=(16,))


def test_training_is_reproducible_from_the_seed(one_thread):
    def run():
        seed_everything(7)
        model = DLRM(SYN.spec, TINY_DLRM)
        res = train(model, SYN.train, SYN.test, TrainConfig(epochs=2, max_steps=20, batch_size=128, seed=7, progress=False))
        return res, torch.cat([p.detach().flatten() for p in model.parameters()])

    (r1, w1), (r2, w2) = run(), run()
    assert torch.equal(w1, w2) and r1.metrics == r2.metrics and r1.steps == 20


def test_train_rejects_an_empty_run():
    with pytest.raises(ValueError, match="no training steps"):
        train(LogisticRegression(SYN.spec), SYN.train, None, TrainConfig(batch_size=10**6, progress=False))


# ----------------------------------------------------------------------------- short runs on MovieLens

@pytest.fixture(scope="module")
def ml():
    if not (ML_DIR / "ratings.csv").is_file():
        pytest.skip(f"MovieLens not found at {ML_DIR}")
    return load_movielens(max_seq_len=10)


@pytest.fixture(scope="module")
def popularity_auc(ml):
    labels, scores = popularity_scores(ml.train, ml.test)
    return auc(labels, scores)


SHORT_RUN_MODELS = {
    "dlrm": lambda s: DLRM(s, TINY_DLRM),
    "interformer": lambda s: InterFormer(s, InterFormerConfig(d_model=8, n_layers=1, n_heads=1, dcn_rank=4,
                                                              masknet_hidden=16, head_hidden=(16,))),
    "kunlun": lambda s: Kunlun(s, KunlunConfig(d_model=8, n_summary=2, head_hidden=(16,), weightgen_hidden=16,
                                               towers=(EventTowerConfig(d_model=8, n_heads=1, n_summary=1,
                                                                        n_layers=1, pffn_rows_per_token=2),) * 2)),
}


@pytest.mark.parametrize("name", sorted(SHORT_RUN_MODELS))
def test_short_run_learns_and_beats_popularity(ml, popularity_auc, name, one_thread):
    seed_everything(0)
    model = SHORT_RUN_MODELS[name](ml.spec)
    res = train(model, ml.train, ml.test,
                TrainConfig(max_steps=120, batch_size=256, lr=3e-3, seed=0, progress=False),
                base_rate=ml.base_rate)
    assert res.metrics.auc > 0.70, res.metrics
    assert res.metrics.auc > popularity_auc + 0.03, (res.metrics, popularity_auc)
    assert res.metrics.ne < 1.0


# ----------------------------------------------------------------------------- quality parity

def _make_tiny_dlrm():
    return DLRM(SYN.spec, TINY_DLRM)


def test_parity_of_an_exact_transform_is_exact(one_thread):
    res = quality_parity(_make_tiny_dlrm, SYN.train, SYN.test, transform=lambda m, ex: torch.fx.symbolic_trace(m),
                         steps=30, batch_size=128)
    assert res.delta_auc == 0.0 and res.delta_ne == 0.0 and res.passed, res


def test_parity_catches_a_transform_that_changes_the_model(one_thread):
    class DropHistory(torch.nn.Module):  # "optimization" that silently ignores the sequences
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, dense, sparse_ids, seq_ids, seq_lengths, seq_times):
            return self.inner(dense, sparse_ids, seq_ids, seq_lengths * 0, seq_times)

    res = quality_parity(_make_tiny_dlrm, SYN.train, SYN.test, transform=lambda m, ex: DropHistory(m),
                         steps=30, batch_size=128)
    assert res.delta_auc != 0.0 and not res.passed
    assert "FAIL" in str(res)


def test_max_output_difference():
    seed_everything(0)
    a = _make_tiny_dlrm()
    b = next(iter(SYN.test.batches(16))).inputs()
    assert max_output_difference(a, torch.fx.symbolic_trace(a), b) == 0.0


def test_parity_with_recopt_optimize():
    import recopt

    if not hasattr(recopt, "optimize"):
        pytest.skip("recopt.optimize has not landed yet")
    res = quality_parity(_make_tiny_dlrm, SYN.train, SYN.test, steps=30, batch_size=128)
    assert res.passed, res


def test_example_script_runs_end_to_end(ml, one_thread, tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train_movielens.py"
    spec = importlib.util.spec_from_file_location("train_movielens", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    res = mod.main(["--model", "dlrm", "--max-steps", "20", "--max-seq-len", "5", "--no-progress",
                    "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["steps"] == 20 and 0.5 < saved["auc"] <= 1.0 and saved["params"] > 0
    assert res["ne"] == saved["ne"]
