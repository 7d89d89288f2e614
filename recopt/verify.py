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
def eval_mode_restored(module: Optional[torch.nn.Module], training: bool = False):
    """Put ``module`` in eval mode (``training=True``: train mode) for the block;
    restore its mode and buffers after.

    Buffers (BatchNorm running statistics) are copied back, so running a
    graph for verification leaves no trace in the model. ``None`` is a no-op.
    """
    if module is None:
        yield
        return
    saved = {k: v.detach().clone() for k, v in module.named_buffers()}
    was_training = module.training
    module.train(training)
    try:
        yield
    finally:
        module.train(was_training)
        with torch.no_grad():
            for k, v in module.named_buffers():
                if k in saved and v.shape == saved[k].shape:
                    v.copy_(saved[k])


def run_deterministic(fn: Callable, args: tuple, seed: int = 0, module: Optional[torch.nn.Module] = None,
                      training: bool = False) -> Any:
    """Call ``fn(*args)`` in eval mode (or train mode) under no_grad with a fixed RNG seed.

    ``module`` (default: ``fn`` itself when it is a module) is put in the
    mode for the call and its buffers restored afterwards
    (:func:`eval_mode_restored`).
    """
    from .state import clone_inputs, rng_devices

    if module is None and isinstance(fn, torch.nn.Module):
        module = fn
    # On copies of the inputs: a forward that mutates an input (x.mul_(2))
    # sees the same values on every run, and the caller's stay untouched.
    with eval_mode_restored(module, training), torch.no_grad(), \
            torch.random.fork_rng(devices=rng_devices(args)):
        torch.manual_seed(seed)
        return fn(*clone_inputs(args))


