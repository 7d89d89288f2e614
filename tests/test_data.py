"""Data sources: MovieLens CTR correctness (no leakage, exact histories), clear errors, synthetic shapes."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from recopt.data import (ENV_VAR, DataFormatError, DataNotFoundError, SyntheticConfig, SyntheticCTR,
                         default_data_dir, load_movielens)
from recopt.data.movielens import EVENT_NAMES

ML_DIR = default_data_dir() / "ml-latest-small"
needs_movielens = pytest.mark.skipif(not (ML_DIR / "ratings.csv").is_file(),
                                     reason=f"MovieLens not found at {ML_DIR} (set {ENV_VAR})")


@pytest.fixture(scope="module")
def ml():
    if not (ML_DIR / "ratings.csv").is_file():
        pytest.skip(f"MovieLens not found at {ML_DIR}")
    return load_movielens(max_seq_len=20)


@pytest.fixture(scope="module")
def raw_ratings():
    with open(ML_DIR / "ratings.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in ("userId", "movieId", "rating", "timestamp")}


# ----------------------------------------------------------------------------- real data

@needs_movielens
def test_sizes_spec_and_time_split(ml):
    assert len(ml) == 100_836
    assert len(ml.train) + len(ml.test) == 100_836
    assert 0.15 < len(ml.test) / len(ml) < 0.25
    assert ml.spec.sparse_cardinalities[:2] == (610, 9742)
    assert ml.spec.event_names == EVENT_NAMES
    assert ml._ts[ml.train.indices].max() < ml._ts[ml.test.indices].min() == ml.split_timestamp
    assert 0.4 < ml.base_rate < 0.6


@needs_movielens
def test_batch_layout_and_no_leakage(ml):
    b = ml.test.batch(np.arange(0, len(ml.test), 97))
    B, E, T, C = b.seq_ids.shape
    assert (E, T, C) == (2, 20, 2) and b.dense.shape == (B, ml.spec.n_dense)
    valid = torch.arange(T)[None, None] < b.seq_lengths[..., None]
    assert ((b.seq_lengths >= 0) & (b.seq_lengths <= T)).all()
    assert (b.seq_times[valid] > 0).all(), "history must be strictly earlier than the example"
    assert (b.seq_ids[~valid] == 0).all() and (b.seq_times[~valid] == 0).all()
    # newest first: ages increase along the sequence
    ages = torch.where(valid, b.seq_times, torch.inf)
    assert (ages[..., 1:] >= ages[..., :-1]).all()
    assert torch.isfinite(b.dense).all()
    assert set(b.labels.unique().tolist()) == {0.0, 1.0}


@needs_movielens
def test_histories_match_a_brute_force_recomputation(ml, raw_ratings):
    r = raw_ratings
    rng = np.random.default_rng(0)
    picks = rng.choice(len(ml), 25, replace=False)
    b = ml.make_batch(picks)
    T = ml.config.max_seq_len
    for row, i in enumerate(picks):
        user = ml.user_vocab[b.sparse_ids[row, 0]]
        movie = ml.movie_vocab[b.sparse_ids[row, 1]]
        ts = ml._ts[i]
        mine = (r["userId"] == user) & (r["movieId"] == movie) & (r["timestamp"] == ts)
        assert mine.sum() == 1
        assert b.labels[row] == float(r["rating"][mine][0] >= 4.0)
        for e, liked in enumerate((True, False)):
            sel = (r["userId"] == user) & (r["timestamp"] < ts) & ((r["rating"] >= 4.0) == liked)
            order = np.lexsort((-r["movieId"][sel], -r["timestamp"][sel]))  # newest first
            want_ts = r["timestamp"][sel][order][:T]
            n = int(b.seq_lengths[row, e])
            assert n == min(sel.sum(), T)
            got_movies = ml.movie_vocab[b.seq_ids[row, e, :n, 0].numpy()]
            assert np.array_equal((ts - want_ts).astype(np.float32), b.seq_times[row, e, :n].numpy())
            assert set(got_movies) <= set(r["movieId"][sel])


@needs_movielens
def test_causal_counters_use_only_earlier_events(ml):
    # user_log_count (standardized) is monotone non-decreasing over a user's events in time order
    col = ml.dense_names.index("user_log_count")
    user0 = ml._sparse[:, 0] == ml._sparse[0, 0]
    counts = ml._dense[user0, col]
    assert (counts[1:] >= counts[:-1] - 1e-6).all()
    first = ml.dense_names.index("user_first_rating")
    assert ml._dense[0, first] > 0  # the very first event has no prior rating


@needs_movielens
def test_batches_are_reproducible_and_cover_the_split(ml):
    a = [b.labels for b in ml.train.batches(4096, shuffle=True, seed=3)]
    b = [b.labels for b in ml.train.batches(4096, shuffle=True, seed=3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert sum(len(x) for x in a) == len(ml.train)


# ----------------------------------------------------------------------------- tiny handmade copy

RATINGS = """userId,movieId,rating,timestamp
1,10,5.0,100
1,20,2.0,200
1,30,4.0,200
1,10,3.0,300
2,20,4.5,150
2,30,1.0,400
"""
MOVIES = """movieId,title,genres
10,"Alpha, The (1999)",Drama|Comedy
20,Beta (2005),Action
30,Gamma,(no genres listed)
"""


def _write(root: Path, ratings=RATINGS, movies=MOVIES, readme=True) -> Path:
    d = root / "ml-latest-small"
    d.mkdir(parents=True)
    (d / "ratings.csv").write_text(ratings)
    (d / "movies.csv").write_text(movies)
    if readme:
        (d / "README.txt").write_text("licence\n")
    return root


def test_tiny_dataset_sequences_ties_and_labels(tmp_path):
    ds = load_movielens(_write(tmp_path), max_seq_len=3)
    b = ds.make_batch(np.arange(len(ds)))
    # global time order: (1,10,t100) (2,20,t150) (1,20,t200) (1,30,t200) (1,10,t300) (2,30,t400)
    assert b.labels.tolist() == [1, 1, 0, 1, 0, 0]
    assert ds.movie_vocab[b.sparse_ids[:, 1].numpy()].tolist() == [10, 20, 20, 30, 10, 30]
    # same-second ratings (t=200) do not see each other: both have only (10, liked) in history
    for row in (2, 3):
        assert b.seq_lengths[row].tolist() == [1, 0]
        assert ds.movie_vocab[int(b.seq_ids[row, 0, 0, 0])] == 10
        assert b.seq_times[row, 0, 0] == 100
    # t=300: liked = [30 (t200), 10 (t100)] newest first; not liked = [20]
    assert b.seq_lengths[4].tolist() == [2, 1]
    assert ds.movie_vocab[b.seq_ids[4, 0, :2, 0].numpy()].tolist() == [30, 10]
    assert ds.movie_vocab[b.seq_ids[4, 1, :1, 0].numpy()].tolist() == [20]
    # genre of the history item is its first listed genre
    assert ds.genre_vocab[int(b.seq_ids[4, 0, 1, 1])] == "Drama"
    # user 2 at t=400 sees its liked movie 20 (t150)
    assert b.seq_lengths[5].tolist() == [1, 0] and b.seq_times[5, 0, 0] == 250
    assert len(ds.test) == 2 and len(ds.train) == 4


def test_env_var_overrides_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(_write(tmp_path)))
    assert default_data_dir() == tmp_path
    assert len(load_movielens(max_seq_len=2)) == 6


def test_missing_directory_names_path_and_fix(tmp_path):
    with pytest.raises(DataNotFoundError, match=ENV_VAR) as err:
        load_movielens(tmp_path / "nowhere")
    assert "nowhere" in str(err.value)


@pytest.mark.parametrize("ratings, line, fragment", [
    (RATINGS.replace("1,20,2.0,200", "1,20,2.0"), 3, "3 fields"),
    (RATINGS.replace("1,20,2.0,200", "1,20,two,200"), 3, "cannot parse"),
    (RATINGS.replace("1,20,2.0,200", "1,20,9.0,200"), 3, "out of range"),
    (RATINGS.replace("userId,movieId", "user,movie"), 1, "header"),
    ("", 1, "empty"),
    ("userId,movieId,rating,timestamp\n", 2, "no data rows"),
    (RATINGS.replace("2,30,1.0,400", "2,99,1.0,400"), 7, "movieId 99 is not in movies.csv"),
])
def test_malformed_ratings_report_path_line_and_expectation(tmp_path, ratings, line, fragment):
    with pytest.raises(DataFormatError) as err:
        load_movielens(_write(tmp_path, ratings=ratings))
    msg = str(err.value)
    assert f"ratings.csv:{line}:" in msg and fragment in msg and "expected" in msg
    assert err.value.line == line


def test_malformed_movies_and_missing_files(tmp_path):
    with pytest.raises(DataFormatError, match=r"movies.csv:3: movieId 'x'"):
        load_movielens(_write(tmp_path / "a", movies=MOVIES.replace("20,Beta", "x,Beta")))
    root = _write(tmp_path / "b")
    (root / "ml-latest-small" / "movies.csv").unlink()
    with pytest.raises(DataNotFoundError, match="movies.csv"):
        load_movielens(root)
    with pytest.raises(DataNotFoundError, match="README.txt"):
        load_movielens(_write(tmp_path / "c", readme=False))


def test_split_needs_spread_timestamps(tmp_path):
    flat = "userId,movieId,rating,timestamp\n1,10,5.0,100\n1,20,2.0,100\n"
    with pytest.raises(DataFormatError, match="one side of the split"):
        load_movielens(_write(tmp_path, ratings=flat))


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_shapes_power_law_and_determinism():
    cfg = SyntheticConfig(n_dense=32, sparse_cardinalities=(5000, 2000, 50), max_seq_len=300,
                          length_distribution="uniform")
    src = SyntheticCTR(cfg, n_train=1024, n_test=256)
    b = src.generate(2048, 0)
    assert b.dense.shape == (2048, 32) and b.sparse_ids.shape == (2048, 3)
    assert b.seq_ids.shape == (2048, 2, 300, 2) and b.seq_times.shape == (2048, 2, 300)
    assert b.seq_lengths.min() >= 0 and b.seq_lengths.max() <= 300 and b.seq_lengths.float().std() > 50
    counts = torch.bincount(b.sparse_ids[:, 0], minlength=5000).float()
    assert counts[0] > counts[10] > counts[1000:].mean()          # heavy head, long tail
    assert (b.sparse_ids[:, 0] >= 1000).any()                       # but the tail is sampled
    assert 0.0 < b.labels.mean() < 0.5
    again = src.generate(2048, 0)
    assert all(torch.equal(x, y) for x, y in zip(b, again))
    assert not torch.equal(src.generate(2048, 1).dense, b.dense)
    assert sum(x.batch_size for x in src.train.batches(300)) == 1024


@pytest.mark.parametrize("dist, check", [
    ("fixed", lambda L: (L == 1000).all()),
    ("sparsity", lambda L: (L >= 0).all() and (L < 1000).all() and L.float().mean() > 400),
    ("lognormal", lambda L: L.float().median() < 300),
])
def test_synthetic_length_distributions(dist, check):
    src = SyntheticCTR(SyntheticConfig(n_dense=4, sparse_cardinalities=(100, 100, 10), max_seq_len=1000,
                                       length_distribution=dist))
    assert check(src.generate(512, 0).seq_lengths)


def test_synthetic_rejects_bad_config():
    with pytest.raises(ValueError, match="length_distribution"):
        SyntheticConfig(length_distribution="poisson")
    with pytest.raises(ValueError, match="sparsity"):
        SyntheticConfig(sparsity=0.2)
