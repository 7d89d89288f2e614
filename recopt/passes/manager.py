"""PassManager: run passes in order, verify each rewrite, roll back bad ones.

For every pass: **copy → run → check → accept or roll back → record**.

1. copy: the pass gets a deep copy of the current graph (parameters and
   buffers shared), so a failed or rejected rewrite leaves nothing behind;
2. run: timed; a pass that raises or returns something other than a
   :class:`~recopt.passes.base.PassResult` is reported as ``failed`` and
   skipped (a :class:`~recopt.errors.PassError` naming it with ``strict=True``);
3. tidy and check: the manager removes dead code from the returned graph
   (never in-place ops or random draws:
   :func:`recopt.graph.nodes.has_side_effects`), lints and recompiles it,
   once per pass, so a pass need not do it itself (a graph that does not
   lint fails the pass); then the :class:`~recopt.verify.Verifier` runs it on
   every verification input set (the example and the edge cases derived
   from it) and compares with the graph before the pass; an ``exact`` pass
   must match within the dtype's tolerance (and keep parameter gradients),
   an ``architecture`` pass must keep output structure, shapes, dtypes and
   finiteness;
4. accept (the rewrite becomes the reference for the next pass) or roll
   back (the copy is dropped, its sites become ``rejected``/``rolled_back``
   with the output, the difference and the input set named);
5. record: status, timings, FLOPs and activation bytes in the report.

``RECOPT_DUMP=dir`` (or ``dump_dir=``) writes each graph's code before and
after each pass.
"""
from __future__ import annotations

import copy
import os
import time
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx

from ..costs import graph_activation_bytes, graph_flop_count
from ..errors import InputError, PassError, VerificationError
from ..report import APPLIED, FAILED, NO_CHANGE, ROLLED_BACK, OptimizationReport, PassRun
from ..graph.nodes import tidy_graph
from ..guards import compile_guards
from ..state import TensorValues
from ..targets import Target, get_target
from ..verify import CheckResult, VerifyConfig, Verifier, run_deterministic
from .base import REJECTED, REWRITTEN, Pass, PassContext, PassResult, Semantics
from .registry import resolve_pipeline

_LEGACY_VERIFY_KEYWORDS = {"n_random_inputs": "n_random_inputs", "verify_inputs": "inputs",
                           "verify_gradients": "gradients", "seed": "seed"}


def verify_config_with_legacy(verify: Any, legacy: dict) -> VerifyConfig:
    """``verify`` as a VerifyConfig, with the legacy keywords (``n_random_inputs=``,
    ``verify_inputs=``, ``verify_gradients=``, ``seed=``) applied; any other keyword is an error."""
    import dataclasses

    cfg = VerifyConfig.coerce(verify)
    unknown = sorted(set(legacy) - set(_LEGACY_VERIFY_KEYWORDS))
    if unknown:
        raise InputError(f"unknown keyword(s) {unknown}; verification settings go in verify=recopt.VerifyConfig(...)")
    if legacy:
        cfg = dataclasses.replace(cfg, **{_LEGACY_VERIFY_KEYWORDS[k]: v for k, v in legacy.items()})
    return cfg


def resolve_passes(spec: Any, configs: Optional[dict] = None, target_name: str = "cpu") -> list:
    """Ordered Pass instances for ``spec``: see :func:`recopt.passes.registry.resolve_pipeline`."""
    return resolve_pipeline(spec, target_name, configs)


def _input_names(gm: fx.GraphModule) -> tuple:
    """The graph's input names (its placeholders' targets: ``forward``'s parameter names)."""
    return tuple(str(n.target).lstrip("*") for n in gm.graph.nodes if n.op == "placeholder")


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


def _note_flops_incomplete(report: OptimizationReport, lines: list, where: str) -> None:
    """Add each reason a FLOP count is incomplete to ``report.flops_incomplete`` once
    (a reason already recorded for an earlier graph is not repeated)."""
    for line in lines:
        if not any(r.startswith(line + " (") for r in report.flops_incomplete):
            report.flops_incomplete.append(f"{line} (in {where})")


