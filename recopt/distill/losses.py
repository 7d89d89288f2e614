"""ExFM losses (arXiv 2502.17494): plain KD, auxiliary head (Eq. 3–5) and the adapter term (Eq. 7).

``h(ŷ, y)`` of the paper is the negative of binary cross-entropy on logits,
so every loss here is ``F.binary_cross_entropy_with_logits`` (mean over the
batch). Teacher predictions arrive as logits ``[B]`` (what the data
augmentation system stores); ``label_scale`` turns them into the clipped
soft label ``min(α·σ(ŷ_F), 1)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ExFMLossConfig:
    """``alpha``: label scaling α; ``w``: weight of the distillation loss;
    ``w_adapter``: weight of the adapter-supervised head (Eq. 7 uses 1)."""

    alpha: float = 1.0
    w: float = 1.0
    w_adapter: float = 1.0

    def __post_init__(self):
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0 (label scaling min(alpha*p, 1)), got {self.alpha}")
        if self.w < 0 or self.w_adapter < 0:
            raise ValueError(f"loss weights must be >= 0, got w={self.w}, w_adapter={self.w_adapter}")


def label_scale(teacher_logits: Tensor, alpha: float) -> Tensor:
    """``min(alpha * sigmoid(teacher_logits), 1)``: the teacher's label-scaled soft target in [0, 1]."""
    return (torch.sigmoid(teacher_logits.float()) * alpha).clamp(max=1.0)


def bce(logits: Tensor, target: Tensor) -> Tensor:
    """Mean ``-h(logits, target)`` for hard or soft targets in [0, 1]."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def kd_loss(student_logits: Tensor, labels: Tensor, teacher_logits: Tensor, cfg: ExFMLossConfig) -> Tensor:
    """Plain knowledge distillation on one head: ``h(ŷ_S, y) + w·h(ŷ_S, min(α·ŷ_F, 1))``."""
    return bce(student_logits, labels) + cfg.w * bce(student_logits, label_scale(teacher_logits, cfg.alpha))


def aux_head_loss(serving_logits: Tensor, distill_logits: Tensor, labels: Tensor, teacher_logits: Tensor,
                  cfg: ExFMLossConfig, distill2_logits: Optional[Tensor] = None,
                  adapter_probs: Optional[Tensor] = None) -> Tensor:
    """``L_s + w·L_d`` (Eq. 5), plus ``w_adapter·h(ŷ_D2, SG(σ(ŷ_SA)))`` (Eq. 7) when
    ``distill2_logits`` and ``adapter_probs`` are given. The serving head sees only ``labels``."""
    loss = bce(serving_logits, labels) + cfg.w * bce(distill_logits, label_scale(teacher_logits, cfg.alpha))
    if (distill2_logits is None) != (adapter_probs is None):
        raise ValueError("give both distill2_logits and adapter_probs (Eq. 7), or neither")
    if distill2_logits is not None:
        loss = loss + cfg.w_adapter * bce(distill2_logits, adapter_probs.detach())
    return loss
