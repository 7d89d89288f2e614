"""Quality parity: does a recopt transform keep a model's trained quality?

:func:`quality_parity` builds the model twice from the same seed, transforms
the second copy (by default with ``recopt.optimize``), trains both for the
same number of steps on the same batches, and compares AUC and NE on the
evaluation split. Exact passes must satisfy ``|ΔAUC| <= 0.001`` (the
default tolerance); architecture passes (CompSkip, HSP, sliding window) are
expected to move the numbers and are judged with a looser tolerance chosen by
the caller.

:func:`max_output_difference` is the cheaper, untrained check: the largest
absolute difference between two callables' outputs on the same batch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .loop import TrainConfig, seed_everything, train

Transform = Callable[[nn.Module, tuple], Callable]


@dataclass(frozen=True)
class ParityResult:
    auc_original: float
    auc_transformed: float
    ne_original: float
    ne_transformed: float
    steps: int
    auc_tolerance: float
    ne_tolerance: Optional[float]

    @property
    def delta_auc(self) -> float:
        return self.auc_transformed - self.auc_original

    @property
    def delta_ne(self) -> float:
        return self.ne_transformed - self.ne_original

    @property
    def passed(self) -> bool:
        ok = abs(self.delta_auc) <= self.auc_tolerance
        if self.ne_tolerance is not None:
            ok = ok and abs(self.delta_ne) <= self.ne_tolerance
        return ok

    def as_dict(self) -> dict:
        return {**asdict(self), "delta_auc": self.delta_auc, "delta_ne": self.delta_ne, "passed": self.passed}

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict}: AUC {self.auc_original:.4f} -> {self.auc_transformed:.4f} "
                f"(Δ {self.delta_auc:+.4f}, tol {self.auc_tolerance}), NE {self.ne_original:.4f} -> "
                f"{self.ne_transformed:.4f} (Δ {self.delta_ne:+.4f}) after {self.steps} steps")


def _default_transform(model: nn.Module, example_inputs: tuple):
    import recopt

    if not hasattr(recopt, "optimize"):
        raise RuntimeError("recopt.optimize is not available in this build; pass transform= explicitly")
    return recopt.optimize(model, example_inputs, target="cpu", backend="eager")


def _trainable_parameters(transformed, model: nn.Module):
    """Parameters to train for a transformed model: its own if it is a Module, else the
    source model's (recopt.optimize's callable shares the module's parameters)."""
    if isinstance(transformed, nn.Module):
        return list(transformed.parameters())
    if hasattr(transformed, "parameters") and callable(transformed.parameters):
        return list(transformed.parameters())
    return list(model.parameters())


def quality_parity(make_model: Callable[[], nn.Module], train_split, eval_split,
                   transform: Optional[Transform] = None, steps: int = 200, seed: int = 0,
                   batch_size: int = 256, lr: float = 1e-3, auc_tolerance: float = 1e-3,
                   ne_tolerance: Optional[float] = None, example_batch_size: int = 8,
                   device: str = "cpu") -> ParityResult:
    """Train ``make_model()`` and ``transform(make_model(), example_inputs)`` identically and compare.

    ``make_model`` is called twice after seeding with ``seed``, so both copies
    start from the same weights; ``transform`` defaults to
    ``recopt.optimize(model, example_inputs, target="cpu", backend="eager")``
    and ``example_inputs`` are the first ``example_batch_size`` training examples.
    """
    transform = transform or _default_transform
    cfg = TrainConfig(epochs=10**6, max_steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device,
                      progress=False)
    example = next(iter(train_split.batches(example_batch_size))).inputs()

    seed_everything(seed)
    original = make_model()
    seed_everything(seed)
    source = make_model()
    transformed = transform(source, example)

    seed_everything(seed)
    res_a = train(original, train_split, eval_split, cfg)
    seed_everything(seed)
    res_b = train(transformed, train_split, eval_split, cfg, parameters=_trainable_parameters(transformed, source))
    return ParityResult(res_a.metrics.auc, res_b.metrics.auc, res_a.metrics.ne, res_b.metrics.ne,
                        steps=res_a.steps, auc_tolerance=auc_tolerance, ne_tolerance=ne_tolerance)


@torch.no_grad()
def max_output_difference(a: Callable, b: Callable, inputs: Sequence[torch.Tensor]) -> float:
    """``max |a(*inputs) - b(*inputs)|`` with both in eval mode where applicable."""
    for m in (a, b):
        if isinstance(m, nn.Module):
            m.eval()
    return float((a(*inputs).float() - b(*inputs).float()).abs().max())
