"""Momentum-scaled row-wise AdaGrad (the 2D sparse parallelism paper, arXiv 2508.03854).

Row-wise AdaGrad keeps one accumulator per embedding row: for a touched row
``i`` of width ``D`` with gradient ``g`` (duplicates already summed)::

    g̃    = g + λ·w_i                    (only if weight_decay λ > 0; L2, FBGEMM mode 1)
    v_i  ← v_i + mean_d(g̃_d²)           (one float per row: FBGEMM's "momentum1"/"sum")
    w_i  ← w_i − η·g̃ / (sqrt(v_i / c) + ε)

``c = replicas`` is the momentum scale of 2D sparse parallelism: with ``G``
data-parallel replicas of the sharded tables, the accumulator is divided by
``G`` when the step is formed. ``c = 1`` is FBGEMM's ``EXACT_ROWWISE_ADAGRAD``
exactly (ε outside the square root, as FBGEMM places it).

**Mapping to FBGEMM's fused optimizer.** FBGEMM has no momentum-scale knob,
but ``η/(sqrt(v/c) + ε) = (η·√c)/(sqrt(v) + ε·√c)``, so the fused
``EXACT_ROWWISE_ADAGRAD`` with ``learning_rate = η·√c`` and ``eps = ε·√c``
computes the same update (see :func:`fbgemm_rowwise_adagrad_params`). The
paper writes the step as ``η·g/sqrt(v/c + ε)`` (ε inside the root); the two
forms differ only where ε sits, which matters only while ``v`` is near ``ε``.

"Touched" rows are the rows whose gradient is not all zero (for a dense
gradient) or whose index appears (for a sparse gradient from
``nn.Embedding(sparse=True)``). Untouched rows and their accumulators are left
alone, as FBGEMM's fused backward never sees them.

Parameters of any shape are accepted: dimension 0 indexes rows and the
accumulator has shape ``[rows]``; a 1-D parameter is treated as rows of width
1 (element-wise AdaGrad), a 0-D one as a single row.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.optim import Optimizer


def fbgemm_rowwise_adagrad_params(lr: float, eps: float = 1e-8, replicas: int = 1,
                                  weight_decay: float = 0.0) -> dict:
    """Fused-optimizer parameters for FBGEMM/TorchRec that reproduce
    :class:`MomentumScaledRowWiseAdagrad` (``lr``, ``eps``, ``replicas``).

    Returns a dict for TorchRec's ``fused_params`` (``optimizer`` is
    ``EmbOptimType.EXACT_ROWWISE_ADAGRAD``; ``learning_rate = lr·√replicas``;
    ``eps = eps·√replicas``; ``weight_decay`` with FBGEMM's L2 mode when > 0).
    Needs ``fbgemm_gpu`` (``pip install 'recopt[rec]'``).
    """
    _check_hparams(lr, eps, replicas, weight_decay)
    from ..errors import require

    require("fbgemm_gpu", "rec", "fused row-wise AdaGrad for sharded tables")
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    scale = math.sqrt(replicas)
    params = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
              "learning_rate": lr * scale, "eps": eps * scale}
    if weight_decay > 0:
        from fbgemm_gpu.split_embedding_configs import WeightDecayMode

        params["weight_decay"] = weight_decay
        params["weight_decay_mode"] = WeightDecayMode.L2
    return params


def _check_hparams(lr, eps, replicas, weight_decay):
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it keeps the first step finite), got {eps}")
    if int(replicas) != replicas or replicas < 1:
        raise ValueError(f"replicas must be a positive integer (the number of 2D replica groups G), got {replicas}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


class MomentumScaledRowWiseAdagrad(Optimizer):
    """Row-wise AdaGrad with the 2D momentum scale ``c = replicas`` (see module doc).

    ``lr`` (η), ``eps`` (ε, outside the root), ``replicas`` (c, default 1 = plain
    row-wise AdaGrad), ``weight_decay`` (L2 added to the gradient of touched
    rows), ``initial_accumulator_value`` (FBGEMM starts at 0).

    State per parameter: ``state[p]["sum"]`` of shape ``[rows]`` (float32),
    named like FBGEMM's ``get_optimizer_state()[i]["sum"]`` so 2D replica
    sync can average it the same way.
    """

    def __init__(self, params: Iterable, lr: float = 0.01, eps: float = 1e-8, replicas: int = 1,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0):
        _check_hparams(lr, eps, replicas, weight_decay)
        if initial_accumulator_value < 0:
            raise ValueError(f"initial_accumulator_value must be >= 0, got {initial_accumulator_value}")
        defaults = dict(lr=lr, eps=eps, replicas=int(replicas), weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value)
        super().__init__(params, defaults)

    def _state_for(self, p: torch.Tensor, init: float) -> torch.Tensor:
        state = self.state[p]
        if "sum" not in state:
            rows = p.shape[0] if p.dim() > 0 else 1
            state["sum"] = torch.full((rows,), float(init), dtype=torch.float32, device=p.device)
        return state["sum"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, c, wd = group["lr"], group["eps"], group["replicas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                acc = self._state_for(p, group["initial_accumulator_value"])
                w = p.view(1, -1) if p.dim() == 0 else p.view(p.shape[0], -1)
                if p.grad.is_sparse:
                    grad = p.grad.coalesce()
                    rows = grad.indices()[0]
                    g = grad.values().reshape(rows.numel(), -1).float()
                else:
                    g_full = p.grad.reshape(w.shape).float()
                    rows = torch.nonzero(g_full.ne(0).any(dim=1)).flatten()
                    g = g_full.index_select(0, rows)
                if rows.numel() == 0:
                    continue
                w_rows = w.index_select(0, rows).float()
                if wd > 0:
                    g = g + wd * w_rows
                acc_rows = acc.index_select(0, rows) + g.pow(2).mean(dim=1)
                acc.index_copy_(0, rows, acc_rows)
                step = lr / (torch.sqrt(acc_rows / c) + eps)
                w.index_copy_(0, rows, (w_rows - step[:, None] * g).to(w.dtype))
        return loss
