"""Dispatch: per GEMM site and role, pick the fastest FP8 candidate that is accurate enough.

For each site (M, K, N) and role (forward, dgrad, wgrad) every candidate
``(lib, recipe)`` gets an error (from :mod:`recopt.fp8.metrics` on inputs
drawn from the probe's learned distributions) and a speed-up over bf16:

- **measured** on the target GPU when it is the current device: the site's
  real FP8 linear, forward (inference) or forward+backward (training), in the
  lowering that will run it, against ``F.linear`` in bf16
  (:func:`measure_site`; cached per device name + software versions, shape,
  candidate, mode and lowering);
- **predicted** otherwise from the target's peaks (:func:`predict_seconds`),
  and the report says "predicted, not measured".

Rule (LoKA's dispatch): keep a candidate if ``error < τ`` and ``speed-up >
min_speedup`` (1.05); take the fastest; none → the role stays bf16 with the
reason. Decisions are plain data (:class:`SiteDecision`) that save to and
load from JSON, so a decision file can be re-applied without re-probing.

The latency model (``GemmCostModel``): a GEMM takes
``launch + max(flops / (η_c · peak), bytes / (η_m · HBM))``; an FP8 GEMM adds
a scale epilogue; quantizing an operand in a separate kernel costs
``quant_launch + 5 bytes per element / (η_m · HBM)`` (read bf16 for amax,
read again, write e4m3). The constants were fitted to the H100 measurements
in ANCHORS.md (6 µs launch, η_c 0.8 bf16 / 0.63 fp8 from the 8192³
ceilings, 15 µs for a compiled amax-scale-cast sequence) and reproduce
which of its five shapes gain from FP8 with separate and with fused
quantization.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from .recipes import RECIPES, ROLES, fp8_dtype, get_recipe, reference_gemm

MIN_SPEEDUP = 1.05


@dataclass(frozen=True)
class GemmCostModel:
    launch_s: float = 6e-6
    fp8_epilogue_s: float = 0.6e-6
    quant_launch_s: float = 15e-6
    eta_compute_bf16: float = 0.8
    eta_compute_fp8: float = 0.63
    eta_memory: float = 0.8
    quant_bytes_per_elem: float = 5.0


COST_MODEL = GemmCostModel()


def role_shape(m: int, k: int, n: int, role: str) -> tuple:
    """(P, R, Q) of the GEMM ``A(P×R) @ B(R×Q)`` for a linear layer's role."""
    if role == "forward":
        return m, k, n
    if role == "dgrad":
        return m, n, k
    if role == "wgrad":
        return n, m, k
    raise ValueError(f"unknown GEMM role {role!r}; valid roles: {ROLES}")


def predict_seconds(target, p: int, r: int, q: int, dtype: str, quant_a: bool = False,
                    quant_b: bool = False, model: GemmCostModel = COST_MODEL) -> Optional[float]:
    """Predicted time of ``A(p×r) @ B(r×q)`` on ``target`` (bf16 out), or None if its peaks are unknown.

    ``dtype`` is ``"bf16"`` or ``"fp8"``; ``quant_a``/``quant_b`` add a
    separate quantization kernel for that operand (FP8 only).
    """
    peak = target.peak_fp8_tflops if dtype == "fp8" else target.peak_bf16_tflops
    if peak is None or target.hbm_gbps is None:
        return None
    bw = target.hbm_gbps * 1e9 * model.eta_memory
    in_bytes = 1 if dtype == "fp8" else 2
    flops = 2.0 * p * r * q
    bytes_moved = in_bytes * (p * r + r * q) + 2 * p * q
    eta = model.eta_compute_fp8 if dtype == "fp8" else model.eta_compute_bf16
    t = model.launch_s + max(flops / (eta * peak * 1e12), bytes_moved / bw)
    if dtype == "fp8":
        t += model.fp8_epilogue_s
        for on, elems in ((quant_a, p * r), (quant_b, r * q)):
            if on:
                t += model.quant_launch_s + model.quant_bytes_per_elem * elems / bw
    return t


