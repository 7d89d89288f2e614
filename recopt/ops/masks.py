"""Masks that rewritten graphs build at run time.

:func:`all_keys` is the ``[B, T]`` all-True key mask the ``hsp`` pass feeds an
HSP when the PMA it replaces had no mask. Registered with ``torch.fx.wrap``
so a retrace keeps it as one leaf call.
"""
from __future__ import annotations

import torch


def all_keys(s: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` all-True key mask for a sequence ``s [B, T, d]`` (poolers without a mask)."""
    return torch.ones(s.shape[:2], dtype=torch.bool, device=s.device)


torch.fx.wrap("all_keys")
