"""Differential checks of a rewrite: run two graphs, compare their outputs.

Tolerances depend on the output dtype. A comparison is relative to the
reference's scale: ``|a - b| <= atol * scale + rtol * |b|`` elementwise,
where ``scale = max(1, max|b|)``, so large-valued outputs are not held to
an absolute bound made for unit-sized ones. NaN/inf must appear in the same
places in both.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.utils._pytree as pytree

# (rtol, atol) per dtype. fp32 leaves room for re-association of sums (a
# fused kernel accumulates in another order); bf16/fp16 are one or two ulps.
DTYPE_TOLERANCES = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def tolerance_for(dtype: torch.dtype) -> tuple:
    return DTYPE_TOLERANCES.get(dtype, (0.0, 0.0))


@dataclass
class Mismatch:
    """Why two outputs differ: which output, and by how much."""

    output: str
    message: str
    max_abs_diff: float = float("nan")
    max_rel_diff: float = float("nan")

    def __str__(self) -> str:
        return f"{self.output}: {self.message}"


def flatten_outputs(out: Any) -> list:
    """(name, value) pairs for every leaf of a nested output structure."""
    leaves, spec = pytree.tree_flatten(out)
    if len(leaves) == 1 and isinstance(out, torch.Tensor):
        return [("output", out)]
    paths = _paths(out)
    if len(paths) != len(leaves):
        paths = [f"output[{i}]" for i in range(len(leaves))]
    return list(zip(paths, leaves))


def _paths(x: Any, prefix: str = "output") -> list:
    if isinstance(x, (list, tuple)):
        out = []
        for i, v in enumerate(x):
            out.extend(_paths(v, f"{prefix}[{i}]"))
        return out
    if isinstance(x, dict):
        out = []
        for k, v in x.items():
            out.extend(_paths(v, f"{prefix}[{k!r}]"))
        return out
    return [prefix]


def compare_outputs(
    reference: Any, candidate: Any, tolerance: Optional[tuple] = None, check_values: bool = True,
    prefix: bool = False,
) -> Optional[Mismatch]:
    """The first output where ``candidate`` departs from ``reference``, or None.

    ``tolerance=(rtol, atol)`` overrides the per-dtype defaults.
    ``check_values=False`` checks only structure, shapes, dtypes and that the
    candidate is finite where the reference is (for architecture passes).
    ``prefix=True``: the candidate may have more output leaves; the first
    ones are compared with the reference's, the extra ones must be finite.
    """
    ref = flatten_outputs(reference)
    cand = flatten_outputs(candidate)
    if prefix and len(cand) > len(ref):
        for name, extra in cand[len(ref):]:
            if isinstance(extra, torch.Tensor) and extra.is_floating_point() and not bool(torch.isfinite(extra).all()):
                return Mismatch(name, "an added output has non-finite values")
        cand = [(n, v) for (n, _), (_, v) in zip(ref, cand)]
    if len(ref) != len(cand):
        return Mismatch("output", f"has {len(cand)} leaves, expected {len(ref)}")
    for (name, r), (_, c) in zip(ref, cand):
        if isinstance(r, torch.Tensor) != isinstance(c, torch.Tensor):
            return Mismatch(name, f"is a {type(c).__name__}, expected {type(r).__name__}")
        if not isinstance(r, torch.Tensor):
            if check_values and r != c:
                return Mismatch(name, f"is {c!r}, expected {r!r}")
            continue
        if r.shape != c.shape:
            return Mismatch(name, f"has shape {tuple(c.shape)}, expected {tuple(r.shape)}")
        if r.dtype != c.dtype:
            return Mismatch(name, f"has dtype {c.dtype}, expected {r.dtype}")
        if not r.is_floating_point() and not r.is_complex():
            if check_values and not torch.equal(r, c):
                n = int((r != c).sum())
                return Mismatch(name, f"{n} of {r.numel()} integer/bool elements differ")
            continue
        rf, cf = r.detach().double(), c.detach().double()
        r_fin, c_fin = torch.isfinite(rf), torch.isfinite(cf)
        if not torch.equal(r_fin, c_fin) and (check_values or bool((r_fin & ~c_fin).any())):
            n = int((r_fin != c_fin).sum())
            return Mismatch(name, f"non-finite values in {n} places where the reference differs")
        if not check_values or rf.numel() == 0:
            continue
        same_nonfinite = (~r_fin) & ~(rf == cf) & ~(torch.isnan(rf) & torch.isnan(cf))
        if bool(same_nonfinite.any()):
            return Mismatch(name, "infinities of different sign")
        rtol, atol = tolerance or tolerance_for(r.dtype)
        rv, cv = rf[r_fin], cf[r_fin]
        if rv.numel() == 0:
            continue
        diff = (rv - cv).abs()
        scale = max(1.0, float(rv.abs().max()))
        bound = atol * scale + rtol * rv.abs()
        if bool((diff > bound).any()):
            max_abs = float(diff.max())
            max_rel = float((diff / rv.abs().clamp_min(1e-12)).max())
            return Mismatch(
                name,
                f"max |diff| {max_abs:.3g} (max rel {max_rel:.3g}) exceeds rtol={rtol:g}, atol={atol:g}"
                f" x scale {scale:.3g} for {r.dtype}",
                max_abs,
                max_rel,
            )
    return None


def random_like_inputs(args: tuple, generator: torch.Generator) -> tuple:
    """Fresh inputs of the same spec as ``args``, for a second verification run.

    Floating tensors are redrawn from a normal with the example's mean and
    std, clamped to the example's range. Integer tensors have their first dimension shuffled (so each column
    keeps its own ids, in range of its own table, and lengths stay valid),
    except non-decreasing 1-D ones starting at 0, which look like offsets and
    are kept. Bools and non-tensors are kept. A set that still makes the
    original model fail is dropped by the caller, with a note.
    """

    def redraw(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            return x
        if x.is_floating_point():
            xf = x.detach().float()
            std = float(xf.std()) if x.numel() > 1 else 1.0
            std = std if std > 0 and std == std else 1.0
            mean = float(xf.mean())
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
            # Clamped to the example's range: inputs such as timestamps or
            # probabilities are only valid inside it (log1p of a negative
            # time is NaN).
            lo, hi = float(xf.min()), float(xf.max())
            return (noise * std + mean).clamp(lo, hi).to(device=x.device, dtype=x.dtype)
        if x.dtype == torch.bool:
            return x
        if x.dim() == 1 and x.numel() > 1 and int(x[0]) == 0 and bool((x[1:] >= x[:-1]).all()):
            return x
        perm = torch.randperm(x.shape[0], generator=generator)
        return x[perm.to(x.device)]

    return tuple(pytree.tree_map(redraw, a) for a in args)


@contextlib.contextmanager
def eval_mode_restored(module: Optional[torch.nn.Module]):
    """Put ``module`` in eval mode for the block; restore its mode and buffers after.

    Buffers (BatchNorm running statistics) are copied back, so running a
    graph for verification leaves no trace in the model. ``None`` is a no-op.
    """
    if module is None:
        yield
        return
    saved = {k: v.detach().clone() for k, v in module.named_buffers()}
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
        with torch.no_grad():
            for k, v in module.named_buffers():
                if k in saved and v.shape == saved[k].shape:
                    v.copy_(saved[k])


def run_deterministic(fn: Callable, args: tuple, seed: int = 0, module: Optional[torch.nn.Module] = None) -> Any:
    """Call ``fn(*args)`` in eval mode under no_grad with a fixed RNG seed.

    ``module`` (default: ``fn`` itself when it is a module) is put in eval
    mode for the call and its buffers restored afterwards
    (:func:`eval_mode_restored`).
    """
    if module is None and isinstance(fn, torch.nn.Module):
        module = fn
    with eval_mode_restored(module), torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(*args)


# Relative tolerance on the gradient vector: a re-associated sum moves fp32
# gradients by ~1e-6 relative; a wrong backward moves them by far more.
GRAD_RTOL = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def parameter_gradients(module: torch.nn.Module, args: tuple, seed: int = 0) -> Optional[dict]:
    """``{id(param): grad}`` of a fixed random projection of ``module(*args)``.

    The loss is ``Σ_leaf (leaf * w_leaf).sum()`` with weights drawn from a
    generator seeded by ``seed`` (so two graphs with equal outputs get the
    same loss). Computed with ``torch.autograd.grad`` in eval mode under a
    fixed RNG seed; ``.grad`` fields are untouched and buffers restored.
    Returns None when nothing is differentiable (no trainable parameter
    reaches a floating output).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return None
    with eval_mode_restored(module):
        with torch.enable_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = module(*args)
        leaves = [t for _, t in flatten_outputs(out)
                  if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
        if not leaves:
            return None
        gen = torch.Generator().manual_seed(seed + 1)
        loss = sum((t * torch.randn(t.shape, generator=gen).to(t)).sum() for t in leaves)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {id(p): (g if g is not None else torch.zeros_like(p)) for p, g in zip(params, grads)}


def compare_gradients(reference: dict, candidate: dict, names: dict, rtol: Optional[float] = None) -> Optional[Mismatch]:
    """Whether the candidate's parameter gradients match the reference's.

    Only parameters present in both are compared (a pass may replace some).
    Fails when the difference, over all shared parameters together, exceeds
    ``GRAD_RTOL`` of the reference gradient's norm; names the parameter with
    the largest share of the difference. ``rtol`` overrides the per-dtype
    default (passes with a declared numeric tolerance, such as FP8).
    """
    shared = [k for k in reference if k in candidate]
    if not shared:
        return None
    ref_sq = sum(float(reference[k].double().pow(2).sum()) for k in shared)
    diffs = {k: float((reference[k].double() - candidate[k].double()).pow(2).sum()) for k in shared}
    total = sum(diffs.values()) ** 0.5
    if rtol is None:
        rtol = max(GRAD_RTOL.get(reference[k].dtype, 1e-3) for k in shared)
    if total <= rtol * ref_sq ** 0.5 + 1e-12:
        return None
    worst = max(diffs, key=diffs.get)
    return Mismatch(
        f"grad[{names.get(worst, '?')}]",
        f"parameter gradients differ: |Δgrad| = {total:.3g} vs |grad| = {ref_sq ** 0.5:.3g} "
        f"(rtol {rtol:g}); the worst parameter's |Δ| is {diffs[worst] ** 0.5:.3g}",
        total,
        total / max(ref_sq ** 0.5, 1e-30),
    )
