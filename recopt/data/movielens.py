"""MovieLens ``ml-latest-small`` as a click-through-rate (CTR) task.

Task: predict ``label = rating >= 4`` ("liked") for each rating event, from
features known *before* the event:

* sparse: user id, movie id, the movie's first listed genre, release decade;
* dense (standardized with training-split statistics): the candidate's genre
  multi-hot (20), hour-of-day and day-of-week (sin/cos, UTC), release year,
  the movie's age at rating time, and causal
  counters: the user's and the movie's number of earlier ratings and smoothed
  like rate, and the time since the user's previous rating;
* behaviour sequences, one per event type (``liked``, ``not_liked``): the
  user's earlier movies and their first genre, newest first, with their age
  in seconds (see :mod:`recopt.data.batch` for the layout).

The calendar time itself is deliberately not a feature: with a time split
every test value would lie outside the training range, and models
extrapolate it badly.

"Earlier" means a strictly smaller timestamp: ratings the user gave in the
same second are not in each other's history, so no label leaks through
same-session bulk ratings. Counters use the same rule.

The split is by time: every event with a timestamp below the
``1 - test_fraction`` quantile trains, the rest tests. Histories of test
events may contain earlier test events (they are in the past), never later
ones.

The data's licence (GroupLens, research and non-commercial use) is in the
``README.txt`` beside the CSV files; the loader refuses a copy without it.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch

from .batch import Batch, FeatureSpec
from .errors import DataFormatError, DataNotFoundError
from .paths import dataset_dir

DATASET = "ml-latest-small"
EVENT_NAMES = ("liked", "not_liked")
SPARSE_NAMES = ("user_id", "movie_id", "genre", "release_decade")
RATINGS_HEADER = ["userId", "movieId", "rating", "timestamp"]
MOVIES_HEADER = ["movieId", "title", "genres"]
N_DECADES = 14  # 1900s..2010s -> 0..11, later clipped to 12, unknown year -> 13


@dataclass(frozen=True)
class MovieLensConfig:
    max_seq_len: int = 50          # per event type; the longest user has 2,698 ratings
    test_fraction: float = 0.2
    like_threshold: float = 4.0
    smoothing: float = 5.0         # pseudo-count for the smoothed like rates


# ----------------------------------------------------------------------------- file parsing

def _open_csv(path: Path, header: List[str]):
    if not path.is_file():
        raise DataNotFoundError(f"data file not found: {path} (expected the MovieLens CSV with "
                                f"header {','.join(header)})")
    f = open(path, newline="", encoding="utf-8")
    reader = csv.reader(f)
    first = next(reader, None)
    if first is None:
        f.close()
        raise DataFormatError(path, 1, "file is empty", f"a header line '{','.join(header)}'")
    if [c.strip().lstrip("\ufeff") for c in first] != header:
        f.close()
        raise DataFormatError(path, 1, f"header is {first!r}", f"header {header!r}")
    return f, reader


def read_ratings(path: Path):
    """Parse ``ratings.csv`` into numpy arrays ``(user, movie, rating, ts, line)``."""
    f, reader = _open_csv(path, RATINGS_HEADER)
    users, movies, ratings, stamps = [], [], [], []
    with f:
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != 4:
                raise DataFormatError(path, line, f"row has {len(row)} fields: {row!r}",
                                      "4 fields userId,movieId,rating,timestamp")
            try:
                u, m, r, t = int(row[0]), int(row[1]), float(row[2]), int(row[3])
            except ValueError:
                raise DataFormatError(path, line, f"cannot parse {row!r}",
                                      "integer userId, integer movieId, numeric rating, integer timestamp") from None
            if not (0.0 <= r <= 5.0) or math.isnan(r):
                raise DataFormatError(path, line, f"rating {row[2]!r} out of range", "a rating in [0, 5]")
            users.append(u); movies.append(m); ratings.append(r); stamps.append(t)
    if not users:
        raise DataFormatError(path, 2, "no data rows after the header", "at least one rating")
    return (np.asarray(users, np.int64), np.asarray(movies, np.int64),
            np.asarray(ratings, np.float64), np.asarray(stamps, np.int64))


def read_movies(path: Path):
    """Parse ``movies.csv`` into ``(movie_ids, release_years, genre_lists)``; year -1 if unknown."""
    f, reader = _open_csv(path, MOVIES_HEADER)
    ids, years, genres = [], [], []
    with f:
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != 3:
                raise DataFormatError(path, line, f"row has {len(row)} fields: {row!r}",
                                      "3 fields movieId,title,genres (quote titles that contain commas)")
            try:
                ids.append(int(row[0]))
            except ValueError:
                raise DataFormatError(path, line, f"movieId {row[0]!r} is not an integer", "an integer movieId") from None
            years.append(_release_year(row[1]))
            genres.append(row[2].split("|") if row[2] else ["(no genres listed)"])
    if not ids:
        raise DataFormatError(path, 2, "no data rows after the header", "at least one movie")
    return np.asarray(ids, np.int64), np.asarray(years, np.int64), genres


def _release_year(title: str) -> int:
    t = title.strip()
    if len(t) >= 6 and t[-1] == ")" and t[-6] == "(" and t[-5:-1].isdigit():
        return int(t[-5:-1])
    return -1


# ----------------------------------------------------------------------------- causal counters

def _group_starts(keys: Sequence[np.ndarray]) -> np.ndarray:
    """For rows sorted by ``keys``, the index of the first row of each row's run of equal keys."""
    n = len(keys[0])
    new = np.ones(n, bool)
    if n > 1:
        new[1:] = np.any(np.stack([k[1:] != k[:-1] for k in keys]), axis=0)
    return np.maximum.accumulate(np.where(new, np.arange(n), 0))


