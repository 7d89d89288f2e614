"""Errors raised by recopt data sources: they name the file, the line and what was expected."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


class DataNotFoundError(FileNotFoundError):
    """A data file or directory is missing."""


class DataFormatError(ValueError):
    """A data file exists but does not have the expected content.

    ``str(err)`` reads ``"<path>:<line>: <problem>; expected <expected>"``; the
    parts are also attributes so callers can report them differently.
    """

    def __init__(self, path: Path | str, line: Optional[int], problem: str, expected: str):
        self.path, self.line, self.problem, self.expected = Path(path), line, problem, expected
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}; expected {expected}")
