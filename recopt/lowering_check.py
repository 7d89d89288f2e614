"""The lowering check: does what runs compute what the verified graph computes?

Verification (:mod:`recopt.verify`) checks the rewritten fx graph. What a
user calls is the graph's *lowering*: the lean eager forward
(:mod:`recopt.lean`) or ``torch.compile``/Inductor (:func:`recopt.lower.lower`).
A difference between the two would reach the user unseen, so ``optimize``
runs the lowered callable beside the graph before handing it over:

- on the example inputs and on up to ``VerifyConfig.lowering_inputs`` of the
  verification sets whose shapes differ from the example's (a new batch
  size first: under Inductor the second shape compiles the dynamic-shape
  graph that serves every later size; then a size-1 set, which Inductor
  specialises);
- with the same RNG seed for both (dropout masks match where the lowering
  draws random numbers with torch's generator: Inductor does with
  ``fallback_random=True``, which :func:`recopt.lower.lower` sets for graphs
  that draw);
- in the mode that will run: an eval check runs under ``torch.no_grad()``
  (an inference call), a train check with grad mode on and compares the
  gradients of the parameters and of the inputs that require grad, of a
  fixed random projection of the outputs;
- comparing outputs (per-dtype tolerances of :func:`recopt.verify.compare_outputs`)
  and the buffers after the call (a running-statistics or counter update
  that the lowering loses or doubles).

Every run is on copies of the inputs, inside a forked RNG, and the graph's
parameters, buffers, modes and attributes are put back after it, so the
check leaves no trace (``optimize`` restores the caller's model as well).
An exception raised by the lowered callable (Inductor failing to compile)
is a failed check, reported with its first line. The caller decides what a
failure means (``optimize``: the graph's own forward runs, with a report
note and a warning; an error under ``strict``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .state import ModuleState, clone_inputs, rng_devices
from .verify import compare_gradients, compare_outputs, flatten_outputs


@dataclass
class LoweringFailure:
    """Where the lowered callable departed from the graph: the input set and why."""

    set_name: str
    message: str

    def __str__(self) -> str:
        return f"on {self.set_name}: {self.message}"


def differently_shaped_sets(names: Sequence[str], sets: Sequence[tuple], limit: int) -> list:
    """Up to ``limit`` ``(name, args)`` of ``sets[1:]`` whose tensor shapes differ from ``sets[0]``'s
    and from each other: sets that change no size to 1 first, then those that do."""
    if limit <= 0 or not sets:
        return []

    def shapes(args):
        return tuple(tuple(t.shape) for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor))

    base = shapes(sets[0])
    seen = {base}
    grown, to_one = [], []
    for name, args in zip(names[1:], sets[1:]):
        s = shapes(args)
        if s in seen or len(s) != len(base):
            continue
        seen.add(s)
        made_one = any(a != b and b == 1 for sa, sb in zip(base, s) if len(sa) == len(sb)
                       for a, b in zip(sa, sb))
        (to_one if made_one else grown).append((name, args))
    return (grown + to_one)[:limit]


def _run(fn: Callable, gm: fx.GraphModule, args: tuple, training: bool, gradients: bool, seed: int) -> tuple:
    """``fn(*args)`` as the check runs it: ``(detached output, gradients or None, buffers after)``."""
    snapshot = ModuleState(gm)
    try:
        gm.train(training)
        grad_mode = torch.enable_grad() if gradients else torch.no_grad()
        with grad_mode, torch.random.fork_rng(devices=rng_devices(args)):
            torch.manual_seed(seed)
            inputs = clone_inputs(args)
            out = fn(*inputs)
            grads = None
            if gradients:
                grads = _gradients(gm, inputs, out, seed)
        buffers = {name: b.detach().clone() for name, b in gm.named_buffers() if b is not None}
    finally:
        snapshot.restore()
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out), grads, buffers


def _gradients(gm: fx.GraphModule, inputs: tuple, out: Any, seed: int) -> Optional[dict]:
    """Gradients of ``Σ leaf·w`` (weights from a generator seeded ``seed + 1``) with respect to
    ``gm``'s trainable parameters and the input leaves that require grad, keyed by name."""
    targets = {f"parameter {n}": p for n, p in gm.named_parameters() if p.requires_grad}
    for i, t in enumerate(x for x in pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor)):
        if t.requires_grad:
            targets[f"input tensor {i}"] = t
    leaves = [t for _, t in flatten_outputs(out)
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not targets or not leaves:
        return None
    gen = torch.Generator().manual_seed(seed + 1)
    loss = sum((t * torch.randn(t.shape, generator=gen).to(t)).sum() for t in leaves)
    got = torch.autograd.grad(loss, list(targets.values()), allow_unused=True)
    return {name: (g if g is not None else torch.zeros_like(t))
            for (name, t), g in zip(targets.items(), got)}


def check_lowering(gm: fx.GraphModule, runner: Callable, input_sets: Sequence, training: bool, *,
                   gradients: bool = True, seed: int = 0) -> Optional[LoweringFailure]:
    """The first input set where ``runner`` departs from ``gm`` (outputs, gradients or buffers), or None.

    ``input_sets``: ``(name, args)`` pairs, the example first. ``training``:
    the mode both run in; in train mode with ``gradients`` the parameter and
    input gradients are compared too (where anything requires grad).
    """
    for i, (name, args) in enumerate(input_sets):
        try:
            ref_out, ref_grads, ref_bufs = _run(gm, gm, args, training, training and gradients, seed)
        except Exception:  # noqa: BLE001
            if i == 0:   # the example must run in every mode the check covers: a real error
                raise
            # an extra set the graph itself rejects in this mode (it was accepted in the
            # verifier's mode: e.g. torch's MHA takes an empty batch on its no-grad fast path
            # only): nothing to compare the lowering against, and no path is swapped
            continue
        try:
            out, grads, bufs = _run(runner, gm, args, training, training and gradients, seed)
        except Exception as e:  # the lowering itself failed (an Inductor compile error): a failed check
            first = (str(e).strip().splitlines() or [""])[0][:300]
            return LoweringFailure(name, f"the lowered model raised {type(e).__name__}: {first}")
        mismatch = compare_outputs(ref_out, out)
        if mismatch is not None:
            return LoweringFailure(name, f"outputs differ ({mismatch})")
        if (ref_grads is None) != (grads is None):
            return LoweringFailure(name, "gradients: one of the two computed none")
        if ref_grads is not None:
            names = {k: k for k in ref_grads}
            missing = sorted(set(ref_grads) - set(grads))
            if missing:
                return LoweringFailure(name, f"gradients: no gradient for {missing[0]}")
            mismatch = compare_gradients(ref_grads, grads, names)
            if mismatch is not None:
                return LoweringFailure(name, f"gradients differ ({mismatch})")
        mismatch = compare_outputs(ref_bufs, bufs)
        if mismatch is not None:
            return LoweringFailure(name, f"buffers after the call differ ({mismatch.message} at "
                                         f"{mismatch.output.replace('output', 'buffer', 1)})")
    return None
