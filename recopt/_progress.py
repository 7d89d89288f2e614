"""Progress bars for long steps: tqdm when installed, a plain stderr line otherwise.

Quiet when ``RECOPT_QUIET=1`` or ``disable=True``.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, Optional


def progress_bar(iterable: Iterable, desc: str = "", total: Optional[int] = None, disable: bool = False):
    disable = disable or os.environ.get("RECOPT_QUIET") == "1"
    if disable:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(iterable, desc, total)
    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr)


class _PlainProgress:
    def __init__(self, iterable, desc, total):
        self.iterable, self.desc = iterable, desc
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)

    def __iter__(self):
        for i, item in enumerate(self.iterable, 1):
            yield item
            of = f"/{self.total}" if self.total else ""
            print(f"\r{self.desc}: {i}{of}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
