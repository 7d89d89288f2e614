"""Data sources for recopt: MovieLens CTR (real) and a synthetic jagged generator.

Both yield :class:`~recopt.data.batch.Batch` objects whose first five fields
are the model inputs (see :mod:`recopt.data.batch`). The batch format needs
torch only; the loaders (which need numpy) are imported on first use, so
``recopt.models`` works with torch alone.
"""
from importlib import import_module

from .batch import Batch, FeatureSpec, example_batch
from .errors import DataFormatError, DataNotFoundError
from .paths import ENV_VAR, dataset_dir, default_data_dir

_LAZY = {
    "CTRSplit": "movielens", "MovieLensConfig": "movielens", "MovieLensCTR": "movielens",
    "load_movielens": "movielens", "SyntheticConfig": "synthetic", "SyntheticCTR": "synthetic",
    "SyntheticSplit": "synthetic",
}


def __getattr__(name):
    if name in _LAZY:
        from ..errors import require

        require("numpy", "data", f"recopt.data.{name}")
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Batch", "FeatureSpec", "example_batch", "DataFormatError", "DataNotFoundError", "ENV_VAR",
           "dataset_dir", "default_data_dir", *_LAZY]
