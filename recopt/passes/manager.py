"""PassManager: run passes in order, verify each rewrite, roll back bad ones.

For every pass the manager:

1. hands the pass a deep copy of the current graph (so a failed or
   rejected rewrite leaves nothing behind);
2. times it; a pass that raises is reported as ``failed`` and skipped
   (or re-raised as :class:`~recopt.errors.PassError` with ``strict=True``);
3. runs the rewritten graph on the example inputs (re-propagating shapes
   and counting FLOPs) and on fresh random inputs of the same spec, and
   compares with the graph before the pass. An ``exact`` pass must match
   within the dtype's tolerance; an ``architecture`` pass must keep output
   structure, shapes, dtypes and finiteness. A failing pass is rolled back
   and the report names the output and the size of the difference.

``RECOPT_DUMP=dir`` (or ``dump_dir=``) writes each graph's code before and
after each pass.
"""
from __future__ import annotations

import copy
import os
import time
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.fx as fx

from ..capture import propagate_shapes
from ..costs import count_graph_flops, graph_activation_bytes
from ..errors import InputError, PassError, VerificationError
from ..report import APPLIED, FAILED, NO_CHANGE, ROLLED_BACK, OptimizationReport, PassRun
from ..targets import Target, get_target
from ..verify import compare_gradients, compare_outputs, parameter_gradients, random_like_inputs, run_deterministic
from .base import REJECTED, REWRITTEN, Pass, PassContext, Semantics
from .registry import get_pass, order_passes


def resolve_passes(spec: Sequence, configs: Optional[dict] = None) -> list:
    """Turn names, Pass classes and Pass instances into ordered Pass instances.

    ``configs`` maps pass name → config (dict or PassConfig) for passes given
    by name or class.
    """
    configs = dict(configs or {})
    instances: list = []
    for item in spec:
        if isinstance(item, Pass):
            inst = item
        elif isinstance(item, type) and issubclass(item, Pass):
            inst = item(configs.pop(item.name, None))
        elif isinstance(item, str):
            cls = get_pass(item)
            inst = cls(configs.pop(item, None))
        else:
            raise InputError(
                f"passes must be names, recopt.Pass subclasses or instances; got {item!r}"
            )
        instances.append(inst)
    if configs:
        raise InputError(
            f"configs given for pass(es) not in the pipeline: {sorted(configs)}; "
            f"pipeline: {[p.name for p in instances]}"
        )
    by_name = {}
    for p in instances:
        if p.name in by_name:
            raise InputError(f"pass {p.name!r} appears twice in the pipeline")
        by_name[p.name] = p
    # order_passes consults the registry; unregistered instances keep their place.
    registered = [p.name for p in instances if _is_registered(p)]
    ordered_names = order_passes(registered) if registered else []
    it = iter(ordered_names)
    return [by_name[next(it)] if _is_registered(p) else p for p in instances]


def _is_registered(p: Pass) -> bool:
    from .registry import available_passes

    return available_passes().get(p.name) is type(p)


def _shared_tensors(gm: torch.nn.Module) -> dict:
    """A deepcopy memo that keeps parameters and buffers shared, not copied.

    The optimized graph then holds the user's own parameters (as
    torch.compile does): training it trains the model, and memory is not
    doubled. Passes must therefore never change a parameter's data in place;
    they create new parameters instead (see :class:`~recopt.passes.base.Pass`).
    """
    memo = {}
    for t in list(gm.parameters()) + list(gm.buffers()):
        memo[id(t)] = t
    return memo