def quant_needs(role: str, mode: str, input_fused: bool) -> tuple:
    """Which operands of a role need a separate quantization kernel: (A, B).

    Forward: x unless its producer quantizes in its epilogue (``input_fused``);
    W only in training (in inference it is quantized once, ahead of time).
    Backward roles quantize dY separately; dgrad reuses no W cast (one per
    role, conservative); wgrad also re-quantizes x along M.
    """
    if role == "forward":
        return (not input_fused, mode == "training")
    return (True, True)


def predict_speedup(target, m: int, k: int, n: int, role: str = "forward", mode: str = "inference",
                    input_fused: bool = False) -> Optional[float]:
    """bf16 time / FP8 time of a role, predicted; None when the target has no FP8 peak."""
    if target.peak_fp8_tflops is None or not target.has("fp8"):
        return None
    p, r, q = role_shape(m, k, n, role)
    qa, qb = quant_needs(role, mode, input_fused)
    t16 = predict_seconds(target, p, r, q, "bf16")
    t8 = predict_seconds(target, p, r, q, "fp8", qa, qb)
    if t16 is None or t8 is None:
        return None
    return t16 / t8


# -- candidates ------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """A (library, recipe) pair that can run a role's GEMM.

    ``available()`` says whether its fast kernel exists here; candidates
    without one are still evaluated for error (with the recipe's reference
    numerics) but cannot be picked.
    """

    lib: str
    recipe: str
    available: Callable[[], bool] = lambda: True
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.lib}:{self.recipe}"


def _cuda() -> bool:
    return torch.cuda.is_available()


def _has_fbgemm_rowwise() -> bool:
    return _cuda() and hasattr(torch.ops, "fbgemm") and hasattr(torch.ops.fbgemm, "f8f8bf16_rowwise")


def default_candidates() -> list:
    """torch._scaled_mm tensorwise/rowwise/rowwise-gw-hp; blockwise (fbgemm/DeepGEMM only);
    fbgemm rowwise when fbgemm_gpu with CUDA kernels is loaded."""
    return [
        Candidate("torch", "tensorwise", lambda: hasattr(torch, "_scaled_mm")),
        Candidate("torch", "rowwise", lambda: hasattr(torch, "_scaled_mm")),
        Candidate("torch", "rowwise_gw_hp", lambda: hasattr(torch, "_scaled_mm")),
        Candidate("fbgemm", "blockwise", lambda: _cuda() and hasattr(torch.ops, "fbgemm")
                  and hasattr(torch.ops.fbgemm, "f8f8bf16_blockwise"),
                  note="needs fbgemm_gpu's f8f8bf16_blockwise"),
        Candidate("fbgemm", "rowwise", _has_fbgemm_rowwise, note="needs fbgemm_gpu's f8f8bf16_rowwise"),
    ]


def torchao_candidates() -> list:
    """torchao's float8 linear (rowwise, tensorwise) as site-level candidates; available with torchao on CUDA."""
    from .torchao_backend import available

    ok = lambda: _cuda() and available()  # noqa: E731
    return [Candidate("torchao", r, ok, note="needs torchao (extra 'fp8') and a CUDA device")
            for r in ("rowwise", "tensorwise")]


# -- measurement -----------------------------------------------------------
class MeasurementCache:
    """Measured seconds per (target, P, R, Q, key) where key names lib/recipe/role/quant; JSON-persistable."""

    def __init__(self, path: Optional[str] = None):
        self.path = path
        self.data: dict = {}
        if path and os.path.exists(path):
            self.data = _validated_timings(path, read_json_file(path, "FP8 timings cache"))

    @staticmethod
    def key(target: str, p: int, r: int, q: int, what: str) -> str:
        return f"{target}|{p}x{r}x{q}|{what}"

    def get(self, *k) -> Optional[float]:
        return self.data.get(self.key(*k))

    def put(self, value: float, *k) -> None:
        self.data[self.key(*k)] = value

    def save(self, path: Optional[str] = None) -> None:
        path = path or self.path
        if path:
            with open(path, "w") as f:
                json.dump(self.data, f, indent=1, sort_keys=True)


