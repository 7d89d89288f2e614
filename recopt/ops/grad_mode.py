"""Grad-mode regions in captured graphs: ``with torch.no_grad():`` inside a forward.

A captured graph holds such a region as two calls of ``torch._C._set_grad_enabled``:
the mode inside, then, at the exit, the mode the *tracer* ran in (Dynamo bakes it; fx's
symbolic tracing records nothing at all). Run under the caller's ``torch.no_grad()``, a
baked ``_set_grad_enabled(True)`` would switch gradients on for the rest of the graph.
Capture rewrites each region into :func:`enter_grad_mode` (returns the mode before it)
and :func:`exit_grad_mode` (restores that mode), which do what the model's ``with``
block does at run time. Both are marked side-effectful for fx, so dead-code elimination
keeps them.
"""
from __future__ import annotations

import torch
from torch.fx.node import has_side_effect


@has_side_effect
def enter_grad_mode(enabled: bool) -> bool:
    """Set grad mode to ``enabled``; return the mode before (for :func:`exit_grad_mode`)."""
    prev = torch.is_grad_enabled()
    torch._C._set_grad_enabled(enabled)
    return prev


@has_side_effect
def exit_grad_mode(prev: bool) -> None:
    """Restore the grad mode :func:`enter_grad_mode` returned."""
    torch._C._set_grad_enabled(prev)
