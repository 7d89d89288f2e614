"""FLOP counting for graphs and sites, from torch.utils.flop_counter's formulas.

:class:`FlopCounter` is a plain dispatch mode over
``torch.utils.flop_counter``'s registry (custom ops registered with
``torch.library.register_flop_formula`` are included). Unlike
``FlopCounterMode`` it installs no module hooks, so it works on any graph,
in no_grad, and costs little.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class FlopCounter(TorchDispatchMode):
    """Counts FLOPs of every op with a registered formula while active.

    ``counter.total`` is the sum; ``counter.by_op`` maps op name → FLOPs.
    An op whose formula raises is counted as 0 and named in
    ``counter.failed`` (op name → ``"ExcType: message"`` of its first
    failure), so the count goes on but a caller can say it is incomplete.
    """

    def __init__(self):
        # Imported here: torch.utils.flop_counter imports triton when it is
        # installed, which `import recopt` should not pay for.
        from torch.utils.flop_counter import flop_registry

        super().__init__()
        self.registry = flop_registry
        self.total = 0
        self.by_op: dict = {}
        self.failed: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = getattr(func, "_overloadpacket", func)
        formula = self.registry.get(packet)
        if formula is not None:
            key = str(packet)
            try:
                n = int(formula(*args, **kwargs, out_val=out))
            except Exception as e:  # a formula's bug must not stop the model; it is recorded
                n = 0
                self.failed.setdefault(key, f"{type(e).__name__}: {_first_line(e)}")
            self.total += n
            self.by_op[key] = self.by_op.get(key, 0) + n
        return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


@dataclass
class FlopCount:
    """FLOPs of one call of a graph, and what the count could not see.

    ``total``: the FLOPs, None if the graph could not be run at all (then
    ``error`` says why). ``failed``: op name → error of its FLOP formula
    (those ops counted as 0). ``fake_run_error``: why the shape-only run
    failed, when the count comes from a real run instead (complete, but
    it cost real compute).
    """

    total: Optional[float]
    failed: dict = field(default_factory=dict)
    fake_run_error: str = ""
    error: str = ""

    @property
    def incomplete(self) -> list:
        """One line per reason the total is missing or too low (empty: complete)."""
        out = [f"{op} counted as 0 (its FLOP formula raised {why})" for op, why in sorted(self.failed.items())]
        if self.total is None:
            out.append(f"not counted: {self.error}")
        return out


def count_flops(fn: Callable, *args: Any, **kwargs: Any) -> tuple:
    """``(result, flops)`` of calling ``fn(*args, **kwargs)``."""
    with FlopCounter() as c:
        out = fn(*args, **kwargs)
    return out, float(c.total)


def graph_flop_count(gm: torch.nn.Module, args: tuple) -> FlopCount:
    """:class:`FlopCount` of one call of ``gm`` on ``args``, computed without real compute.

    Runs the graph on fake tensors (shapes and dtypes only) under
    :class:`FlopCounter`. Ops without a fake implementation (some TorchRec
    modules) make this fall back to a real, counted run
    (``fake_run_error`` says why). ``total`` is None only if both fail
    (``error`` names both failures).
    """
    import torch.fx as fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .state import clone_inputs

    # Copies: a KeyedJaggedTensor caches lengths/offsets on itself, and a
    # fake run must not leave fake tensors in the caller's inputs.
    args = clone_inputs(tuple(args))

    # Counted with autograd enabled, as a training (or plain) forward runs:
    # under no_grad, nn.TransformerEncoderLayer and nn.MultiheadAttention
    # take fused fast paths (one op with no FLOP formula) and would count ~0.
    # No backward is run; fake tensors make the autograd graph free.
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
            with FlopCounter() as counter, torch.enable_grad():
                fx.Interpreter(gm).run(*fake_args) if isinstance(gm, fx.GraphModule) else gm(*fake_args)
        return FlopCount(float(counter.total), dict(counter.failed))
    except Exception as e:  # recorded in fake_run_error; the real run below counts instead
        fake_error = f"{type(e).__name__}: {_first_line(e)}"
    try:
        with FlopCounter() as counter, torch.enable_grad():
            gm(*args)
        return FlopCount(float(counter.total), dict(counter.failed), fake_run_error=fake_error)
    except Exception as e:  # the graph does not run here at all: no count, and why
        return FlopCount(None, dict(counter.failed), fake_run_error=fake_error,
                         error=f"the shape-only run failed ({fake_error}) and so did a real run "
                               f"({type(e).__name__}: {_first_line(e)})")


def count_graph_flops(gm: torch.nn.Module, args: tuple) -> Optional[float]:
    """``graph_flop_count(gm, args).total``: the number alone, for callers that do not
    report on it. Use :func:`graph_flop_count` to know whether the count is complete."""
    return graph_flop_count(gm, args).total


def graph_activation_bytes(gm: torch.nn.Module) -> Optional[float]:
    """Estimated activation memory traffic of one call, from ``tensor_meta``.

    Each computed tensor is counted once when written and once per node
    that reads it (``bytes × (1 + users)``); parameters and inputs are not
    counted. A fusion that removes an intermediate (attention scores)
    lowers it. It is an estimate for comparing graphs, not a measurement:
    kernels may keep values in registers or re-read them. None if the graph
    has no shape metadata.
    """
    import torch.fx as fx

    if not isinstance(gm, fx.GraphModule):
        return None
    total, seen = 0.0, False
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None:
            continue
        seen = True
        # TensorMetadata is itself a NamedTuple: tell it from a tuple of them.
        metas = [meta] if hasattr(meta, "shape") else list(meta) if isinstance(meta, (list, tuple)) else [meta]
        nbytes = 0
        for m in metas:
            shape = getattr(m, "shape", None)
            dtype = getattr(m, "dtype", None)
            if shape is None or dtype is None:
                continue
            numel = 1
            for s in shape:
                numel *= int(s)
            nbytes += numel * torch.empty((), dtype=dtype).element_size()
        total += nbytes * (1 + len(node.users))
    return total if seen else None