CACHE = MeasurementCache()


def measure_site(m: int, k: int, n: int, candidate: dict, mode: str, lowering: str, bias: bool = True,
                 cache: MeasurementCache = CACHE, timer: Optional[Callable] = None, device="cuda",
                 norm: Optional[tuple] = None) -> dict:
    """Time the site's real FP8 linear (recopt's op or torchao's) against ``F.linear`` in bf16, as
    :func:`recopt.fp8.timing.time_site` does, and cache the result under the device's name and the
    software versions (:func:`recopt.fp8.timing.environment_key`), the lowering and the mode.
    ``norm=(block, eps)``: the site is fed by a BlockNorm it fuses with (both arms include the norm).

    Returns :meth:`SiteTiming.to_dict` (``bf16_s``, ``fp8_s``, ``speedup``...).
    """
    from .timing import candidate_label, environment, environment_key, time_site

    env_key = environment_key(environment(torch.device(device)))
    what = f"{candidate_label(candidate)}|{mode}|{lowering}|bias{int(bias)}|norm{norm}"
    hit = cache.get(env_key, m, k, n, what)
    if hit is not None:
        return hit
    t = time_site(m, k, n, candidate, mode=mode, lowering=lowering, device=device, bias=bias, timer=timer, norm=norm)
    res = t.to_dict()
    cache.put(res, env_key, m, k, n, what)
    return res


# -- decisions -------------------------------------------------------------
@dataclass
class RoleDecision:
    """The choice for one role: ``recipe`` ("bf16" when kept), ``lib``, and why."""

    recipe: str = "bf16"
    lib: str = ""
    error: Optional[float] = None
    speedup: Optional[float] = None
    reason: str = ""


@dataclass
class SiteDecision:
    """Everything decided about one GEMM site; JSON round-trippable."""

    fqn: str
    m: int
    k: int
    n: int
    consumer: str = ""
    producer: str = ""
    eligible: bool = True
    basis: str = "predicted"  # "measured" | "predicted" | "none"
    errors: dict = field(default_factory=dict)    # recipe -> role -> metric -> value
    speedups: dict = field(default_factory=dict)  # lib:recipe -> role -> value
    roles: dict = field(default_factory=dict)     # role -> RoleDecision (as dict)
    decision: str = "bf16"
    reason: str = ""
    reason_code: str = ""
    backend: str = "recopt"  # what runs a chosen site: "recopt" (its FP8 op) or "torchao" (Float8Linear)
    timings: dict = field(default_factory=dict)  # candidate label -> measured SiteTiming dict
    call: int = 0  # which call of the module / weight ``fqn`` this is, in graph order (tied layers)

    @property
    def key(self) -> str:
        """``fqn``, or ``fqn#i`` for the i-th (i ≥ 1) call of a layer used more than once."""
        return self.fqn if not self.call else f"{self.fqn}#{self.call}"

    def role(self, name: str) -> RoleDecision:
        r = self.roles.get(name)
        if r is None:
            return RoleDecision(reason="not decided")
        return r if isinstance(r, RoleDecision) else RoleDecision(**r)

    def recipes(self) -> dict:
        """role -> recipe name or "bf16", what the FP8 linear module is built with."""
        return {r: self.role(r).recipe for r in ROLES}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["roles"] = {k: (asdict(v) if isinstance(v, RoleDecision) else v) for k, v in self.roles.items()}
        return _finite(d)

    @classmethod
    def from_dict(cls, d: dict) -> "SiteDecision":
        """From :meth:`to_dict`'s form; a field of the wrong type or value is a ``ValueError`` naming it
        (a file read back must not be half trusted: see :func:`load_decisions`)."""
        _check_site_dict(d)
        d = dict(d)
        d["roles"] = {k: RoleDecision(**v) for k, v in d.get("roles", {}).items()}
        return cls(**d)


