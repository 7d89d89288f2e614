"""Time what runs: a site's real FP8 linear (forward, or forward+backward) against ``F.linear`` in bf16.

Dispatch decides from these numbers on the GPU (LoKA's rule "never slower
than bf16 at a chosen site" is only as good as what was timed). Contract:

- :func:`time_site` builds, at the site's shape ``(M, K, N)``, an
  ``nn.Linear`` in the model dtype and the candidate that would replace it
  (recopt's :class:`~recopt.fp8.linear.FP8Linear` with the site's per-role
  recipes, or a torchao float8 linear), sharing the weights; lowers both the
  same way (``eager``, ``compile`` = ``torch.compile``, ``cudagraphs`` =
  ``torch.compile(mode="reduce-overhead")``); and times one step of each —
  inference: a forward under ``no_grad``; training: forward + backward with a
  fixed upstream gradient. The two arms are timed interleaved (``rounds``
  times each, medians), so drift hits both.
- The timer is injectable (``timer(fn) -> seconds``; ``fn.label`` is
  ``"bf16"`` or the candidate's label); the default is triton's
  ``do_bench`` median on CUDA (L2 flushed between calls) and refuses to run on
  a CPU, where Dispatch predicts instead.
- :func:`environment` names the device and the software (torch, triton, CUDA,
  torchao); :func:`environment_key` is the string under which timings and
  measured decisions are saved. A saved measurement is re-used only under the
  same key: another GPU or another version re-measures.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

LOWERINGS = ("eager", "compile", "cudagraphs")


def environment(device: Optional[torch.device] = None) -> dict:
    """Device name and software versions that a timing depends on."""
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        name, cap = "cpu", ""
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    from importlib.metadata import PackageNotFoundError, version

    try:
        torchao_v = version("torchao")
    except PackageNotFoundError:  # the optional backend is not installed
        torchao_v = None
    return {"device": name, "capability": cap, "torch": torch.__version__, "triton": triton_v,
            "cuda": torch.version.cuda, "torchao": torchao_v}


def environment_key(env: dict) -> str:
    """One string naming a timing environment (stable field order)."""
    return "|".join(f"{k}={env.get(k)}" for k in ("device", "capability", "torch", "triton", "cuda", "torchao"))


def environment_mismatch(saved: dict, current: dict) -> list:
    """The fields (``device``, ``torch``...) in which a saved environment differs from the current one."""
    return [k for k in ("device", "capability", "torch", "triton", "cuda", "torchao")
            if saved.get(k) != current.get(k)]


def default_timer(fn: Callable[[], object]) -> float:
    """Median seconds of ``fn`` on the current CUDA device (triton's ``do_bench``)."""
    if not torch.cuda.is_available():
        raise RuntimeError("timing an FP8 site needs a CUDA device; on a CPU Dispatch predicts speed-ups "
                           "from the roofline model instead (or pass timer= for tests)")
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=50, return_mode="median")) * 1e-3


def lower_module(module: nn.Module, lowering: str) -> Callable:
    """``module`` as the given lowering runs it."""
    if lowering == "eager":
        return module
    if lowering == "compile":
        return torch.compile(module)
    if lowering == "cudagraphs":
        return torch.compile(module, mode="reduce-overhead")
    raise ValueError(f"unknown lowering {lowering!r}; valid: {LOWERINGS}")


def make_step(run: Callable, x: torch.Tensor, mode: str) -> Callable[[], object]:
    """One inference forward (no_grad) or one training forward+backward of ``run`` on ``x``."""
    if mode == "inference":
        def step():
            with torch.no_grad():
                return run(x)
        return step
    if mode != "training":
        raise ValueError(f"mode must be 'training' or 'inference', got {mode!r}")
    xg = x.detach().requires_grad_(True)
    with torch.no_grad():
        gy = torch.randn_like(run(xg.detach()))

    def step():
        y = run(xg)
        y.backward(gy)
        return y
    return step


@dataclass
class SiteTiming:
    """Median seconds per step of the bf16 ``nn.Linear`` and of the candidate, and their ratio."""

    bf16_s: float
    fp8_s: float
    lowering: str
    mode: str
    candidate: str

    @property
    def speedup(self) -> float:
        return self.bf16_s / self.fp8_s

    def to_dict(self) -> dict:
        return dict(asdict(self), speedup=self.speedup)


