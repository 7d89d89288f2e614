"""Student adapter (ExFM, Eq. 6–7, Algorithm 1).

The adapter is a tiny MLP on the teacher's logged prediction, trained on the
fresh labels the student sees, so it can correct a *stale* teacher (one whose
checkpoint lags the stream) before that prediction supervises the student.

Architecture (the paper's is not public; this is our choice): residual on the
teacher logit, ``ŷ_SA = z + MLP(z)`` with ``z = ŷ_F`` the teacher logit and the
MLP's last layer zero-initialised, so an untrained adapter passes the teacher
through unchanged and learns only a correction.

Algorithm 1, one step per batch (:func:`algorithm1_step`):

1. update the adapter on ``L_sta = h(ŷ_SA, y)``;
2. ``p_SA = SG(σ(SA(ŷ_F)))`` with the updated adapter;
3. update the student on Eq. 7: ``L_s + w·L_d + w_adapter·h(ŷ_D2, p_SA)``.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .losses import ExFMLossConfig, aux_head_loss, bce


class StudentAdapter(nn.Module):
    """``forward(teacher_logits [B]) -> adapted logits [B]`` (float32)."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        if hidden < 1:
            raise ValueError(f"StudentAdapter hidden must be >= 1, got {hidden}")
        self.inp = nn.Linear(1, hidden)
        self.act = nn.SiLU()
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, teacher_logits: Tensor) -> Tensor:
        z = teacher_logits.float().reshape(-1, 1)
        return (z + self.out(self.act(self.inp(z)))).reshape(-1)


def adapter_step(adapter: StudentAdapter, optimizer: torch.optim.Optimizer, teacher_logits: Tensor,
                 labels: Tensor) -> float:
    """Steps 1–2 of Algorithm 1 share this: one update of the adapter on fresh labels; returns ``L_sta``."""
    adapter.train()
    loss = bce(adapter(teacher_logits.detach()), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def algorithm1_step(student: Callable, student_params: Sequence[Tensor], student_opt: torch.optim.Optimizer,
                    adapter: StudentAdapter, adapter_opt: torch.optim.Optimizer, inputs: tuple,
                    labels: Tensor, teacher_logits: Tensor, cfg: ExFMLossConfig,
                    grad_clip: Optional[float] = None) -> dict:
    """One step of Algorithm 1 on a batch.

    ``student(*inputs)`` must return ``(serving, distill, distill2)`` logits
    (an ``aux_head`` graph with ``n_distill_heads=2``). Returns the losses
    ``{"adapter": L_sta, "student": L_VM}``.
    """
    l_sta = adapter_step(adapter, adapter_opt, teacher_logits, labels)
    with torch.no_grad():
        adapter.eval()
        adapter_probs = torch.sigmoid(adapter(teacher_logits))
    outs = student(*inputs)
    if not isinstance(outs, (tuple, list)) or len(outs) != 3:
        raise ValueError("algorithm1_step needs a student returning (serving, distill, distill2) logits; "
                         "run the aux_head pass with n_distill_heads=2 on it")
    serving, distill, distill2 = outs
    loss = aux_head_loss(serving, distill, labels, teacher_logits, cfg, distill2, adapter_probs)
    student_opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(student_params, grad_clip)
    student_opt.step()
    return {"adapter": l_sta, "student": float(loss.detach())}