class PassManager:
    """Runs a pipeline of passes with verify-each.

    ``passes``: names, Pass classes, Pass instances or PassConfig instances
    (see :func:`recopt.passes.registry.resolve_pipeline`). ``target``: a
    name or :class:`~recopt.targets.Target`. ``verify``: True / False / a
    :class:`~recopt.verify.VerifyConfig` (input sets, gradients, modes).
    ``strict``: raise instead of skipping a failing or rolled-back pass.
    ``options``: extra data for passes (``ctx.options``).

    The legacy keywords ``n_random_inputs``, ``verify_inputs`` and
    ``verify_gradients`` still work; they set the matching VerifyConfig field.
    """

    def __init__(
        self,
        passes: Iterable,
        target: Any = "cpu",
        *,
        configs: Optional[dict] = None,
        verify: Any = True,
        strict: bool = False,
        dump_dir: Optional[str] = None,
        options: Optional[dict] = None,
        progress: bool = False,
        **legacy: Any,
    ):
        self.target: Target = get_target(target)
        self.passes = resolve_pipeline(passes, self.target.name, configs)
        self.verify_config: VerifyConfig = verify_config_with_legacy(verify, legacy)
        self.strict = strict
        self.dump_dir = dump_dir or os.environ.get("RECOPT_DUMP") or None
        self.options = dict(options or {})
        self.progress = progress
        self.verifier: Optional[Verifier] = None
        self.guards: list = []

    @property
    def seed(self) -> int:
        return self.verify_config.seed

    def run(
        self,
        gm: fx.GraphModule,
        example_inputs: tuple,
        report: Optional[OptimizationReport] = None,
        reference: Optional[tuple] = None,
        input_filter: Optional[Any] = None,
        training: Optional[bool] = None,
    ) -> tuple:
        """Run the pipeline on ``gm``; return ``(graph_module, report)``.

        Each pass: copy → run → check → accept or roll back → record.
        ``reference``: ``(output, flops)`` or ``(output, flops, flops_incomplete)``
        of ``gm`` on ``example_inputs`` when the caller has them (capture
        does), saving one run of the model. Reasons a FLOP count is missing
        or too low (a formula that raised) go to ``report.flops_incomplete``.
        ``input_filter(args) -> bool``: verification sets it refuses are not
        tried (a Dynamo graph's shape guards). ``training``: the mode the
        graph is used in (``None``: both; see :class:`~recopt.verify.Verifier`).
        """
        report = report or OptimizationReport(target=self.target.to_dict())
        if not report.target:
            report.target = self.target.to_dict()
        example_inputs = tuple(example_inputs)
        ctx = PassContext(target=self.target, example_inputs=example_inputs, options=self.options,
                          training=bool(training), input_names=_input_names(gm))
        self.guards = ctx.guards  # the guards of applied passes (see PassContext.add_guard)
        values = TensorValues(gm)
        verifier = self.verifier = Verifier(self.verify_config, training)
        verifier.prepare(gm, example_inputs, reference[0] if reference else None, input_filter)
        # What the graph's own forward edits in place (an embedding with
        # max_norm renormalises its rows) is restored after every run, not
        # blamed on a pass.
        if len(verifier.sets) == 1:
            run_deterministic(gm, example_inputs, self.seed, training=bool(training))
        values.expected = set(values.restore())
        if reference:
            flops, incomplete = reference[1], list(reference[2]) if len(reference) > 2 else []
        else:
            fc = graph_flop_count(gm, example_inputs)
            flops, incomplete = fc.total, fc.incomplete
        _note_flops_incomplete(report, incomplete, "the graph before the passes")
        report.notes.extend(verifier.notes)
        if self.verify_config.enabled:
            report.verify_sets = list(verifier.set_names)
            report.verify_modes = list(verifier.modes)
        report.flops_before = flops
        nbytes = report.bytes_before = graph_activation_bytes(gm)
        current = gm

        iterator = self.passes
        if self.progress and len(self.passes) > 1:
            from .._progress import progress_bar

            iterator = progress_bar(self.passes, desc="passes")
        for index, p in enumerate(iterator):
            run = PassRun(name=p.name, semantics=p.semantics.value, status=NO_CHANGE, duration_s=0.0,
                          config=p.config.to_dict(), flops_before=flops, flops_after=flops,
                          bytes_before=nbytes, bytes_after=nbytes)
            report.passes.append(run)
            # copy
            candidate = copy.deepcopy(current, _shared_tensors(current))
            ctx.pass_name = p.name
            n_guards = len(ctx.guards)
            # run
            t0 = time.perf_counter()
            try:
                result = p.run(candidate, ctx)
                if not isinstance(result, PassResult):
                    raise PassError(
                        f"pass {p.name!r} returned {type(result).__name__}, not a recopt.PassResult; "
                        f"its run() must return PassResult(graph_module, sites)"
                    )
            except Exception as e:
                run.duration_s = time.perf_counter() - t0
                run.status = FAILED
                run.message = str(e) if isinstance(e, PassError) else f"{type(e).__name__}: {e}"
                del ctx.guards[n_guards:]
                edited = values.restore()
                if edited:
                    run.message += f" (it had edited {', '.join(edited[:3])} in place; values restored)"
                if self.strict:
                    if isinstance(e, PassError):
                        raise
                    raise PassError(f"pass {p.name!r} raised {type(e).__name__}: {e}") from e
                continue
            run.duration_s = time.perf_counter() - t0
            # A pass must never edit a shared parameter/buffer in place (the
            # graph shares the caller's): restore, and roll the pass back.
            edited = values.restore()
            report.sites.extend(result.sites)
            run.n_rewritten = sum(s.status == REWRITTEN for s in result.sites)
            run.n_rejected = sum(s.status == REJECTED for s in result.sites)
            if not result.modified and not edited:
                del ctx.guards[n_guards:]
                continue
            new_gm = result.graph_module
            # tidy: dead code (never side effects or random draws), lint, recompile, once
            # for every pass, so a pass need not and a stale forward is never verified
            if not edited:
                try:
                    tidy_graph(new_gm)
                except Exception as e:  # not a fallback: the pass is reported failed and skipped
                    self._roll_back(run, result, f"the graph it returned does not lint: {type(e).__name__}: {e}",
                                    by="the manager's lint")
                    run.status = FAILED
                    del ctx.guards[n_guards:]
                    if self.strict:
                        raise PassError(run.message) from e
                    continue
            # check
            t1 = time.perf_counter()
            exact = p.semantics is Semantics.EXACT
            prefix = p.output_contract == "prefix"
            grad_rtol = p.gradient_rtol if p.gradient_rtol is not None else (p.tolerance[0] if p.tolerance else None)
            if edited:
                check = CheckResult(
                    f"the pass edited {', '.join(edited[:3])}{' ...' if len(edited) > 3 else ''} in place; "
                    "the graph shares the caller's parameters and buffers, so a pass must make new ones "
                    "instead (values restored)")
            else:
                # Sets that break the shape guards recorded so far (this pass's
                # included) are not tried: such calls re-specialise.
                holds = compile_guards([g.code for g in ctx.guards], ctx.input_names) if ctx.guards else None
                check = verifier.check(new_gm, exact=exact or prefix, tolerance=p.tolerance, prefix=prefix,
                                       gradients=exact and not result.inference_only, grad_rtol=grad_rtol,
                                       input_filter=holds)
                edited = values.restore()
                if edited and check.failure is None:
                    check = CheckResult(f"running the rewritten graph left {', '.join(edited[:3])} changed; "
                                        "values restored")
            new_flops = None
            if check.failure is None:
                fc = graph_flop_count(new_gm, example_inputs)
                new_flops = fc.total
                _note_flops_incomplete(report, fc.incomplete, f"the graph after {p.name}")
            run.verify_s = time.perf_counter() - t1
            if check.failure is not None:
                # roll back (the candidate is dropped) and record
                self._roll_back(run, result, check.failure)
                del ctx.guards[n_guards:]
                if self.strict:
                    raise VerificationError(f"pass {p.name!r} changed the model's outputs: {check.failure}")
                continue
            # accept and record
            verifier.accept(new_gm, check)
            self._dump(index, p.name, current, new_gm)
            run.status = APPLIED
            run.flops_after = new_flops
            if p.semantics is Semantics.ARCHITECTURE:
                run.message = "architecture change: the model must be retrained"
            elif result.inference_only:
                run.message = "inference-only rewrite: outputs verified, gradients not (do not train this graph)"
            current, flops = new_gm, new_flops
            nbytes = run.bytes_after = graph_activation_bytes(new_gm)
        for note in verifier.notes:
            if note not in report.notes:
                report.notes.append(note)
        report.flops_after = flops
        report.bytes_after = nbytes
        return current, report

    @staticmethod
    def _roll_back(run: PassRun, result: PassResult, failure: str, by: str = "verification") -> None:
        run.status = ROLLED_BACK
        run.message = failure
        for s in result.sites:
            if s.status == REWRITTEN:
                s.status = REJECTED
                s.reason_code = "rolled_back"
                s.reason = f"rewrite rolled back by {by}: {failure}"
        run.n_rejected += run.n_rewritten
        run.n_rewritten = 0

    def _dump(self, index: int, name: str, before: fx.GraphModule, after: fx.GraphModule) -> None:
        if not self.dump_dir:
            return
        os.makedirs(self.dump_dir, exist_ok=True)
        for tag, g in (("before", before), ("after", after)):
            path = os.path.join(self.dump_dir, f"{index:02d}_{name}_{tag}.py")
            with open(path, "w") as f:
                f.write(g.code)