def time_pair(base_step: Callable, cand_step: Callable, timer: Callable, rounds: int = 3) -> tuple:
    """Medians of interleaved timings ``(base, candidate)`` after one warm-up call of each."""
    base_step()
    cand_step()
    tb, tc = [], []
    for _ in range(rounds):
        tb.append(timer(base_step))
        tc.append(timer(cand_step))
    return statistics.median(tb), statistics.median(tc)


def candidate_module(linear: nn.Linear, candidate: dict) -> nn.Module:
    """The module a site would run: ``{"backend": "recopt", "recipes": {...}}`` or
    ``{"backend": "torchao", "recipe": "rowwise"|"tensorwise"}``."""
    backend = candidate.get("backend", "recopt")
    if backend == "recopt":
        from .linear import FP8Linear

        return FP8Linear.from_linear(linear, candidate["recipes"])
    if backend == "torchao":
        from .torchao_backend import to_torchao_linear

        return to_torchao_linear(linear, candidate["recipe"])
    raise ValueError(f"unknown FP8 execution backend {backend!r}; valid: recopt, torchao")


def candidate_label(candidate: dict) -> str:
    if candidate.get("backend", "recopt") == "torchao":
        return f"torchao:{candidate['recipe']}"
    r = candidate["recipes"]
    return "recopt:" + "/".join(f"{r.get(role, 'bf16')}" for role in ("forward", "dgrad", "wgrad"))


class _FusedBlockNormLinear(nn.Module):
    """``linear(BlockNorm(x))`` as the fp8 pass rewrites a BlockNorm-fed row-wise site: one
    ``recopt::blocknorm_fp8_linear`` op (norm and e4m3 quantization in one pass)."""

    def __init__(self, linear: nn.Linear, block: int, eps: float, recipes: dict):
        super().__init__()
        self.linear, self.block, self.eps, self.recipes = linear, block, eps, recipes

    def forward(self, x):
        r = self.recipes
        return torch.ops.recopt.blocknorm_fp8_linear(x, self.linear.weight, self.linear.bias, self.block, self.eps,
                                                     r["forward"], r["dgrad"], r["wgrad"])


FUSABLE_FORWARD = ("rowwise", "rowwise_gw_hp")


def site_modules(linear: nn.Linear, candidate: dict, norm: Optional[tuple] = None) -> tuple:
    """``(bf16 module, candidate module)`` of a site; with ``norm=(block, eps)`` the site is fed by a
    BlockNorm, which both include (fused into the FP8 op where the pass would fuse it)."""
    if norm is None:
        return linear, candidate_module(linear, candidate)
    from .mods import BlockNorm

    block, eps = norm
    base = nn.Sequential(BlockNorm(linear.in_features, block, eps), linear)
    if candidate.get("backend", "recopt") == "recopt" and candidate["recipes"]["forward"] in FUSABLE_FORWARD:
        return base, _FusedBlockNormLinear(linear, block, eps, candidate["recipes"])
    return base, nn.Sequential(BlockNorm(linear.in_features, block, eps), candidate_module(linear, candidate))


def time_site(m: int, k: int, n: int, candidate: dict, mode: str = "inference", lowering: str = "compile",
              device="cuda", dtype: torch.dtype = torch.bfloat16, bias: bool = True,
              timer: Optional[Callable] = None, rounds: int = 3, seed: int = 0,
              norm: Optional[tuple] = None) -> SiteTiming:
    """Time the candidate FP8 linear against ``F.linear`` in ``dtype`` at (M, K, N); see the module doc.

    ``norm=(block, eps)``: the site's input comes from a BlockNorm only it uses; both arms include the
    norm, and recopt's row-wise candidates run it fused with the quantization, as the pass rewrites it.
    """
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown lowering {lowering!r}; valid: {LOWERINGS}")
    timer = timer or default_timer
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.randn(n, k, generator=gen) / k ** 0.5)
    base = base.to(device=device, dtype=dtype).train(mode == "training")
    base, cand = site_modules(base, candidate, norm)
    base, cand = base.train(mode == "training"), cand.train(mode == "training")
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    label = candidate_label(candidate) + ("+blocknorm" if norm is not None else "")
    base_step = make_step(lower_module(base, lowering), x, mode)
    cand_step = make_step(lower_module(cand, lowering), x, mode)
    base_step.label, cand_step.label = "bf16", label  # what a timer is timing (tests inject timers)
    tb, tc = time_pair(base_step, cand_step, timer, rounds)
    return SiteTiming(tb, tc, lowering, mode, label)