class PassManager:
    """Runs a pipeline of passes with verify-each.

    ``passes``: names, Pass classes or instances. ``target``: a name or
    :class:`~recopt.targets.Target`. ``verify``: check each rewrite (on by
    default). ``strict``: raise instead of skipping a failing or rolled-back
    pass. ``n_random_inputs``: extra random input sets besides the example
    inputs (see :func:`recopt.verify.random_like_inputs`).
    ``verify_inputs``: more input tuples to verify on (real batches).
    ``verify_gradients``: for exact passes, also compare the gradients of
    every shared parameter (a random projection of the outputs, on the
    example inputs): an exact rewrite must not change training either.
    ``options``: extra data for passes (``ctx.options``).
    """

    def __init__(
        self,
        passes: Iterable,
        target: Any = "cpu",
        *,
        configs: Optional[dict] = None,
        verify: bool = True,
        strict: bool = False,
        n_random_inputs: int = 1,
        verify_inputs: Sequence = (),
        dump_dir: Optional[str] = None,
        options: Optional[dict] = None,
        seed: int = 0,
        progress: bool = False,
        verify_gradients: bool = True,
    ):
        self.passes = resolve_passes(list(passes), configs)
        self.verify_gradients = verify_gradients
        self._grad_reference = None  # (graph it belongs to, {id(param): grad}) or None
        self._pending_grads = None
        self.target: Target = get_target(target)
        self.verify = verify
        self.strict = strict
        self.n_random_inputs = n_random_inputs
        self.verify_inputs = [tuple(v) if isinstance(v, (tuple, list)) else (v,) for v in verify_inputs]
        self.dump_dir = dump_dir or os.environ.get("RECOPT_DUMP") or None
        self.options = dict(options or {})
        self.seed = seed
        self.progress = progress

    def _input_sets(self, gm: fx.GraphModule, example_inputs: tuple, report: OptimizationReport,
                    example_output: Any) -> tuple:
        sets = [tuple(example_inputs)]
        gen = torch.Generator().manual_seed(self.seed)
        extra = [random_like_inputs(tuple(example_inputs), gen) for _ in range(self.n_random_inputs)]
        extra += self.verify_inputs
        outputs = [example_output]
        for args in extra:
            try:
                outputs.append(run_deterministic(gm, args, self.seed))
                sets.append(args)
            except Exception as e:
                report.notes.append(
                    f"a verification input set was dropped: the original graph fails on it "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                )
        return sets, outputs

    def run(
        self,
        gm: fx.GraphModule,
        example_inputs: tuple,
        report: Optional[OptimizationReport] = None,
        reference: Optional[tuple] = None,
    ) -> tuple:
        """Run the pipeline on ``gm``; return ``(graph_module, report)``.

        ``reference``: ``(output, flops)`` of ``gm`` on ``example_inputs``
        when the caller has them (capture does), saving one run of the model.
        """
        report = report or OptimizationReport(target=self.target.to_dict())
        if not report.target:
            report.target = self.target.to_dict()
        example_inputs = tuple(example_inputs)
        ctx = PassContext(target=self.target, example_inputs=example_inputs, options=self.options)
        current = gm
        self._grad_reference = self._pending_grads = None
        if reference is None:
            out = run_deterministic(lambda *a: propagate_shapes(current, a), example_inputs, self.seed,
                                    module=current)
            reference = (out, count_graph_flops(current, example_inputs))
        sets, current_outputs = self._input_sets(current, example_inputs, report, reference[0])
        flops = reference[1]
        report.flops_before = flops
        nbytes = graph_activation_bytes(current)
        report.bytes_before = nbytes

        iterator = self.passes
        if self.progress and len(self.passes) > 1:
            from .._progress import progress_bar

            iterator = progress_bar(self.passes, desc="passes")
        for index, p in enumerate(iterator):
            run = PassRun(name=p.name, semantics=p.semantics.value, status=NO_CHANGE, duration_s=0.0,
                          config=p.config.to_dict(), flops_before=flops, flops_after=flops,
                          bytes_before=nbytes, bytes_after=nbytes)
            report.passes.append(run)
            candidate = copy.deepcopy(current, _shared_tensors(current))
            t0 = time.perf_counter()
            try:
                result = p.run(candidate, ctx)
            except Exception as e:
                run.duration_s = time.perf_counter() - t0
                run.status = FAILED
                run.message = f"{type(e).__name__}: {e}"
                if self.strict:
                    raise PassError(f"pass {p.name!r} raised {type(e).__name__}: {e}") from e
                continue
            run.duration_s = time.perf_counter() - t0
            report.sites.extend(result.sites)
            run.n_rewritten = sum(s.status == REWRITTEN for s in result.sites)
            run.n_rejected = sum(s.status == REJECTED for s in result.sites)
            if not result.modified:
                continue

            new_gm = result.graph_module
            t1 = time.perf_counter()
            if p.semantics is Semantics.EXACT:
                self._gradient_reference(current, example_inputs, report)
            failure, new_outputs, new_flops = self._verify(p, new_gm, sets, current_outputs,
                                                           check_gradients=not result.inference_only)
            run.verify_s = time.perf_counter() - t1
            if failure is not None:
                run.status = ROLLED_BACK
                run.message = failure
                for s in result.sites:
                    if s.status == REWRITTEN:
                        s.status = REJECTED
                        s.reason_code = "rolled_back"
                        s.reason = f"rewrite rolled back by verification: {failure}"
                run.n_rejected += run.n_rewritten
                run.n_rewritten = 0
                if self.strict:
                    raise VerificationError(f"pass {p.name!r} changed the model's outputs: {failure}")
                continue
            self._dump(index, p.name, current, new_gm)
            run.status = APPLIED
            run.flops_after = new_flops
            if p.semantics is Semantics.ARCHITECTURE:
                run.message = "architecture change: the model must be retrained"
            elif result.inference_only:
                run.message = "inference-only rewrite: outputs verified, gradients not (do not train this graph)"
            current, current_outputs, flops = new_gm, new_outputs, new_flops
            nbytes = run.bytes_after = graph_activation_bytes(new_gm)
            if self._pending_grads is not None and self._pending_grads[0] is new_gm:
                self._grad_reference = self._pending_grads
            self._pending_grads = None
        report.flops_after = flops
        report.bytes_after = nbytes
        return current, report

    def _verify(self, p: Pass, new_gm: fx.GraphModule, sets: list, reference: list,
                check_gradients: bool = True) -> tuple:
        """(failure message or None, new outputs per input set, FLOPs)."""
        try:
            new_gm.graph.lint()
            new_gm.recompile()
        except Exception as e:
            return f"the rewritten graph is malformed: {type(e).__name__}: {e}", None, None
        outputs = []
        new_flops = None
        for i, args in enumerate(sets):
            try:
                if i == 0:
                    out = run_deterministic(lambda *a: propagate_shapes(new_gm, a), args, self.seed, module=new_gm)
                    new_flops = count_graph_flops(new_gm, args)
                else:
                    out = run_deterministic(new_gm, args, self.seed)
            except Exception as e:
                msg = str(e).splitlines()[0] if str(e) else ""
                return f"the rewritten graph fails to run: {type(e).__name__}: {msg}", None, None
            outputs.append(out)
            if not self.verify:
                continue
            prefix = p.output_contract == "prefix"
            exact = p.semantics is Semantics.EXACT or prefix
            mismatch = compare_outputs(reference[i], out, tolerance=p.tolerance, check_values=exact, prefix=prefix)
            if mismatch is not None:
                which = "the example inputs" if i == 0 else f"random input set {i}"
                return f"{mismatch} (on {which})", None, None
        if self.verify and self.verify_gradients and check_gradients and p.semantics is Semantics.EXACT:
            rtol = p.gradient_rtol if p.gradient_rtol is not None else (p.tolerance[0] if p.tolerance else None)
            failure = self._verify_gradients(new_gm, sets[0], rtol)
            if failure is not None:
                return failure, None, None
        return None, outputs, new_flops

    def _verify_gradients(self, new_gm: fx.GraphModule, args: tuple, rtol: Optional[float] = None) -> Optional[str]:
        """Failure message if the rewrite changed parameter gradients, else None."""
        base_gm, ref = self._grad_reference or (None, None)
        if base_gm is None:
            return None
        try:
            cand = parameter_gradients(new_gm, args, self.seed)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else ""
            return f"the rewritten graph's backward fails: {type(e).__name__}: {msg}"
        if ref is None or cand is None:
            return None
        names = {id(p): n for n, p in base_gm.named_parameters()}
        mismatch = compare_gradients(ref, cand, names, rtol)
        if mismatch is None:
            self._pending_grads = (new_gm, cand)  # becomes the reference if the pass is kept
            return None
        return f"{mismatch} (on the example inputs)"

    def _gradient_reference(self, gm: fx.GraphModule, args: tuple, report: OptimizationReport) -> None:
        """Compute the gradients exact passes are checked against (once per graph version)."""
        if not (self.verify and self.verify_gradients):
            return
        if self._grad_reference is not None and self._grad_reference[0] is gm:
            return
        try:
            self._grad_reference = (gm, parameter_gradients(gm, args, self.seed))
        except Exception as e:
            self._grad_reference = (gm, None)
            report.notes.append(f"gradients not verified: the graph's backward fails before any pass "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")

    def _dump(self, index: int, name: str, before: fx.GraphModule, after: fx.GraphModule) -> None:
        if not self.dump_dir:
            return
        os.makedirs(self.dump_dir, exist_ok=True)
        for tag, g in (("before", before), ("after", after)):
            path = os.path.join(self.dump_dir, f"{index:02d}_{name}_{tag}.py")
            with open(path, "w") as f:
                f.write(g.code)