def _prior_count_and_sum(key: np.ndarray, ts: np.ndarray, value: np.ndarray):
    """Per row: how many rows with the same ``key`` have a strictly smaller ``ts``,
    and the sum of their ``value``. Rows are in any order; results are aligned with them."""
    order = np.lexsort((ts, key))
    k, t, v = key[order], ts[order], value[order]
    key_start = _group_starts([k])
    tie_start = _group_starts([k, t])
    csum = np.concatenate([[0.0], np.cumsum(v)])
    count = (tie_start - key_start).astype(np.float64)
    total = csum[tie_start] - csum[key_start]
    out_c, out_s = np.empty_like(count), np.empty_like(total)
    out_c[order], out_s[order] = count, total
    return out_c, out_s


# ----------------------------------------------------------------------------- dataset

class MovieLensCTR:
    """The whole ml-latest-small CTR task: examples in time order plus both splits.

    ``spec`` sizes the models; ``train`` / ``test`` are :class:`CTRSplit` views.
    """

    def __init__(self, data_dir: str | Path | None = None, config: MovieLensConfig = MovieLensConfig()):
        self.config = config
        root = dataset_dir(DATASET, data_dir)
        self.path = root
        if not (root / "README.txt").is_file():
            raise DataNotFoundError(
                f"{root / 'README.txt'} is missing: the GroupLens licence must stay beside the "
                f"ml-latest-small data. Restore README.txt from the original zip.")
        users_raw, movies_raw, rating, ts = read_ratings(root / "ratings.csv")
        movie_ids, years, genre_lists = read_movies(root / "movies.csv")
        self._build(users_raw, movies_raw, rating, ts, movie_ids, years, genre_lists, root)

    # -- construction -----------------------------------------------------------------------
    def _build(self, users_raw, movies_raw, rating, ts, movie_ids, years, genre_lists, root):
        cfg = self.config
        T = cfg.max_seq_len
        if T < 1:
            raise ValueError(f"MovieLensConfig.max_seq_len must be >= 1, got {T}")
        if not 0.0 < cfg.test_fraction < 1.0:
            raise ValueError(f"MovieLensConfig.test_fraction must be in (0, 1), got {cfg.test_fraction}")

        # Index maps: users by sorted raw id, movies in movies.csv order sorted by id.
        user_vocab, user = np.unique(users_raw, return_inverse=True)
        m_order = np.argsort(movie_ids, kind="stable")
        movie_ids, years = movie_ids[m_order], years[m_order]
        genre_lists = [genre_lists[i] for i in m_order]
        pos = np.searchsorted(movie_ids, movies_raw)
        pos_c = np.minimum(pos, len(movie_ids) - 1)
        unknown = movie_ids[pos_c] != movies_raw
        if unknown.any():
            i = int(np.argmax(unknown))
            raise DataFormatError(root / "ratings.csv", i + 2, f"movieId {int(movies_raw[i])} is not in movies.csv",
                                  "every rated movieId to appear in movies.csv")
        movie = pos_c

        genre_vocab = sorted({g for gl in genre_lists for g in gl})
        gidx = {g: i for i, g in enumerate(genre_vocab)}
        n_genres = len(genre_vocab)
        movie_genre_mh = np.zeros((len(movie_ids), n_genres), np.float32)
        movie_first_genre = np.zeros(len(movie_ids), np.int64)
        for i, gl in enumerate(genre_lists):
            movie_genre_mh[i, [gidx[g] for g in gl]] = 1.0
            movie_first_genre[i] = gidx[gl[0]]
        movie_decade = np.where(years > 0, np.clip((years - 1900) // 10, 0, N_DECADES - 2), N_DECADES - 1)

        # Examples in global time order.
        order = np.lexsort((movie, user, ts))
        user, movie, rating, ts = user[order], movie[order], rating[order], ts[order]
        label = (rating >= cfg.like_threshold).astype(np.float32)
        n = len(label)

        cut = np.quantile(ts, 1.0 - cfg.test_fraction, method="lower")
        is_train = ts < cut
        if is_train.all() or not is_train.any():
            raise DataFormatError(root / "ratings.csv", None, "all timestamps fall on one side of the split",
                                  "ratings spread over time so a time-based train/test split is possible")
        base_rate = float(label[is_train].mean())

        # Behaviour sequences: per event type, the user's events in (user, ts) order, flattened.
        # For example i, its type-e history is flat[e][base[e, i] - 1 - t] for t < count[e, i].
        u_order = np.lexsort((movie, ts, user))
        u_user, u_ts = user[u_order], ts[u_order]
        user_start = _group_starts([u_user])
        tie_start = _group_starts([u_user, u_ts])
        event_label = (1.0, 0.0)
        self._hist_movie, self._hist_genre, self._hist_ts = [], [], []
        base = np.zeros((len(EVENT_NAMES), n), np.int64)
        count = np.zeros((len(EVENT_NAMES), n), np.int64)
        for e, lab in enumerate(event_label):
            is_e = label[u_order] == lab
            cum = np.concatenate([[0], np.cumsum(is_e)])
            b_sorted = cum[tie_start]
            c_sorted = cum[tie_start] - cum[user_start]
            base[e, u_order], count[e, u_order] = b_sorted, c_sorted
            sel = u_order[is_e]
            self._hist_movie.append(movie[sel])
            self._hist_genre.append(movie_first_genre[movie[sel]])
            self._hist_ts.append(ts[sel])
        self._hist_base, self._hist_count = base, count

        # Dense features (causal counters use strictly earlier timestamps).
        a = cfg.smoothing
        u_cnt, u_likes = _prior_count_and_sum(user, ts, label.astype(np.float64))
        m_cnt, m_likes = _prior_count_and_sum(movie, ts, label.astype(np.float64))
        prev_ts = np.zeros(n, np.int64)
        has_prev = tie_start > user_start
        prev_ts_sorted = np.where(has_prev, u_ts[np.maximum(tie_start - 1, 0)], u_ts)
        prev_ts[u_order] = prev_ts_sorted
        gap_hours = (ts - prev_ts) / 3600.0
        hour = (ts % 86400) / 86400.0
        dow = ((ts // 86400 + 3) % 7) / 7.0  # 1970-01-01 was a Thursday (index 3 with Monday = 0)
        year_of_event = 1970.0 + ts / (365.2425 * 86400)
        rel_year = years[movie].astype(np.float64)
        known_year = rel_year > 0
        cols = [
            np.log1p(u_cnt), (u_likes + a * base_rate) / (u_cnt + a),
            np.log1p(m_cnt), (m_likes + a * base_rate) / (m_cnt + a),
            np.log1p(gap_hours), (u_cnt == 0).astype(np.float64),
            np.sin(2 * np.pi * hour), np.cos(2 * np.pi * hour),
            np.sin(2 * np.pi * dow), np.cos(2 * np.pi * dow),
            np.where(known_year, rel_year, 0.0), np.where(known_year, year_of_event - rel_year, 0.0),
            known_year.astype(np.float64),
        ]
        self.dense_names = (["user_log_count", "user_like_rate", "movie_log_count", "movie_like_rate",
                             "log_hours_since_prev", "user_first_rating", "hour_sin", "hour_cos",
                             "dow_sin", "dow_cos", "release_year", "movie_age_years",
                             "release_year_known"] + [f"genre={g}" for g in genre_vocab])
        dense = np.concatenate([np.stack(cols, 1), movie_genre_mh[movie].astype(np.float64)], 1)
        mean = dense[is_train].mean(0)
        std = dense[is_train].std(0)
        std = np.where(std < 1e-6, 1.0, std)
        self._dense = torch.from_numpy(((dense - mean) / std).astype(np.float32))

        self._sparse = torch.from_numpy(np.stack(
            [user, movie, movie_first_genre[movie], movie_decade[movie]], 1).astype(np.int64))
        self._labels = torch.from_numpy(label)
        self._ts = ts
        self.base_rate = base_rate
        self.split_timestamp = int(cut)
        self.genre_vocab = tuple(genre_vocab)
        self.user_vocab = user_vocab
        self.movie_vocab = movie_ids
        self.spec = FeatureSpec(
            n_dense=dense.shape[1],
            sparse_cardinalities=(len(user_vocab), len(movie_ids), n_genres, N_DECADES),
            seq_feature_tables=(1, 2),
            max_seq_len=T,
            event_names=EVENT_NAMES,
            sparse_names=SPARSE_NAMES,
        )
        idx = np.arange(n)
        self.train = CTRSplit(self, idx[is_train], "train")
        self.test = CTRSplit(self, idx[~is_train], "test")

    # -- batch assembly ---------------------------------------------------------------------
    def make_batch(self, idx: np.ndarray) -> Batch:
        """Assemble the examples ``idx`` (indices in global time order) into a :class:`Batch`."""
        idx = np.asarray(idx, np.int64)
        T = self.config.max_seq_len
        E = len(EVENT_NAMES)
        B = len(idx)
        t = np.arange(T)
        seq = np.zeros((B, E, T, 2), np.int64)
        times = np.zeros((B, E, T), np.float32)
        lengths = np.zeros((B, E), np.int64)
        ts = self._ts[idx]
        for e in range(E):
            cnt = np.minimum(self._hist_count[e, idx], T)
            valid = t[None, :] < cnt[:, None]
            flat = self._hist_base[e, idx][:, None] - 1 - t[None, :]
            flat = np.where(valid, flat, 0)
            if len(self._hist_movie[e]):
                seq[:, e, :, 0] = np.where(valid, self._hist_movie[e][flat], 0)
                seq[:, e, :, 1] = np.where(valid, self._hist_genre[e][flat], 0)
                times[:, e] = np.where(valid, ts[:, None] - self._hist_ts[e][flat], 0).astype(np.float32)
            lengths[:, e] = cnt
        ti = torch.from_numpy(idx)
        return Batch(self._dense[ti], self._sparse[ti], torch.from_numpy(seq), torch.from_numpy(lengths),
                     torch.from_numpy(times), self._labels[ti])

    def __len__(self) -> int:
        return int(self._labels.shape[0])


class CTRSplit:
    """A view of some examples of a dataset that yields :class:`Batch` objects."""

    def __init__(self, source, indices: np.ndarray, name: str):
        self.source, self.indices, self.name = source, np.asarray(indices, np.int64), name

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def spec(self) -> FeatureSpec:
        return self.source.spec

    @property
    def labels(self) -> torch.Tensor:
        return self.source._labels[torch.from_numpy(self.indices)]

    def batch(self, positions: Optional[np.ndarray] = None) -> Batch:
        """Examples at ``positions`` within this split (all of them if None)."""
        pos = self.indices if positions is None else self.indices[np.asarray(positions, np.int64)]
        return self.source.make_batch(pos)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> Iterator[Batch]:
        """Iterate over the split in batches; ``shuffle`` uses a numpy generator seeded by ``seed``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for s in range(0, stop, batch_size):
            yield self.batch(order[s:s + batch_size])

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)


def load_movielens(data_dir: str | Path | None = None, max_seq_len: int = 50, **kwargs) -> MovieLensCTR:
    """Load ml-latest-small as a CTR task (see the module docstring)."""
    return MovieLensCTR(data_dir, MovieLensConfig(max_seq_len=max_seq_len, **kwargs))
