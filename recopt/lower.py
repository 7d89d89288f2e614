"""Lowering: run the rewritten graph eagerly or compile it with Inductor.

Also provides :func:`recopt_backend`, a torch.compile backend: with
``torch.compile(model, backend="recopt")`` Dynamo's graph goes through the
default recopt pipeline (verify-each included), then Inductor. The backend
is registered under the name ``"recopt"`` through the package's
``torch_dynamo_backends`` entry point and by :func:`register_dynamo_backend`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.fx as fx

from .errors import InputError

BACKENDS = ("inductor", "eager")
log = logging.getLogger("recopt")


def default_backend(target) -> str:
    """The target's ``default_backend`` if it names one; else Inductor on a GPU, eager otherwise."""
    chosen = getattr(target, "default_backend", None)
    if chosen:
        return chosen
    return "inductor" if getattr(target, "device", "cpu") == "cuda" else "eager"


def lower(gm: fx.GraphModule, backend: str, compile_options: dict = None) -> Callable:
    """Return a callable running ``gm`` with ``backend`` ("inductor" or "eager").

    Eager runs ``gm``'s graph through :class:`recopt.lean.LeanForward`
    (submodules bound once; parameters still read from their modules).
    """
    if backend == "eager":
        from .lean import lean_forward

        return lean_forward(gm)
    if backend == "inductor":
        return torch.compile(gm, backend="inductor", **(compile_options or {}))
    raise InputError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")


def recopt_backend(gm: fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
    """torch.compile backend: recopt's default passes on Dynamo's graph, then Inductor.

    Dynamo hands over real example tensors, so verify-each runs as in
    ``recopt.optimize``. The report of the last compiled graph is kept in
    :data:`last_reports`.
    """
    from torch._inductor.compile_fx import compile_fx

    from .capture import propagate_shapes
    from .passes.manager import PassManager
    from .targets import detect_target

    target = detect_target()
    args = tuple(example_inputs)
    try:
        propagate_shapes(gm, args)
        manager = PassManager(None, target)  # the default pipeline, via the one resolver
        gm, report = manager.run(gm, args)
        report.capture_method = "dynamo (torch.compile backend)"
        report.backend = "inductor"
        last_reports.append(report)
        del last_reports[:-16]
    except Exception as e:  # never break the user's torch.compile
        log.warning("recopt backend: passes skipped (%s: %s); compiling the graph unchanged", type(e).__name__, e)
    return compile_fx(gm, example_inputs)


last_reports: list = []


def register_dynamo_backend() -> None:
    """Register :func:`recopt_backend` as torch.compile backend ``"recopt"`` (idempotent)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "recopt" not in _BACKENDS or _BACKENDS["recopt"] is None:
        register_backend(name="recopt")(recopt_backend)
