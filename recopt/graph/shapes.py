"""Shape propagation: run a graph once and record each node's ``tensor_meta``.

Below both capture (which records shapes after tracing) and verify (which
re-records them on the inputs a rewrite is checked on), so neither imports
the other for it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata


class ShapeRecorder(fx.Interpreter):
    """Runs a graph and records ``tensor_meta`` (shape, dtype, ...) and ``type`` on each node.

    Like torch.fx's ShapeProp, but an op that fails raises an error naming
    the node and its source, without printing a traceback (a rewrite that
    fails verification is an expected event, reported, not logged).
    """

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            stack = (n.meta.get("stack_trace") or "").strip().splitlines()
            where = f" (from {stack[-2].strip()})" if len(stack) >= 2 else ""
            raise type(e)(f"node {n.name} = {n.format_node()}{where}: {e}") if _reraisable(e) else e
        found = False

        def extract(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = fx.node.map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


def _reraisable(e: Exception) -> bool:
    try:
        type(e)("probe")
        return True
    except Exception:
        return False


def propagate_shapes(gm: fx.GraphModule, args: tuple) -> Any:
    """Run ``gm`` on ``args`` recording ``tensor_meta`` on every node; return its output.

    Runs under ``torch.no_grad``; the caller chooses train/eval mode.
    """
    with torch.no_grad():
        return ShapeRecorder(gm).run(*args)
