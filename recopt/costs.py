"""FLOP counting for graphs and sites, from torch.utils.flop_counter's formulas.

:class:`FlopCounter` is a plain dispatch mode over
``torch.utils.flop_counter``'s registry (custom ops registered with
``torch.library.register_flop_formula`` are included). Unlike
``FlopCounterMode`` it installs no module hooks, so it works on any graph,
in no_grad, and costs little.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class FlopCounter(TorchDispatchMode):
    """Counts FLOPs of every op with a registered formula while active.

    ``counter.total`` is the sum; ``counter.by_op`` maps op name → FLOPs.
    """

    def __init__(self):
        super().__init__()
        self.total = 0
        self.by_op: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = getattr(func, "_overloadpacket", func)
        formula = flop_registry.get(packet)
        if formula is not None:
            try:
                n = int(formula(*args, **kwargs, out_val=out))
            except Exception:
                n = 0
            self.total += n
            key = str(packet)
            self.by_op[key] = self.by_op.get(key, 0) + n
        return out


def count_flops(fn: Callable, *args: Any, **kwargs: Any) -> tuple:
    """``(result, flops)`` of calling ``fn(*args, **kwargs)``."""
    with FlopCounter() as c:
        out = fn(*args, **kwargs)
    return out, float(c.total)
