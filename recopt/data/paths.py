"""Where recopt looks for real data.

Order: the ``RECOPT_DATA_DIR`` environment variable, then ``../shared/data``
relative to the repository root (the layout CI uses), then ``../shared/data``
relative to the current directory.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import DataNotFoundError

ENV_VAR = "RECOPT_DATA_DIR"


def default_data_dir() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    candidates = [repo_root.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


def dataset_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The directory of dataset ``name`` under ``data_dir`` (default: :func:`default_data_dir`).

    Raises :class:`DataNotFoundError` naming the searched path and the fix.
    """
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    path = root / name
    if not path.is_dir():
        raise DataNotFoundError(
            f"dataset directory not found: {path}. Put the '{name}' folder under {root}, "
            f"or point {ENV_VAR} at the directory that contains it "
            f"(e.g. {ENV_VAR}=/path/to/data where /path/to/data/{name}/ratings.csv exists).")
    return path
