"""Probe: streaming statistics of GEMM inputs and weights, and sampling from them.

Activations (LoKA's probe): each GEMM input X ∈ R^{B×K} is modelled as
N(μ, Σ) over the feature axis K, updated by a batched Welford merge in
float64 (:class:`ActivationStats`). When K is large a full K×K covariance
is replaced by the exact diagonal plus a rank-r Frequent-Directions sketch
of the scatter matrix (memory O(rK)).

Weights: matrix-normal MN(M̄, U, V) with the online flip-flop EMA of LoKA's
probe (:class:`WeightStats`); a diagonal U/V when a side is large.

:class:`ModuleProbe` attaches the statistics to nn.Linear modules of a live
model through forward pre-hooks that run every ``interval`` calls (so the
overhead of a training step stays ~1%); :func:`measure_overhead` measures
that overhead. The fp8 pass uses :func:`collect_graph_stats` to run a
GraphModule over calibration batches instead.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn as nn


class ActivationStats:
    """Streaming mean / covariance over the last dim of 2-D (or flattened N-D) batches.

    ``full_cov_max_k``: up to this K the full covariance is kept; above it,
    the diagonal plus a Frequent-Directions sketch of rank ``rank``.
    ``update(x)`` accepts any tensor whose last dim is K.
    """

    def __init__(self, k: int, full_cov_max_k: int = 1024, rank: int = 32, max_rows_per_update: int = 4096):
        self.k = int(k)
        self.max_rows_per_update = max_rows_per_update
        self.full = self.k <= full_cov_max_k
        self.rank = int(rank)
        self.n = 0
        self.non_finite_rows = 0  # rows holding an inf/NaN, left out of the moments
        self.mean = torch.zeros(self.k, dtype=torch.float64)
        self.amax = torch.zeros(self.k, dtype=torch.float64)
        self.rows_seen: list = []
        if self.full:
            self.m2 = torch.zeros(self.k, self.k, dtype=torch.float64)
        else:
            self.m2_diag = torch.zeros(self.k, dtype=torch.float64)
            self.sketch = torch.zeros(0, self.k, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.k)
        if x.shape[0] == 0:
            return
        self.rows_seen.append(x.shape[0])
        finite = torch.isfinite(x).all(1)
        if not bool(finite.all()):
            # One inf/NaN row would make the mean and covariance inf/NaN, every drawn X' NaN and
            # every recipe's error inf: the site would be rejected as "error above threshold"
            # though FP8 is not the cause. Such rows are counted (the report names them) and left out.
            self.non_finite_rows += int((~finite).sum())
            x = x[finite]
            if x.shape[0] == 0:
                return
        if x.shape[0] > self.max_rows_per_update:
            # An evenly strided subset: samples are independent, so the moments stay unbiased.
            step = -(-x.shape[0] // self.max_rows_per_update)
            x = x[::step]
        # Statistics live on the input's device (a GPU update costs ~0.2 ms at 4096×1024, a CPU
        # copy would cost far more than the step); float64 for the merge.
        self._to(x.device)
        x = x.to(torch.float64)
        b = x.shape[0]
        mu_b = x.mean(0)
        xc = x - mu_b
        n_new = self.n + b
        delta = mu_b - self.mean
        self.mean += delta * (b / n_new)
        cross = self.n * b / n_new
        self.amax = torch.maximum(self.amax, x.abs().amax(0))
        if self.full:
            self.m2 += xc.t() @ xc + cross * torch.outer(delta, delta)
        else:
            self.m2_diag += xc.pow(2).sum(0) + cross * delta.pow(2)
            rows = [xc]
            if cross > 0:
                rows.append((delta * cross ** 0.5)[None])
            self._sketch_add(torch.cat(rows))
        self.n = n_new

    def _to(self, device: torch.device) -> None:
        if self.mean.device == device:
            return
        names = ("mean", "amax", "m2") if self.full else ("mean", "amax", "m2_diag", "sketch")
        for name in names:
            setattr(self, name, getattr(self, name).to(device))

    def _sketch_add(self, rows: torch.Tensor) -> None:
        # Frequent Directions: keep ≤ 2·rank rows B with BᵀB ≈ Σ rowsᵀrows; rows go in
        # rank-sized chunks so each shrink is an SVD of a (2·rank)×K matrix.
        for i in range(0, rows.shape[0], self.rank):
            self.sketch = torch.cat([self.sketch, rows[i:i + self.rank]])
            if self.sketch.shape[0] >= 2 * self.rank:
                self._shrink()

    def _shrink(self) -> None:
        _, s, vh = torch.linalg.svd(self.sketch, full_matrices=False)
        shrink = s[self.rank] ** 2 if s.numel() > self.rank else 0.0
        s2 = (s[: self.rank] ** 2 - shrink).clamp_min(0)
        self.sketch = s2.sqrt()[:, None] * vh[: self.rank]

    @property
    def typical_rows(self) -> int:
        """The median rows per update (the site's M)."""
        if not self.rows_seen:
            return 0
        return int(sorted(self.rows_seen)[len(self.rows_seen) // 2])

    def covariance(self) -> torch.Tensor:
        """Σ (K×K, float64, on the statistics' device); for the sketched form, low-rank plus the residual diagonal."""
        if self.n < 2:
            raise ValueError("need at least 2 rows to estimate a covariance")
        if self.full:
            return self.m2 / (self.n - 1)
        lr = self.sketch.t() @ self.sketch
        d = (self.m2_diag - lr.diagonal()).clamp_min(0)
        return (lr + torch.diag(d)) / (self.n - 1)

    def sample(self, rows: int, generator: Optional[torch.Generator] = None, eps: float = 1e-6) -> torch.Tensor:
        """Draw ``rows`` inputs X' = μ + Z·Lᵀ from the learned Gaussian (float32 on the CPU, rows×K)."""
        if self.n < 2:
            raise ValueError("no statistics collected for this site yet")
        self._to(torch.device("cpu"))
        z = lambda *s: torch.randn(*s, generator=generator, dtype=torch.float64)  # noqa: E731
        if self.full:
            x = self.mean + z(rows, self.k) @ self._factor(eps).t()
        else:
            scale = (self.n - 1) ** -0.5
            lr = self.sketch * scale
            d = ((self.m2_diag - (self.sketch ** 2).sum(0)).clamp_min(0) / (self.n - 1)).sqrt()
            x = self.mean + z(rows, lr.shape[0]) @ lr + z(rows, self.k) * d
        return x.float()

    def _factor(self, eps: float) -> torch.Tensor:
        # L with L Lᵀ = Σ + εI, cached per sample count. Eigen-decomposition (not Cholesky)
        # is robust for rank-deficient Σ (constant features, fewer rows than K).
        key = (self.n, eps)
        if getattr(self, "_factor_key", None) != key:
            cov = self.m2 / (self.n - 1)
            # Jitter per feature (relative to its own variance), so one huge feature does
            # not add noise to the small ones.
            jitter = eps * cov.diagonal().clamp_min(1e-30)
            evals, evecs = torch.linalg.eigh(cov + torch.diag(jitter))
            self._factor_cache = evecs * evals.clamp_min(0).sqrt()
            self._factor_key = key
        return self._factor_cache

    def state_dict(self) -> dict:
        d = {"k": self.k, "n": self.n, "mean": self.mean.tolist(), "amax": self.amax.tolist(),
             "rows_seen": self.rows_seen, "full": self.full, "rank": self.rank,
             "non_finite_rows": self.non_finite_rows}
        if self.full:
            d["m2"] = self.m2.tolist()
        else:
            d["m2_diag"] = self.m2_diag.tolist()
            d["sketch"] = self.sketch.tolist()
        return d


class WeightStats:
    """Matrix-normal EMA of a weight W (N×K as stored by nn.Linear): mean M̄, row cov U, col cov V.

    ``update(W)`` follows LoKA's probe, the matrix-normal flip-flop estimate: U' from W_c·L_V⁻ᵀ, V' from
    L_U⁻¹·W_c, EMA with momentum ``m``, normalised so tr(U)/rows = 1. Sides
    larger than ``full_max`` keep only a diagonal.
    """

    def __init__(self, rows: int, cols: int, momentum: float = 0.9, full_max: int = 1024):
        self.rows, self.cols, self.m = rows, cols, momentum
        self.full_u, self.full_v = rows <= full_max, cols <= full_max
        self.mean: Optional[torch.Tensor] = None
        self.u = torch.ones(rows, dtype=torch.float64) if not self.full_u else torch.eye(rows, dtype=torch.float64)
        self.v = torch.ones(cols, dtype=torch.float64) if not self.full_v else torch.eye(cols, dtype=torch.float64)
        self.v_scale = 0.0  # overall variance scale; 0 until W has moved
        self.updates = 0

    @staticmethod
    def _as_mat(c: torch.Tensor, full: bool) -> torch.Tensor:
        return c if full else torch.diag(c)

    @torch.no_grad()
    def update(self, w: torch.Tensor) -> None:
        w = w.detach().to("cpu", torch.float64)
        self.updates += 1
        if self.mean is None:
            self.mean = w.clone()
            return
        self.mean = self.m * self.mean + (1 - self.m) * w
        wc = w - self.mean
        if float(wc.abs().max()) == 0:
            return
        eps_v = 1e-6 * float(torch.as_tensor(self.v).diagonal().mean() if self.full_v else self.v.mean())
        if self.full_v:
            lv = torch.linalg.cholesky(self.v + eps_v * torch.eye(self.cols, dtype=torch.float64))
            a = torch.linalg.solve_triangular(lv, wc.t(), upper=False).t()  # W_c L_V^-T
            u_new = a @ a.t() / self.cols
        else:
            a = wc / (self.v + eps_v).sqrt()
            u_new = a.pow(2).sum(1) / self.cols
        if not self.full_u:
            u_new = u_new.diagonal() if u_new.dim() == 2 else u_new
        self.u = self.m * self.u + (1 - self.m) * u_new
        eps_u = 1e-6 * float(self.u.diagonal().mean() if self.full_u else self.u.mean())
        if self.full_u:
            self.u = 0.5 * (self.u + self.u.t())
            lu = torch.linalg.cholesky(self.u + eps_u * torch.eye(self.rows, dtype=torch.float64))
            b = torch.linalg.solve_triangular(lu, wc, upper=False)  # L_U^-1 W_c
            v_new = b.t() @ b / self.rows
        else:
            b = wc / (self.u + eps_u).sqrt()[:, None]
            v_new = b.pow(2).sum(0) / self.rows
        if not self.full_v:
            v_new = v_new.diagonal() if v_new.dim() == 2 else v_new
        self.v = self.m * self.v + (1 - self.m) * v_new
        if self.full_v:
            self.v = 0.5 * (self.v + self.v.t())
        tr = float(self.u.diagonal().sum() if self.full_u else self.u.sum()) / self.rows
        if tr > 0:
            self.u = self.u / tr
            self.v = self.v * tr
        self.v_scale = 1.0

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """W' = M̄ + L_U Z L_Vᵀ (float32); just M̄ until W has moved between updates."""
        if self.mean is None:
            raise ValueError("no weight statistics collected yet")
        if self.v_scale == 0.0:
            return self.mean.float()
        z = torch.randn(self.rows, self.cols, generator=generator, dtype=torch.float64)

        def root(c, full, n):
            if not full:
                return c.clamp_min(0).sqrt()
            evals, evecs = torch.linalg.eigh(c + 1e-9 * torch.eye(n, dtype=torch.float64))
            return evecs * evals.clamp_min(0).sqrt()

        lu, lv = root(self.u, self.full_u, self.rows), root(self.v, self.full_v, self.cols)
        left = lu @ z if self.full_u else lu[:, None] * z
        noise = left @ lv.t() if self.full_v else left * lv[None, :]
        return (self.mean + noise).float()


class ModuleProbe:
    """Instrument nn.Linear modules of a live model with sampled input/weight statistics.

    ``ModuleProbe(model, interval=100)`` adds a forward pre-hook to every
    nn.Linear (or those named in ``fqns``); the hook updates that module's
    :class:`ActivationStats` on every ``interval``-th call and its
    :class:`WeightStats` every ``weight_interval``-th call, and otherwise
    returns after one integer increment. ``remove()`` takes the hooks off and
    ``attach()`` puts them back; statistics and call counters persist.
    """

    def __init__(self, model: nn.Module, interval: int = 100, weight_interval: int = 1000,
                 fqns: Optional[Iterable[str]] = None, full_cov_max_k: int = 1024, rank: int = 32):
        if interval < 1:
            raise ValueError(f"interval must be ≥ 1, got {interval}")
        self.interval, self.weight_interval = interval, weight_interval
        self.activations: dict = {}
        self.weights: dict = {}
        self.calls: dict = {}
        self._modules: dict = {}
        self._handles = []
        wanted = set(fqns) if fqns is not None else None
        for name, mod in model.named_modules():
            if not isinstance(mod, nn.Linear) or (wanted is not None and name not in wanted):
                continue
            self.activations[name] = ActivationStats(mod.in_features, full_cov_max_k, rank)
            self.weights[name] = WeightStats(mod.out_features, mod.in_features)
            self.calls[name] = 0
            self._modules[name] = mod
        self.attach()

    def _hook(self, name: str) -> Callable:
        def hook(mod, args):
            c = self.calls[name]
            self.calls[name] = c + 1
            if c % self.interval == 0:
                self.activations[name].update(args[0])
            if c % self.weight_interval == 0:
                self.weights[name].update(mod.weight)
        return hook

    def attach(self) -> None:
        if self._handles:
            return
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self._modules.items()]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def measure_overhead(step: Callable[[], None], probe: ModuleProbe, steps: int = 400, warmup: int = 5,
                     rounds: int = 4) -> dict:
    """Time ``steps`` calls of ``step()`` without and with ``probe`` attached; return the overhead.

    Plain and probed rounds alternate (``rounds`` each) to cancel drift; the
    probe keeps its counters across rounds, so with ``steps`` a multiple of
    its interval the probed steps include exactly ``steps / interval``
    statistics updates per site. Returns per-step seconds for both and
    ``overhead = probed/plain − 1``; the probe is left detached.
    """
    probe.remove()
    for _ in range(warmup):
        step()
    plain, probed = 0.0, 0.0
    per_round = max(steps // rounds, 1)
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(per_round):
                step()
            plain += time.perf_counter() - t0
            probe.attach()
            t0 = time.perf_counter()
            for _ in range(per_round):
                step()
            probed += time.perf_counter() - t0
            probe.remove()
    finally:
        probe.remove()
    n = rounds * per_round
    return {"plain_s": plain / n, "probed_s": probed / n, "overhead": probed / plain - 1.0, "steps": n}


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, site_inputs: dict, stats: dict):
        super().__init__(gm)
        self.site_inputs = site_inputs  # site node name -> input node name
        self.wanted = {v: k for k, v in site_inputs.items()}
        self.stats = stats

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        for site in [s for s, inp in self.site_inputs.items() if inp == n.name]:
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                self.stats[site].update(out)
        return out


@torch.no_grad()
def collect_graph_stats(gm: fx.GraphModule, site_inputs: dict, site_k: dict, batches: Iterable,
                        full_cov_max_k: int = 1024, rank: int = 32, max_batches: Optional[int] = None,
                        progress: bool = False) -> dict:
    """Run ``gm`` over ``batches`` (tuples of inputs) and stream each site's input statistics.

    ``site_inputs``: site name → name of the node feeding its GEMM input;
    ``site_k``: site name → K. Returns site name → :class:`ActivationStats`.
    The graph runs in eval mode; its mode and buffers are restored.
    """
    stats = {s: ActivationStats(site_k[s], full_cov_max_k, rank) for s in site_inputs}
    was_training = gm.training
    saved = {k: v.detach().clone() for k, v in gm.named_buffers()}
    it = batches
    if progress:
        from .._progress import progress_bar
        it = progress_bar(batches, desc="fp8 probe")
    try:
        gm.eval()
        rec = _Recorder(gm, site_inputs, stats)
        for i, batch in enumerate(it):
            if max_batches is not None and i >= max_batches:
                break
            args = batch if isinstance(batch, (tuple, list)) else (batch,)
            rec.run(*args)
    finally:
        gm.train(was_training)
        for k, v in gm.named_buffers():
            if k in saved:
                v.copy_(saved[k])
    return stats