#: Largest decisions / timings file read (bytes): real ones are a few KB per site.
MAX_FILE_BYTES = 64 * 2 ** 20
_SITE_TYPES = {"fqn": str, "m": int, "k": int, "n": int, "consumer": str, "producer": str, "eligible": bool,
               "basis": str, "errors": dict, "speedups": dict, "roles": dict, "decision": str, "reason": str,
               "reason_code": str, "backend": str, "timings": dict, "call": int}
_ROLE_TYPES = {"recipe": str, "lib": str, "error": (int, float, type(None)), "speedup": (int, float, type(None)),
               "reason": str}


def read_json_file(path: str, what: str):
    """``json.load`` of ``path`` with a size limit; a file that is not JSON is a ValueError naming it.

    JSON only (never pickle): a crafted file can carry data, not code.
    """
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{what} {path!r} is {size} bytes, over the {MAX_FILE_BYTES}-byte limit; it is not a file "
                         f"recopt wrote (delete it, or re-run the fp8 pass to write a new one)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {path!r} is not valid JSON ({e}); delete it or re-run the fp8 pass") from None


def _bad(field_name: str, value, want: str) -> ValueError:
    return ValueError(f"FP8 decision field {field_name!r} is {value!r}; expected {want}")


def _check_site_dict(d) -> None:
    from .linear import HP

    if not isinstance(d, dict):
        raise _bad("site", type(d).__name__, "an object")
    unknown = set(d) - set(_SITE_TYPES)
    if unknown:
        raise _bad("site", sorted(unknown), f"only the fields {sorted(_SITE_TYPES)}")
    for name in ("fqn", "m", "k", "n"):
        if name not in d:
            raise _bad(name, None, "a value (the field is missing)")
    for name, typ in _SITE_TYPES.items():
        if name in d and (not isinstance(d[name], typ) or (typ is int and isinstance(d[name], bool))):
            raise _bad(name, d[name], typ.__name__)
    for name in ("m", "k", "n", "call"):
        if d.get(name, 0) < 0:
            raise _bad(name, d[name], "a size >= 0")
    if d.get("decision", "bf16") not in ("fp8", "bf16"):
        raise _bad("decision", d["decision"], "'fp8' or 'bf16'")
    if d.get("backend", "recopt") not in ("recopt", "torchao"):
        raise _bad("backend", d["backend"], "'recopt' or 'torchao'")
    for role, r in d.get("roles", {}).items():
        if role not in ROLES:
            raise _bad("roles", role, f"a role in {ROLES}")
        if not isinstance(r, dict) or set(r) - set(_ROLE_TYPES):
            raise _bad(f"roles.{role}", r, f"an object with the fields {sorted(_ROLE_TYPES)}")
        for name, typ in _ROLE_TYPES.items():
            if name in r and not isinstance(r[name], typ):
                raise _bad(f"roles.{role}.{name}", r[name], str(typ))
        recipe = r.get("recipe", HP)
        if recipe != HP and (recipe not in RECIPES or not RECIPES[recipe].is_fp8(role)):
            raise _bad(f"roles.{role}.recipe", recipe, f"{HP!r} or a recipe with an FP8 {role} in {sorted(RECIPES)}")


