"""LoKA-style FP8 passes: probe-driven ``fp8`` (exact up to FP8 rounding) and the Mods.

``fp8`` (semantics EXACT, verified with :data:`FP8_TOLERANCE`):

1. finds linear sites (``nn.Linear``, ``F.linear``, ``x @ W`` with a
   parameter W) and checks eligibility (K, N multiples of 16; not the final
   head; not excluded; the target has FP8);
2. probes: runs the graph over ``calibration_data`` (an iterable of input
   tuples given to ``recopt.optimize``; the example inputs when absent)
   streaming each site's input mean/covariance;
3. per site, draws inputs from the learned Gaussian at the site's K with up
   to ``max_eval_rows`` rows, runs every recipe per GEMM role against a
   float64 reference, and computes the error metrics;
4. decides per role with :func:`recopt.fp8.dispatch.decide_role` from
   measured (target GPU present) or predicted (roofline model) speed-ups;
5. swaps the chosen sites in place: ``FP8Linear`` for modules, the
   ``recopt::fp8_linear`` op for functional spellings.

Decisions save to ``decisions_path`` and re-apply with ``load_decisions``
(no probing). ``no_bias``, ``blocknorm``, ``hardswish`` and ``fp8_mods``
(all three) are ARCHITECTURE passes: opt-in, retraining needed.

``FP8_TOLERANCE = (rtol 0.1, atol 0.1)``: e4m3 keeps 3 mantissa bits
(relative rounding ≤ 6.25% per operand) and one GEMM's normwise error is
≈ 3.5%; a few stacked FP8 GEMMs stay within 10% of each output element or
10% of the output's largest magnitude, while a site whose outliers flush
the other values moves outputs by far more and is rolled back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..fp8 import dispatch as D
from ..graph.nodes import set_submodule, tidy_graph
from ..fp8.linear import HP, FP8Linear
from ..fp8.metrics import DEFAULT_THRESHOLDS, get_metric
from ..fp8.mods import apply_blocknorm, apply_hardswish, apply_no_bias, DEFAULT_BLOCK
from ..fp8.probe import WeightStats, collect_graph_stats
from ..fp8.recipes import RECIPES, ROLES
from ..fp8.sites import consumer_of, find_sites, fqn_of, head_sites, op_label, site_rows
from .base import REJECTED, Pass, PassConfig, PassContext, PassResult, Semantics, Site
from .registry import register_pass

FP8_TOLERANCE = (0.1, 0.1)
PREDICTED = "predicted, not measured"


@dataclass
class FP8Config(PassConfig):
    """Options of the ``fp8`` pass (JSON round-trip).

    - ``recipes``: candidate recipes (``tensorwise``, ``rowwise``, ``rowwise_gw_hp``, ``blockwise``).
    - ``metric`` / ``threshold``: error metric and τ (None → the calibrated default of that metric).
    - ``min_speedup``: a candidate must be faster than bf16 by more than this.
    - ``mode``: ``training`` (decide forward, dgrad, wgrad), ``inference`` (forward only) or
      ``auto`` (training when the model is in training mode).
    - ``samples`` / ``max_eval_rows``: (X', W') pairs per site and rows per drawn X'.
    - ``max_calibration_batches``: batches of ``calibration_data`` probed.
    - ``measure``: ``auto`` (time on the GPU when it is the target), ``never`` (always predict) or
      ``always`` (time on the current device; needs a CUDA device or a ``fp8_timer`` option).
    - ``lowering``: how the model will run, so timings match it: ``compile`` (torch.compile, the
      default backend on GPUs), ``eager`` or ``cudagraphs``.
    - ``torchao``: also time torchao's float8 linear (rowwise/tensorwise) where torchao is installed.
    - ``assume_fused_quant``: predict as if every activation quantization is fused into its producer.
    - ``ignore_speed``: rewrite every numerically safe site whatever its speed (numerics studies).
    - ``exclude``: FQNs never rewritten.
    - ``decisions_path``: write decisions JSON here; ``load_decisions``: apply a saved file, no probing.
    - ``timings_path``: a JSON cache of site timings (keyed by device name + software versions, shape,
      candidate, mode, lowering), read before measuring and written after: later runs on the same
      machine and versions re-use them, others measure again.
    """

    recipes: list = field(default_factory=lambda: ["tensorwise", "rowwise", "rowwise_gw_hp", "blockwise"])
    metric: str = "normwise"
    threshold: Optional[float] = None
    min_speedup: float = D.MIN_SPEEDUP
    mode: str = "auto"
    samples: int = 8
    max_eval_rows: int = 512
    max_calibration_batches: int = 32
    measure: str = "auto"
    lowering: str = "compile"
    torchao: bool = True
    assume_fused_quant: bool = False
    ignore_speed: bool = False
    exclude: list = field(default_factory=list)
    decisions_path: str = ""
    timings_path: str = ""
    load_decisions: str = ""
    full_cov_max_k: int = 1024
    rank: int = 32
    seed: int = 0


def _rewrite(gm: fx.GraphModule, site, recipes: dict, backend: str = "recopt") -> None:
    if backend == "torchao":
        from ..fp8.torchao_backend import to_torchao_linear

        set_submodule(gm, site.fqn, to_torchao_linear(gm.get_submodule(site.fqn), recipes["forward"]))
        return
    if site.kind == "module":
        set_submodule(gm, site.fqn, FP8Linear.from_linear(gm.get_submodule(site.fqn), recipes))
        return
    node = site.node
    args = (recipes["forward"], recipes["dgrad"], recipes["wgrad"])
    op = torch.ops.recopt.fp8_linear.default
    if site.kind == "linear_fn":
        x = node.args[0]
        w = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        node.target, node.args, node.kwargs = op, (x, w, b) + args, {}
    else:  # matmul: x @ W with W stored (K, N)
        x, w = node.args
        with gm.graph.inserting_before(node):
            wt = gm.graph.call_method("t", (w,))
        node.target, node.args, node.kwargs = op, (x, wt, None) + args, {}


FUSABLE_FORWARD = ("rowwise", "rowwise_gw_hp")


def fused_norm_of(gm: fx.GraphModule, site):
    """The BlockNorm module feeding ``site`` when only this site consumes it (so the norm and the
    activation quantization can be one kernel), else None."""
    from ..fp8.mods import BlockNorm

    node = site.input
    if site.kind == "matmul" or node.op != "call_module" or len(node.users) != 1:
        return None
    mod = gm.get_submodule(node.target)
    return mod if isinstance(mod, BlockNorm) else None


def _rewrite_fused(gm: fx.GraphModule, site, recipes: dict, norm) -> None:
    """Replace ``BlockNorm → linear`` by one ``recopt::blocknorm_fp8_linear`` call."""
    node, norm_node = site.node, site.input
    with gm.graph.inserting_before(node):
        if site.kind == "module":
            lin = gm.get_submodule(site.fqn)
            w = gm.graph.get_attr(f"{site.fqn}.weight")
            b = gm.graph.get_attr(f"{site.fqn}.bias") if lin.bias is not None else None
        else:
            w = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    node.op = "call_function"
    node.target = torch.ops.recopt.blocknorm_fp8_linear.default
    node.args = (norm_node.args[0], w, b, norm.block, norm.eps, recipes["forward"], recipes["dgrad"],
                 recipes["wgrad"])
    node.kwargs = {}
    gm.graph.erase_node(norm_node)


def _mode(cfg: FP8Config, gm: fx.GraphModule) -> str:
    if cfg.mode == "auto":
        return "training" if gm.training else "inference"
    if cfg.mode not in ("training", "inference"):
        raise ValueError(f"fp8 mode must be 'training', 'inference' or 'auto', got {cfg.mode!r}")
    return cfg.mode


def _measuring(cfg: FP8Config, target) -> bool:
    if cfg.measure not in ("auto", "never", "always"):
        raise ValueError(f"fp8 measure must be 'auto', 'never' or 'always', got {cfg.measure!r}")
    if cfg.measure == "always":
        return True
    if cfg.measure == "never" or not torch.cuda.is_available() or target.device != "cuda":
        return False
    from ..targets import detect_target

    return detect_target().name == target.name


@register_pass
class FP8Pass(Pass):
    name = "fp8"
    semantics = Semantics.EXACT
    config_cls = FP8Config
    tolerance = FP8_TOLERANCE
    after = ("no_bias", "blocknorm", "hardswish", "fp8_mods")
    description = "Probe GEMM sites, pick per site and role the fastest FP8 recipe that meets the error bar."

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg: FP8Config = self.config
        for r in cfg.recipes:
            if r not in RECIPES:
                raise ValueError(f"unknown FP8 recipe {r!r} in config; valid recipes: {', '.join(RECIPES)}")
        get_metric(cfg.metric)
        threshold = DEFAULT_THRESHOLDS[cfg.metric] if cfg.threshold is None else cfg.threshold
        mode = _mode(cfg, gm)
        roles = ROLES if mode == "training" else ("forward",)
        target = ctx.target
        measured = _measuring(cfg, target)
        basis = "measured" if measured else PREDICTED
        self._cache = D.MeasurementCache(cfg.timings_path or None) if cfg.timings_path else D.CACHE
        sites = find_sites(gm)
        call_of, seen = {}, {}
        for st in sites:  # a layer used more than once (tied weights) has one site per call
            call_of[st.node.name] = seen.get(fqn_of(st), 0)
            seen[fqn_of(st)] = call_of[st.node.name] + 1
        heads = head_sites(gm, sites)
        out_sites: list = []
        eligible = []
        for s in sites:
            why = self._ineligible(s, heads, cfg, target)
            if why:
                out_sites.append(self._site(gm, s, REJECTED, why[0], why[1], D.SiteDecision(
                    fqn_of(s), site_rows(s.input, s.k) or 0, s.k, s.n, consumer_of(gm, s.node),
                    op_label(gm, s.input), eligible=False, basis="none", reason=why[1], reason_code=why[0],
                    call=call_of[s.node.name])))
            else:
                eligible.append(s)

        out_sites += self._opaque_linears(gm)
        if cfg.load_decisions:
            decisions = self._load(eligible, cfg.load_decisions, ctx, call_of)
            calib_note = f"decisions loaded from {cfg.load_decisions} (not re-probed)"
        else:
            decisions, calib_note = self._probe_and_decide(gm, ctx, eligible, cfg, roles, mode, threshold,
                                                           measured, basis)
        for s in eligible:
            decisions[s.node.name].call = call_of[s.node.name]
        _agree_on_shared_modules(eligible, decisions)
        changed = False
        for s in eligible:
            d = decisions[s.node.name]
            d_details = d
            if d.decision == "fp8":
                recipes = {r: (d.role(r).recipe if d.role(r).recipe != "bf16" else HP) for r in ROLES}
                norm = fused_norm_of(gm, s)
                if d.backend == "torchao":
                    _rewrite(gm, s, recipes, backend="torchao")
                elif norm is not None and recipes["forward"] in FUSABLE_FORWARD:
                    _rewrite_fused(gm, s, recipes, norm)
                    d_details.producer = "blocknorm (fused with the e4m3 quantization)"
                else:
                    _rewrite(gm, s, recipes)
                changed = True
                slow = _fallback_roles(recipes, target, s) if d.backend == "recopt" else {}
                if slow:  # a role without an FP8 kernel on the target runs as a dequantized matmul: say so
                    d_details.reason += " [fallback: " + "; ".join(f"{r}: {w}" for r, w in slow.items()) + "]"
                out_sites.append(self._site(gm, s, "rewritten", "", d.reason, d_details, calib_note))
            else:
                out_sites.append(self._site(gm, s, REJECTED, d.reason_code or "not_selected", d.reason, d_details,
                                            calib_note))
        if cfg.decisions_path and not cfg.load_decisions:
            meta = {"target": target.name, "metric": cfg.metric, "threshold": threshold, "mode": mode,
                    "basis": basis, "calibration": calib_note}
            if measured:
                from ..fp8.timing import environment

                meta.update(environment=environment(self._device(ctx)), lowering=cfg.lowering)
            D.save_decisions(cfg.decisions_path, [decisions[s.node.name] for s in eligible], meta)
        if measured and cfg.timings_path and not cfg.load_decisions:
            self._cache.save()
        if changed:
            tidy_graph(gm)
            gm.delete_all_unused_submodules()  # BlockNorms folded into fused sites
        # Inference mode decides and rewrites the forward only: gradients
        # are not part of its contract, so the manager does not check them.
        return PassResult(gm, out_sites, inference_only=(mode == "inference"))

    # -- steps -------------------------------------------------------------
    def _ineligible(self, s, heads: set, cfg: FP8Config, target) -> Optional[tuple]:
        fqn = fqn_of(s)
        if fqn in cfg.exclude:
            return "excluded", f"{fqn} is in the pass's exclude list"
        if s.node.name in heads:
            return "final_head", "final prediction head (the last linear before the output) stays in high precision"
        if s.k % 16 or s.n % 16:
            return "shape_not_multiple_of_16", (f"K={s.k}, N={s.n}: FP8 GEMMs need K and N multiples of 16 "
                                                f"(pad the layer to use FP8)")
        if s.weight is not None and not s.weight.is_floating_point():
            return "not_float", f"weight dtype {s.weight.dtype} is not floating point"
        if not cfg.ignore_speed and not cfg.load_decisions and (
                not target.has("fp8") or target.peak_fp8_tflops is None):
            return "target_no_fp8", (f"target {target.name} has no FP8 tensor cores; kept in high precision "
                                     f"(use target='h100'/'b200', or ignore_speed=True to study numerics)")
        return None

    def _opaque_linears(self, gm: fx.GraphModule) -> list:
        """One rejected site per captured leaf module (not a linear) that holds linear layers.

        Capture keeps ``torch.nn`` containers such as ``nn.TransformerEncoder`` or
        ``nn.MultiheadAttention`` as one node, so their feed-forward and projection
        linears are not sites; the report says so instead of leaving them out silently.
        """
        out = []
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            mod = gm.get_submodule(node.target)
            if isinstance(mod, (nn.Linear, FP8Linear)):
                continue
            inner = [n for n, m in mod.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, FP8Linear)]
            if not inner:
                continue
            shown = ", ".join(inner[:4]) + (f" and {len(inner) - 4} more" if len(inner) > 4 else "")
            why = (f"{type(mod).__name__} at {node.target} is one opaque node of the captured graph (a torch.nn "
                   f"container or a leaf module): its {len(inner)} linear layer(s) ({shown}) are not FP8 sites "
                   f"and stay as they are (write the block with its own nn.Linear layers to let the pass see them)")
            out.append(self.rejected(node, "inside_opaque_module", why, module_path=str(node.target),
                                     details={"fqn": str(node.target), "linears": inner, "eligible": False}))
        return out

    @staticmethod
    def _device(ctx) -> torch.device:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    def _load(self, eligible: list, path: str, ctx=None, call_of: Optional[dict] = None) -> dict:
        saved, meta = D.load_decisions(path)
        stale, stale_code = "", "stale_environment"
        target = ctx.target.name if ctx is not None else None
        if meta["target"] != target:
            # Speed-ups (measured or predicted) hold for the target they were made for only; FP8 sites
            # loaded onto a target without FP8 tensor cores would fail in _scaled_mm at run time.
            stale, stale_code = (f"decisions were made for target {meta['target']}, this run targets {target}; "
                                 f"not re-used: re-run the fp8 pass without load_decisions for {target}"), "stale_target"
        elif meta.get("basis") == "measured":
            from ..fp8.timing import environment, environment_mismatch

            saved_env = meta.get("environment") if isinstance(meta.get("environment"), dict) else {}
            diff = environment_mismatch(saved_env, environment(self._device(ctx)))
            if diff:
                stale = ("decisions were measured on " + ", ".join(f"{k}={saved_env.get(k)}" for k in diff)
                         + "; this machine differs, so they are not re-used: re-run the fp8 pass without "
                           "load_decisions to measure here")
        out = {}
        for s in eligible:
            call = (call_of or {}).get(s.node.name, 0)
            d = saved.get(fqn_of(s) if not call else f"{fqn_of(s)}#{call}")
            if stale:
                out[s.node.name] = D.SiteDecision(fqn_of(s), 0, s.k, s.n, decision="bf16",
                                                  reason_code=stale_code, reason=stale)
            elif d is None:
                out[s.node.name] = D.SiteDecision(fqn_of(s), 0, s.k, s.n, decision="bf16", reason_code="not_in_decisions",
                                                  reason=f"no decision for {fqn_of(s)} in {path}; kept")
            elif (d.k, d.n) != (s.k, s.n):
                out[s.node.name] = D.SiteDecision(
                    fqn_of(s), d.m, s.k, s.n, decision="bf16", reason_code="stale_decision",
                    reason=f"saved decision is for K={d.k}, N={d.n} but the site has K={s.k}, N={s.n}; re-probe")
            else:
                d.reason = f"loaded: {d.reason}"
                out[s.node.name] = d
        return out

    def _probe_and_decide(self, gm, ctx, eligible, cfg, roles, mode, threshold, measured, basis):
        data = ctx.options.get("calibration_data")
        if data is None:
            batches = [tuple(ctx.example_inputs)]
            calib_note = "no calibration_data given: probed on the example inputs only"
        else:
            batches = data
            calib_note = "probed on calibration_data"
        site_inputs = {s.node.name: s.input.name for s in eligible}
        stats = collect_graph_stats(gm, site_inputs, {s.node.name: s.k for s in eligible}, batches,
                                    cfg.full_cov_max_k, cfg.rank, cfg.max_calibration_batches) if eligible else {}
        gen = torch.Generator().manual_seed(cfg.seed)
        cands = [c for c in D.default_candidates() if c.recipe in cfg.recipes]
        metrics = list(dict.fromkeys([cfg.metric, "normwise", "sqnr", "median_re", "mere", "mere_raw"]))
        decisions = {}
        for s in eligible:
            st = stats[s.node.name]
            m = st.typical_rows or site_rows(s.input, s.k) or 0
            consumer, producer = consumer_of(gm, s.node), op_label(gm, s.input)
            d = D.SiteDecision(fqn_of(s), m, s.k, s.n, consumer, producer,
                               basis="measured" if measured else "predicted")
            skipped = (f" [{st.non_finite_rows} calibration row(s) at this site held inf/NaN and were left "
                       f"out of the statistics]") if st.non_finite_rows else ""
            if st.n < 2:
                d.reason_code = "no_statistics"
                d.reason = "the probe saw fewer than 2 finite rows at this site" + skipped
                decisions[s.node.name] = d
                continue
            w = s.weight.detach().float()
            if s.kind == "matmul":
                w = w.t()
            ws = WeightStats(*w.shape)
            ws.update(w)
            rows = max(2, min(m, cfg.max_eval_rows))
            xs = [st.sample(rows, gen) for _ in range(cfg.samples)]
            wsamp = [ws.sample(gen) for _ in range(cfg.samples)]
            grad = lambda r, n: torch.randn(r, n, generator=gen)  # noqa: E731
            d.errors = D.evaluate_errors(xs, wsamp, cfg.recipes, roles, metrics, grad)
            norm_fusable = fused_norm_of(gm, s) is not None
            timer = ctx.options.get("fp8_timer")
            for c in cands:
                d.speedups[c.key] = {}
                # The fused BlockNorm→quantize kernel makes row-wise e4m3 activations.
                fused = cfg.assume_fused_quant or (norm_fusable and c.recipe in FUSABLE_FORWARD)
                if measured and not cfg.ignore_speed:
                    self._measure_candidate(gm, d, s, c, roles, mode, cfg, timer)
                    continue
                for role in roles:
                    if cfg.ignore_speed:
                        sp = math.inf
                    else:
                        sp = D.predict_speedup(ctx.target, m, s.k, s.n, role, mode, fused)
                    d.speedups[c.key][role] = sp
            label = "speed ignored (ignore_speed=True)" if cfg.ignore_speed else (
                "measured end to end" if measured else "predicted")
            for role in roles:
                d.roles[role] = D.decide_role(role, d.errors, d.speedups, cands, cfg.metric, threshold,
                                              cfg.min_speedup, label)
            for role in ROLES:
                d.roles.setdefault(role, D.RoleDecision(reason="inference: no backward GEMM"))
            if measured and not cfg.ignore_speed:
                self._confirm_and_compare(gm, d, s, roles, mode, cfg, threshold, timer)
            chosen = [r for r in roles if d.roles[r].recipe != "bf16"]
            if chosen:
                d.decision = "fp8"
                d.reason = "; ".join(f"{r}: {d.roles[r].reason}" for r in chosen)
            else:
                d.decision = "bf16"
                any_safe = any(_safe(d.errors, r, cfg.metric, threshold) for r in roles)
                d.reason_code = "slower_than_bf16" if any_safe else "error_above_threshold"
                d.reason = f"forward: {d.roles['forward'].reason}"
            if not measured and not cfg.ignore_speed:
                d.reason += f" [{PREDICTED}]"
            if not cfg.ignore_speed:
                # The speed side of the decision holds at this M only (the numerics do not depend on it).
                d.reason += (f" [speed at M={m} rows: " + ("the example's batch; pass calibration_data shaped "
                             "like real batches to decide at their size]" if data is None
                             else "the median batch of calibration_data]"))
            d.reason += skipped
            decisions[s.node.name] = d
        return decisions, calib_note

    # -- measuring what runs (GPU, or measure="always" with an injected timer) ----------------
    @staticmethod
    def _site_recipes(recipe: str, roles) -> dict:
        """The per-role recipes of the FP8 op when ``recipe`` runs every role it has in FP8."""
        rec = RECIPES[recipe]
        return {r: (recipe if r in roles and rec.is_fp8(r) else HP) for r in ROLES}

    def _time(self, gm, d, s, candidate: dict, mode: str, cfg: FP8Config, timer) -> dict:
        norm = fused_norm_of(gm, s)
        t = D.measure_site(d.m, s.k, s.n, candidate, mode, cfg.lowering, bias=s.has_bias, timer=timer,
                           cache=getattr(self, "_cache", D.CACHE), device=self._device(None),
                           norm=(norm.block, norm.eps) if norm is not None else None)
        d.timings[t["candidate"]] = t
        return t

    def _measure_candidate(self, gm, d, s, c, roles, mode, cfg, timer) -> None:
        """Speed-up of candidate ``c`` = the whole FP8 op with ``c``'s recipe on all its roles, timed
        (forward, or forward+backward) against bf16 ``F.linear``; the same figure for each of its roles."""
        if c.lib != "torch":
            for role in roles:  # fbgemm kernels are not an execution path of the FP8 op: nothing to time
                d.speedups[c.key][role] = None
            return
        if not c.available():
            return
        recipes = self._site_recipes(c.recipe, roles)
        if all(v == HP for v in recipes.values()):
            return
        t = self._time(gm, d, s, {"backend": "recopt", "recipes": recipes}, mode, cfg, timer)
        for role in roles:
            if recipes[role] != HP:
                d.speedups[c.key][role] = t["speedup"]

    def _confirm_and_compare(self, gm, d, s, roles, mode, cfg, threshold, timer) -> None:
        """Time the combination the per-role rule picked (it may mix candidates), then torchao's float8
        linear where installed; keep the fastest accurate option if it beats bf16 by ``min_speedup``."""
        options = []  # (speed-up, backend, recipes, label)
        chosen = {r: d.role(r).recipe for r in ROLES}
        if any(chosen[r] != "bf16" for r in roles):
            recipes = {r: (chosen[r] if chosen[r] != "bf16" else HP) for r in ROLES}
            t = self._time(gm, d, s, {"backend": "recopt", "recipes": recipes}, mode, cfg, timer)
            options.append((t["speedup"], "recopt", recipes, t["candidate"]))
        if cfg.torchao and s.kind == "module":
            for c in D.torchao_candidates():
                if c.recipe not in cfg.recipes or not c.available():
                    continue
                if not all(_safe({c.recipe: d.errors.get(c.recipe, {})}, r, cfg.metric, threshold) for r in roles):
                    continue
                t = self._time(gm, d, s, {"backend": "torchao", "recipe": c.recipe}, mode, cfg, timer)
                options.append((t["speedup"], "torchao", {r: c.recipe for r in ROLES}, t["candidate"]))
        if not options:
            return
        sp, backend, recipes, label = max(options, key=lambda o: o[0])
        if sp <= cfg.min_speedup:
            why = f"measured end to end ({cfg.lowering}, {mode}): best {label} {sp:.2f}× ≤ {cfg.min_speedup:g}× bf16"
            for r in roles:
                d.roles[r] = D.RoleDecision(reason=why, speedup=sp)
            d.reason_code = "slower_than_bf16"
            return
        d.backend = backend
        for r in roles:
            if recipes[r] == HP:
                continue
            err = d.errors.get(recipes[r], {}).get(r, {}).get(cfg.metric)
            lib = "torchao" if backend == "torchao" else "torch"
            d.roles[r] = D.RoleDecision(recipe=recipes[r], lib=lib, error=err, speedup=sp,
                                        reason=f"{label}: measured end to end ({cfg.lowering}, {mode}) {sp:.2f}× bf16")

    def _site(self, gm, s, status, code, reason, d: D.SiteDecision, calib_note: str = "") -> Site:
        details = d.to_dict()
        details["calibration"] = calib_note
        details["spelling"] = s.kind
        fwd_err = {r: v.get("forward", {}).get(self.config.metric) for r, v in d.errors.items()}
        details["forward_error"] = fwd_err
        if status == "rewritten":
            return self.rewritten(s.node, reason, module_path=d.fqn, details=details)
        return self.rejected(s.node, code, reason, module_path=d.fqn, details=details)


def _agree_on_shared_modules(eligible: list, decisions: dict) -> None:
    """One ``nn.Linear`` called at several sites is one module: it is swapped for an ``FP8Linear`` for
    every call or for none. Where its calls' decisions differ (one FP8, one not, or other recipes),
    every call stays in high precision (``shared_module_mixed``), rather than the report saying bf16
    for a call that would run the FP8 module."""
    by_fqn: dict = {}
    for s in eligible:
        if s.kind == "module":
            by_fqn.setdefault(s.fqn, []).append(s)
    for fqn, ss in by_fqn.items():
        ds = [decisions[s.node.name] for s in ss]
        if len(ds) < 2:
            continue
        plans = {(d.decision, d.backend, tuple(sorted(d.recipes().items())) if d.decision == "fp8" else ())
                 for d in ds}
        if len(plans) == 1:
            continue
        why = (f"{fqn} is one module called at {len(ds)} sites whose decisions differ ("
               + "; ".join(f"call {d.call}: {d.decision}"
                           + (f" {'/'.join(d.recipes().values())}" if d.decision == "fp8" else "") for d in ds)
               + "); the module runs one way for every call, so all calls stay in high precision")
        for d in ds:
            d.decision, d.reason_code, d.reason = "bf16", "shared_module_mixed", why


def _fallback_roles(recipes: dict, target, site) -> dict:
    """Roles of a rewritten site that will run without an FP8 kernel on ``target``: role -> reason."""
    from ..fp8.recipes import no_kernel_reason

    dev = torch.device("cuda" if target.device == "cuda" else "cpu")
    out = {}
    for role, name in recipes.items():
        if name == HP:
            continue
        why = no_kernel_reason(RECIPES[name].granularity, dev, site.k if role == "forward" else site.n,
                               site.n if role == "forward" else site.k)
        if why:
            out[role] = why
    return out


def _safe(errors: dict, role: str, metric: str, threshold: float) -> bool:
    from ..fp8.metrics import is_safe

    return any(is_safe(v[role][metric], metric, threshold) for v in errors.values() if role in v)


# -- Mods ----------------------------------------------------------------------
@dataclass
class BlockNormConfig(PassConfig):
    block: int = DEFAULT_BLOCK


@dataclass
class ModsConfig(PassConfig):
    no_bias: bool = True
    blocknorm: bool = True
    hardswish: bool = True
    block: int = DEFAULT_BLOCK


class _ModPass(Pass):
    semantics = Semantics.ARCHITECTURE
    before = ("fp8",)

    def _sites(self, gm: fx.GraphModule, outcomes: list) -> list:
        nodes = {n.name: n for n in gm.graph.nodes}
        out = []
        for name, status, code, reason, details in outcomes:
            node = nodes.get(name) or _Ghost(name)
            if status == "rewritten":
                out.append(self.rewritten(node, reason, details=details, module_path=details.get("fqn", "")))
            else:
                out.append(self.rejected(node, code, reason, details=details, module_path=details.get("fqn", "")))
        return out


class _Ghost:
    """Stands in for a node a Mod erased, so its site still names it."""

    def __init__(self, name):
        self.name, self.op, self.target, self.meta = name, "call_function", name, {}


@register_pass
class NoBiasPass(_ModPass):
    name = "no_bias"
    description = "LoKA No Bias: drop linear biases except the final prediction head's (retrain)."

    def run(self, gm, ctx):
        return PassResult(gm, self._sites(gm, apply_no_bias(gm)))


@register_pass
class BlockNormPass(_ModPass):
    name = "blocknorm"
    config_cls = BlockNormConfig
    description = "LoKA BlockNorm: LayerNorm/RMSNorm after a GEMM → parameter-free 256-block RMS norm (retrain)."

    def run(self, gm, ctx):
        return PassResult(gm, self._sites(gm, apply_blocknorm(gm, self.config.block)))


@register_pass
class HardswishPass(_ModPass):
    name = "hardswish"
    description = "LoKA Hard Swish: SiLU / x·σ(x) → Hardswish, x·σ(norm(x)) → x·hardsigmoid(norm(x)) (retrain)."

    def run(self, gm, ctx):
        return PassResult(gm, self._sites(gm, apply_hardswish(gm)))


@register_pass
class FP8ModsPass(_ModPass):
    name = "fp8_mods"
    config_cls = ModsConfig
    description = "All LoKA Mods: No Bias, BlockNorm, Hard Swish (retrain)."

    def run(self, gm, ctx):
        cfg = self.config
        outcomes = []
        if cfg.no_bias:
            outcomes += apply_no_bias(gm)
        if cfg.blocknorm:
            outcomes += apply_blocknorm(gm, cfg.block)
        if cfg.hardswish:
            outcomes += apply_hardswish(gm)
        return PassResult(gm, self._sites(gm, outcomes))