# Relative tolerance on the gradient vector: a re-associated sum moves fp32
# gradients by ~1e-6 relative; a wrong backward moves them by far more.
GRAD_RTOL = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def parameter_gradients(module: torch.nn.Module, args: tuple, seed: int = 0, training: bool = False,
                        with_output: bool = False) -> Any:
    """``{id(param): grad}`` of a fixed random projection of ``module(*args)``.

    The loss is ``Σ_leaf (leaf * w_leaf).sum()`` with weights drawn from a
    generator seeded by ``seed`` (so two graphs with equal outputs get the
    same loss). Computed with ``torch.autograd.grad`` in eval mode under a
    fixed RNG seed; ``.grad`` fields are untouched and buffers restored.
    Returns None when nothing is differentiable (no trainable parameter
    reaches a floating output). ``training=True`` runs in train mode (same
    seed, so dropout masks match between graphs that draw them alike).
    ``with_output=True`` returns ``(grads, output)``.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return (None, None) if with_output else None
    from .state import clone_inputs, rng_devices

    with eval_mode_restored(module, training):
        with torch.enable_grad(), torch.random.fork_rng(devices=rng_devices(args)):
            torch.manual_seed(seed)
            out = module(*clone_inputs(args))  # copies: the caller's inputs stay untouched
        leaves = [t for _, t in flatten_outputs(out)
                  if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
        if not leaves:
            return (None, out) if with_output else None
        gen = torch.Generator().manual_seed(seed + 1)
        loss = sum((t * torch.randn(t.shape, generator=gen).to(t)).sum() for t in leaves)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = {id(p): (g if g is not None else torch.zeros_like(p)) for p, g in zip(params, grads)}
    if with_output:
        return grads, pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out)
    return grads


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
    dtypes = {k: reference[k].dtype for k in shared}
    ref, cand = {}, {}
    for k in shared:
        # nn.Embedding(sparse=True) gives sparse gradients: compare their dense values.
        r, c = (t.detach().to_dense() if t.is_sparse else t.detach() for t in (reference[k], candidate[k]))
        r, c = r.double(), c.double()
        if r.shape != c.shape:
            return Mismatch(f"grad[{names.get(k, '?')}]", f"has shape {tuple(c.shape)}, expected {tuple(r.shape)}")
        # NaN/inf gradients in the same places with the same values are equal
        # (a cold-start row can make both graphs' backward NaN); elsewhere
        # they are a mismatch. Only finite entries enter the norms.
        r_fin, c_fin = torch.isfinite(r), torch.isfinite(c)
        same_nonfinite = (r == c) | (torch.isnan(r) & torch.isnan(c))
        if not torch.equal(r_fin, c_fin) or bool((~r_fin & ~same_nonfinite).any()):
            n = int(((r_fin != c_fin) | (~r_fin & ~same_nonfinite)).sum())
            return Mismatch(f"grad[{names.get(k, '?')}]",
                            f"non-finite gradient entries differ from the reference in {n} places")
        ref[k], cand[k] = torch.where(r_fin, r, 0.0), torch.where(c_fin, c, 0.0)
    reference, candidate = ref, cand
    ref_sq = sum(float(reference[k].pow(2).sum()) for k in shared)
    diffs = {k: float((reference[k] - candidate[k]).pow(2).sum()) for k in shared}
    total = sum(diffs.values()) ** 0.5
    if rtol is None:
        rtol = max(GRAD_RTOL.get(dtypes[k], 1e-3) for k in shared)
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


# -- the verifier ------------------------------------------------------------

MODES = ("eval", "train")


@dataclass
class VerifyConfig:
    """How every rewrite is checked (``optimize(verify=...)``, ``PassManager(verify=...)``).

    - ``enabled``: check rewrites at all (False: passes are trusted; shapes
      are still propagated on the example inputs).
    - ``edge_inputs``: also verify on input sets derived from the example
      that try the edges (batch 1, a new batch size, each sequence dim at 1
      and at a new length, length tensors with a 0, masks with all-False and
      all-True rows; see :mod:`recopt.edge_inputs`).
    - ``n_random_inputs``: extra sets with the example's shapes and fresh values.
    - ``inputs``: more input tuples to verify on (real batches).
    - ``gradients``: exact passes must also keep the parameter gradients.
    - ``modes``: ``"eval"`` and/or ``"train"``. Outputs on every set are
      checked in eval mode; in train mode (run with a fixed RNG seed, so
      dropout masks match) the example's outputs and gradients are checked,
      for graphs with mode-dependent parts (dropout, BatchNorm, MHA).
    - ``seed``: the RNG seed of every verification run.
    - ``lowering``: ``optimize`` also runs what it hands over (the lean
      eager forward, or the Inductor-compiled graph: compiled at optimize
      time, not on the first call) beside the verified graph, in each mode
      that runs, and runs the graph's own forward where they differ
      (:mod:`recopt.lowering_check`). ``False`` skips that check (and the
      compile it costs); ``enabled=False`` skips it too.
    - ``lowering_inputs``: how many verification sets whose shapes differ
      from the example's the lowering is also checked on (0: the example
      only). Under Inductor each is one more compile per mode: the first
      new shape compiles the dynamic-shape graph that serves every later
      size.
    """

    enabled: bool = True
    edge_inputs: bool = True
    n_random_inputs: int = 0
    inputs: tuple = ()
    gradients: bool = True
    modes: tuple = MODES
    seed: int = 0
    lowering: bool = True
    lowering_inputs: int = 2

    def __post_init__(self):
        self.inputs = tuple(tuple(v) if isinstance(v, (tuple, list)) else (v,) for v in self.inputs)
        self.modes = tuple(self.modes)
        bad = [m for m in self.modes if m not in MODES]
        if bad or "eval" not in self.modes:
            from .errors import InputError

            raise InputError(f"VerifyConfig.modes must include 'eval' and only {MODES}; got {self.modes!r}")
        if self.n_random_inputs < 0:
            from .errors import InputError

            raise InputError(f"VerifyConfig.n_random_inputs must be >= 0, got {self.n_random_inputs}")
        if not isinstance(self.lowering_inputs, int) or isinstance(self.lowering_inputs, bool) \
                or self.lowering_inputs < 0:
            from .errors import InputError

            raise InputError(f"VerifyConfig.lowering_inputs must be an int >= 0, got {self.lowering_inputs!r}")

    @classmethod
    def coerce(cls, verify: Any) -> "VerifyConfig":
        """``True``/``False``/``None``/a VerifyConfig → a VerifyConfig."""
        if isinstance(verify, VerifyConfig):
            return verify
        if verify is None or isinstance(verify, bool):
            return cls(enabled=verify is not False)
        from .errors import InputError

        raise InputError(f"verify must be True, False or a recopt.VerifyConfig, got {verify!r}")


_MODE_DEPENDENT_MODULES = (
    torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer,
)


def has_mode_dependent_parts(gm: torch.nn.Module) -> bool:
    """Whether running ``gm`` in train mode may differ from eval mode."""
    if any(isinstance(m, _MODE_DEPENDENT_MODULES) for m in gm.modules()):
        return True
    graph = getattr(gm, "graph", None)
    if graph is None:
        return False
    for n in graph.nodes:
        if n.op in ("call_function", "call_method"):
            name = getattr(n.target, "__name__", str(n.target))
            if "dropout" in name or "batch_norm" in name or "training" in str(n.kwargs):
                return True
    return False


@dataclass
class CheckResult:
    """The verdict on one rewritten graph: ``failure`` (None when it holds)."""

    failure: Optional[str] = None
    outputs: Optional[list] = None
    gradients: Optional[dict] = None  # mode → {id(param): grad}


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class Verifier:
    """Owns the verification input sets, the reference outputs per set and
    the gradient references per mode, for one pipeline run.

    :meth:`prepare` builds the sets (example, edge cases, random, user
    sets) and runs the graph before any pass on them; a set the original
    graph rejects is dropped with a note (that dim is then kept fixed).
    :meth:`check` runs a rewritten graph on every set and compares;
    :meth:`accept` makes a checked graph the new reference.
    """

    def __init__(self, config: Optional[VerifyConfig] = None, training: Optional[bool] = None):
        """``training``: the mode the graph is used in. ``None`` (a graph that
        serves both modes): outputs are checked in eval mode on every set and,
        where the graph has mode-dependent parts, in train mode on the
        example. ``True``/``False`` (a graph for one mode): every run is in
        that mode."""
        self.config = config or VerifyConfig()
        self.training = training
        self._run_training = bool(training)
        self.set_names: list = []
        self.sets: list = []
        self.outputs: list = []
        self.notes: list = []
        self._graph = None
        self._modes = ("eval",)
        self._grad_refs: dict = {}  # mode -> (gm, grads or None, output)

    # -- setup -------------------------------------------------------------
    def prepare(self, gm: torch.nn.Module, example_inputs: tuple, example_output: Any = None,
                input_filter: Optional[Callable] = None, names: Optional[list] = None) -> Any:
        """Build the input sets and their reference outputs from ``gm`` (the graph before any pass).

        ``example_output``: ``gm``'s output on the example (computed here
        with shape propagation when None). ``input_filter(args) -> bool``:
        sets it refuses are not tried (a Dynamo graph's shape guards).
        Returns the example output.
        """
        from .graph.shapes import propagate_shapes

        cfg = self.config
        args = tuple(example_inputs)
        self._graph = gm
        if example_output is None:
            example_output = run_deterministic(lambda *a: propagate_shapes(gm, a), args, cfg.seed, module=gm,
                                               training=self._run_training)
        self.sets, self.set_names, self.outputs = [args], ["the example inputs"], [example_output]
        if not cfg.enabled:
            return example_output
        if self.training is not None:
            self._modes = ("train",) if self.training else ("eval",)
        elif cfg.modes != ("eval",) and "train" in cfg.modes and has_mode_dependent_parts(gm):
            self._modes = ("eval", "train")
        candidates = []
        if names is None and hasattr(gm, "graph"):
            names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
        if cfg.edge_inputs:
            from .edge_inputs import edge_input_sets

            edge, _, batch, seq_sizes = edge_input_sets(args, gm if hasattr(gm, "graph") else None, names, cfg.seed)
            candidates.extend(edge)
            self._sizes = {"batch": batch, **{f"seq:{s}": s for s in seq_sizes}}
        else:
            self._sizes = {}
        from .edge_inputs import InputSet, fresh_values, infer_input_kinds

        if cfg.n_random_inputs:
            infos = infer_input_kinds(args, gm if hasattr(gm, "graph") else None, names)[0]
            for k in range(cfg.n_random_inputs):
                candidates.append(InputSet.of(f"random input set {k + 1}",
                                              fresh_values(args, infos, cfg.seed + 101 + k)))
        for k, extra in enumerate(cfg.inputs):
            candidates.append(InputSet.of(f"verify input {k + 1}", tuple(extra)))
        self._add_sets(gm, candidates, input_filter)
        return example_output

    def _add_sets(self, gm, candidates: list, input_filter: Optional[Callable]) -> None:
        failed: dict = {}
        passed: set = set()
        for cand in candidates:
            err = None
            for make in cand.tries:
                args = make()
                if input_filter is not None and not input_filter(args):
                    err = "outside the captured graph's shape guards"
                    continue
                try:
                    # gm.forward, not gm(...): fx's call wrapper prints the generated code to
                    # stderr on every exception, and a rejected set is an expected outcome here.
                    probe = gm.forward if isinstance(gm, torch.fx.GraphModule) else gm
                    out = run_deterministic(probe, args, self.config.seed, module=gm if probe is not gm else None,
                                            training=self._run_training)
                except Exception as e:  # the original rejects this set: it is not one the model accepts
                    err = _first_line(e)
                    continue
                self.sets.append(args)
                self.set_names.append(cand.name)
                self.outputs.append(out)
                passed.add(cand.varies or cand.name)
                err = None
                break
            if err is not None:
                failed.setdefault(cand.varies or cand.name, []).append((cand.name, err))
        for key, cases in failed.items():
            name, why = cases[0]
            if key == "batch" and key not in passed:
                self.notes.append(f"batch size kept fixed at {self._sizes.get('batch')} in verification: "
                                  f"the model fails at {name} ({why})")
            elif key.startswith("seq:") and key not in passed:
                self.notes.append(f"sequence dim {key[4:]} kept fixed in verification: the model fails "
                                  f"with {name} ({why})")
            else:
                for name, why in cases:
                    self.notes.append(f"verification input set '{name}' dropped: the original graph fails on it ({why})")

    @property
    def modes(self) -> tuple:
        return self._modes

    def summary(self) -> str:
        """One line: how many input sets and which modes each rewrite is checked on."""
        return (f"each rewrite verified on {len(self.sets)} input set(s) ({', '.join(self.set_names)}); "
                f"modes: {', '.join(self._modes)}")

    # -- checking ----------------------------------------------------------
    def check(self, gm: torch.nn.Module, *, exact: bool = True, tolerance: Optional[tuple] = None,
              prefix: bool = False, gradients: bool = True, grad_rtol: Optional[float] = None,
              input_filter: Optional[Callable] = None) -> CheckResult:
        """Run ``gm`` on every set (shapes propagated on the example) and compare.

        ``exact``: values must match within tolerance (else only structure,
        shapes, dtypes and finiteness). ``gradients``: also compare parameter
        gradients (exact passes) in every verified mode. ``input_filter(args)
        -> bool``: sets it refuses are skipped (the shape guards passes
        recorded: a call breaking them re-specialises, so the graph never
        runs on such inputs); their reference output is kept.
        """
        from .graph.shapes import propagate_shapes

        cfg = self.config
        try:
            if hasattr(gm, "graph"):
                gm.graph.lint()
                gm.recompile()
        except Exception as e:
            return CheckResult(f"the rewritten graph is malformed: {type(e).__name__}: {e}")
        outputs = []
        for i, (name, args) in enumerate(zip(self.set_names, self.sets)):
            if i > 0 and input_filter is not None and not input_filter(args):
                outputs.append(self.outputs[i])
                continue
            try:
                if i == 0:
                    out = run_deterministic(lambda *a: propagate_shapes(gm, a), args, cfg.seed, module=gm,
                                            training=self._run_training)
                else:
                    out = run_deterministic(gm, args, cfg.seed, training=self._run_training)
            except Exception as e:
                return CheckResult(f"the rewritten graph fails to run: {_first_line(e)} (on {name})")
            outputs.append(out)
            if not cfg.enabled:
                break
            mismatch = compare_outputs(self.outputs[i], out, tolerance=tolerance, check_values=exact, prefix=prefix)
            if mismatch is not None:
                return CheckResult(f"{mismatch} (on {name})")
        grads = {}
        if cfg.enabled and gradients and exact and cfg.gradients:
            for mode in self._modes:
                failure, g = self._check_mode(gm, mode, grad_rtol, tolerance, prefix)
                if failure is not None:
                    return CheckResult(failure)
                grads[mode] = g
        return CheckResult(None, outputs, grads)

    def _reference(self, mode: str) -> tuple:
        ref = self._grad_refs.get(mode)
        if ref is not None and ref[0] is self._graph:
            return ref
        try:
            grads, out = parameter_gradients(self._graph, self.sets[0], self.config.seed,
                                             training=mode == "train", with_output=True)
        except Exception as e:
            self.notes.append(f"gradients not verified in {mode} mode: the graph's backward fails before "
                              f"the pass ({_first_line(e)})")
            grads, out = None, None
        self._grad_refs[mode] = (self._graph, grads, out)
        return self._grad_refs[mode]

    def _check_mode(self, gm, mode: str, grad_rtol, tolerance, prefix) -> tuple:
        _, ref, ref_out = self._reference(mode)
        if ref is None:
            return None, None
        where = "the example inputs" + (" in train mode" if mode == "train" else "")
        try:
            cand, out = parameter_gradients(gm, self.sets[0], self.config.seed, training=mode == "train",
                                            with_output=True)
        except Exception as e:
            return f"the rewritten graph's backward fails: {_first_line(e)} (on {where})", None
        if mode == "train" and not self._run_training and ref_out is not None:
            mismatch = compare_outputs(ref_out, out, tolerance=tolerance, prefix=prefix)
            if mismatch is not None:
                return f"{mismatch} (on {where})", None
        if cand is None:
            # The reference has parameter gradients (ref is not None): a graph
            # whose output no longer reaches any parameter has lost them all.
            return (f"the rewritten graph's outputs no longer depend on any trainable parameter: its "
                    f"parameter gradients are lost (on {where})"), None
        names = {id(p): n for n, p in self._graph.named_parameters()}
        mismatch = compare_gradients(ref, cand, names, grad_rtol)
        if mismatch is not None:
            return f"{mismatch} (on {where})", None
        return None, (cand, out)

    def accept(self, gm: torch.nn.Module, result: CheckResult) -> None:
        """Make ``gm`` (checked by :meth:`check`) the reference for the next rewrite."""
        self._graph = gm
        if result.outputs is not None and len(result.outputs) == len(self.outputs):
            self.outputs = list(result.outputs)
        for mode, g in (result.gradients or {}).items():
            if g is not None:
                self._grad_refs[mode] = (gm, g[0], g[1])