def _validated_timings(path: str, data) -> dict:
    """The timings cache's entries, checked: seconds (a positive finite number) or a site timing
    ``{"bf16_s", "fp8_s", "speedup" = bf16_s / fp8_s, all positive and finite, "candidate", ...}``."""
    if not isinstance(data, dict):
        raise ValueError(f"FP8 timings cache {path!r} holds a {type(data).__name__}, not an object; delete it")
    for key, t in data.items():
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            if math.isfinite(t) and t > 0:
                continue
            raise ValueError(f"FP8 timings cache {path!r}: entry {key!r} = {t!r} is not a positive finite time; "
                             f"delete the file")
        ok = isinstance(t, dict) and all(
            isinstance(t.get(f), (int, float)) and not isinstance(t.get(f), bool) and math.isfinite(t[f])
            and t[f] > 0 for f in ("bf16_s", "fp8_s", "speedup")) and isinstance(t.get("candidate"), str)
        if ok:
            ok = math.isclose(t["speedup"], t["bf16_s"] / t["fp8_s"], rel_tol=1e-6)
        if not ok:
            raise ValueError(f"FP8 timings cache {path!r}: entry {key!r} is not a timing recopt wrote "
                             f"(positive finite bf16_s, fp8_s, speedup = bf16_s / fp8_s, candidate); delete the file")
    return data


def _finite(x):
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if x != x else (1e308 if x > 0 else -1e308)
    return x


DECISIONS_VERSION = 1


def save_decisions(path: str, decisions: list, meta: dict) -> None:
    """Write decisions (and the settings that produced them) as JSON."""
    doc = {"version": DECISIONS_VERSION, **meta, "sites": [d.to_dict() for d in decisions]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)


def load_decisions(path: str) -> tuple:
    """Read a decisions file; returns ``({key: SiteDecision}, meta)`` with ``key`` = ``fqn`` (``fqn#i`` for
    the i-th further call of a layer used more than once, :attr:`SiteDecision.key`)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"FP8 decisions file {path!r} does not exist; run the fp8 pass with "
                                f"configs={{'fp8': {{'decisions_path': {path!r}}}}} first to create it")
    doc = read_json_file(path, "FP8 decisions file")
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: an FP8 decisions file is a JSON object, this one holds a {type(doc).__name__}")
    if doc.get("version") != DECISIONS_VERSION:
        raise ValueError(f"{path}: decisions version {doc.get('version')} is not {DECISIONS_VERSION}; re-probe")
    for name in ("target", "basis"):
        if not isinstance(doc.get(name), str):
            raise ValueError(f"{path}: the decisions file has no {name!r} (got {doc.get(name)!r}), so what it was "
                             f"decided for is unknown; re-run the fp8 pass with decisions_path to write a new one")
    if not isinstance(doc.get("sites"), list):
        raise ValueError(f"{path}: 'sites' must be a list of site decisions, got {type(doc.get('sites')).__name__}")
    sites = {}
    for i, s in enumerate(doc["sites"]):
        try:
            d = SiteDecision.from_dict(s)
        except ValueError as e:
            raise ValueError(f"{path}: site {i}: {e}; re-run the fp8 pass to write a new decisions file") from None
        if d.key in sites:
            raise ValueError(f"{path}: two decisions for the site {d.key!r}; re-run the fp8 pass")
        sites[d.key] = d
    meta = {k: v for k, v in doc.items() if k != "sites"}
    return sites, meta


def evaluate_errors(x_samples: list, w_samples: list, recipes: list, roles: tuple, metrics: list,
                    grad_sampler: Callable[[int, int], torch.Tensor]) -> dict:
    """Error of every recipe and role over (X', W') pairs: recipe -> role -> metric -> mean value.

    Forward compares ``X' W'ᵀ``; dgrad ``dY W'`` and wgrad ``dYᵀ X'`` with
    dY from ``grad_sampler(rows, n)``. References are float64 products of
    the unquantized operands. Metrics are averaged over the pairs (SQNR in
    dB too).
    """
    from .metrics import get_metric

    out: dict = {}
    for name in recipes:
        rec = get_recipe(name)
        out[name] = {}
        for role in roles:
            if not rec.is_fp8(role):
                continue
            acc = {m: 0.0 for m in metrics}
            for x, w in zip(x_samples, w_samples):
                if role == "forward":
                    a, b = x, w.t()
                elif role == "dgrad":
                    a, b = grad_sampler(x.shape[0], w.shape[0]), w
                else:
                    a, b = grad_sampler(x.shape[0], w.shape[0]).t(), x
                ref = a.double() @ b.double()
                got = reference_gemm(a, b, rec, role)
                for m in metrics:
                    acc[m] += get_metric(m).fn(got, ref)
            out[name][role] = {m: v / max(len(x_samples), 1) for m, v in acc.items()}
    return out


def decide_role(role: str, errors: dict, speedups: dict, candidates: list, metric: str, threshold: float,
                min_speedup: float, basis: str) -> RoleDecision:
    """Apply the rule to one role; the reason names the blocking condition."""
    from .metrics import is_safe

    feasible, blocked = [], []
    for c in candidates:
        rec = get_recipe(c.recipe)
        if not rec.is_fp8(role):
            continue
        err = errors.get(c.recipe, {}).get(role, {}).get(metric)
        sp = speedups.get(c.key, {}).get(role)
        if err is None or not is_safe(err, metric, threshold):
            blocked.append(f"{c.key} {metric}={_fmt(err)} ≥ τ={threshold:g}")
            continue
        if not c.available():
            blocked.append(f"{c.key} has no kernel here ({c.note or 'unavailable'})")
            continue
        if sp is None:
            blocked.append(f"{c.key} speed-up unknown ({basis})")
            continue
        if sp <= min_speedup:
            blocked.append(f"{c.key} {basis} speed-up {sp:.2f}× ≤ {min_speedup:g}×")
            continue
        feasible.append((sp, c, err))
    if not feasible:
        return RoleDecision(reason="; ".join(blocked) or "no FP8 candidate for this role")
    # Fastest first; among equal speed-ups (e.g. speed ignored) the most accurate.
    sp, c, err = max(feasible, key=lambda t: (t[0], -t[2] if not get_metric_hib(metric) else t[2]))
    return RoleDecision(recipe=c.recipe, lib=c.lib, error=err, speedup=sp,
                        reason=f"{c.key}: {metric}={_fmt(err)} < τ={threshold:g}, {basis} speed-up {sp:.2f}×")


def get_metric_hib(metric: str) -> bool:
    from .metrics import get_metric

    return get_metric(metric).higher_is_better


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def calibrate_thresholds(site_stats: dict, site_weights: dict, recipes=("tensorwise", "rowwise", "blockwise"),
                         roles=("forward",), margin: float = 2.5, samples: int = 4, rows: int = 256,
                         seed: int = 0) -> dict:
    """Calibrate τ per metric on a known-good model's probed sites.

    ``site_stats``: name → :class:`~recopt.fp8.probe.ActivationStats`;
    ``site_weights``: name → weight (N×K). For every metric, the worst
    (largest; smallest for SQNR) error over sites, recipes and roles is
    found, and τ = worst × ``margin`` (SQNR: worst − 20·log10(margin) dB).
    Returns ``{metric: {"worst": v, "threshold": τ}}``.
    """
    from .metrics import METRICS

    gen = torch.Generator().manual_seed(seed)
    names = [m for m in METRICS if m != "mere_raw"]
    worst: dict = {}
    for site, st in site_stats.items():
        w = site_weights[site].detach().float()
        xs = [st.sample(min(rows, max(2, st.typical_rows or rows)), gen) for _ in range(samples)]
        errs = evaluate_errors(xs, [w] * samples, list(recipes), tuple(roles), names,
                               lambda r, n: torch.randn(r, n, generator=gen))
        for per_role in errs.values():
            for per_metric in per_role.values():
                for m, v in per_metric.items():
                    hib = METRICS[m].higher_is_better
                    if m not in worst or (v < worst[m] if hib else v > worst[m]):
                        worst[m] = v
    out = {}
    for m, v in worst.items():
        tau = v - 20 * math.log10(margin) if METRICS[m].higher_is_better else v * margin
        out[m] = {"worst": v, "threshold": tau}
    return out
