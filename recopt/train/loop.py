"""A small, reproducible train/evaluate loop for recopt's CTR models.

A "split" is anything with ``batches(batch_size, shuffle, seed, drop_last)``
yielding :class:`~recopt.data.batch.Batch`, ``num_batches(batch_size,
drop_last)`` and ``__len__`` (:class:`recopt.data.CTRSplit`,
:class:`recopt.data.synthetic.SyntheticSplit`). A "model" is any callable
``model(*batch.inputs()) -> logits [B]`` -- an ``nn.Module``, a traced
``GraphModule`` or the callable ``recopt.optimize`` returns; pass
``parameters=`` when it is not an ``nn.Module``.

Reproducibility: :func:`seed_everything` seeds Python, numpy and torch;
epoch ``k`` shuffles with seed ``config.seed + k``; so the same seed, model
and data give the same batches and (on CPU) the same weights.
On CUDA the forward runs under bf16 autocast unless ``amp="off"``.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .metrics import Metrics, compute_metrics

try:  # the progress bar is a nicety, not a dependency
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover
    _tqdm = None


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: Optional[int] = None     # stop after this many optimizer steps (across epochs)
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: Optional[float] = 1.0
    seed: int = 0
    device: str = "auto"                # "auto": cuda if available, else cpu
    amp: str = "auto"                   # "auto": bf16 autocast on cuda only; "bf16"; "off"
    eval_batch_size: int = 2048
    progress: bool = True
    eval_every_epoch: bool = False


@dataclass
class TrainResult:
    steps: int
    seconds: float                      # wall time of the training steps only
    cpu_seconds: float                  # process CPU time of the training steps (all threads)
    final_loss: float                   # mean training loss over the last 50 steps
    metrics: Optional[Metrics]          # on eval_split after training (None without one)
    history: List[dict] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _autocast(device: torch.device, amp: str):
    if amp not in ("auto", "bf16", "off"):
        raise ValueError(f"amp={amp!r}; expected 'auto', 'bf16' or 'off'")
    enabled = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _progress(total: int, enabled: bool, desc: str):
    if enabled and _tqdm is not None:
        return _tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)
    return None


@torch.no_grad()
def predict(model: Callable, split, batch_size: int = 2048, device: str | torch.device = "auto",
            amp: str = "auto"):
    """``(labels [N], logits [N])`` for every example of ``split``, in split order."""
    dev = resolve_device(device) if isinstance(device, str) else device
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    labels, logits = [], []
    try:
        for batch in split.batches(batch_size, shuffle=False):
            batch = batch.to(dev)
            with _autocast(dev, amp):
                out = model(*batch.inputs())
            logits.append(out.float().cpu())
            labels.append(batch.labels.cpu())
    finally:
        if isinstance(model, nn.Module) and was_training:
            model.train()
    return torch.cat(labels), torch.cat(logits)


def evaluate(model: Callable, split, base_rate: Optional[float] = None, batch_size: int = 2048,
             device: str | torch.device = "auto", amp: str = "auto") -> Metrics:
    """AUC, LogLoss and NE of ``model`` on ``split``; NE normalized by ``base_rate``
    (default: the split's own mean label)."""
    labels, logits = predict(model, split, batch_size, device, amp)
    return compute_metrics(labels, logits, base_rate=base_rate)


def _split_base_rate(split) -> Optional[float]:
    if hasattr(split, "labels"):
        return float(split.labels.float().mean())
    return getattr(getattr(split, "source", None), "base_rate", None)


def train(model: Callable, train_split, eval_split=None, config: TrainConfig = TrainConfig(),
          parameters: Optional[Iterable[torch.Tensor]] = None, base_rate: Optional[float] = None) -> TrainResult:
    """Train ``model`` with Adam on BCE-with-logits, then evaluate on ``eval_split``.

    ``base_rate`` normalizes NE (default: the training split's mean label).
    The model is moved to ``config.device`` if it is an ``nn.Module``.
    """
    dev = resolve_device(config.device)
    if isinstance(model, nn.Module):
        model.to(dev)
        model.train()
    params = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; pass parameters= for a non-Module callable")
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if base_rate is None:
        base_rate = _split_base_rate(train_split)

    per_epoch = train_split.num_batches(config.batch_size, drop_last=True)
    total = per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    if total == 0:
        raise ValueError(f"no training steps: {len(train_split)} examples, batch_size={config.batch_size}, "
                         f"epochs={config.epochs}, max_steps={config.max_steps}")
    bar = _progress(total, config.progress, "train")
    history: List[dict] = []
    losses: List[float] = []
    step, seconds, cpu_seconds = 0, 0.0, 0.0
    for epoch in range(config.epochs):
        if step >= total:
            break
        t0, c0 = time.perf_counter(), time.process_time()
        for batch in train_split.batches(config.batch_size, shuffle=True, seed=config.seed + epoch, drop_last=True):
            batch = batch.to(dev)
            with _autocast(dev, config.amp):
                logits = model(*batch.inputs())
            loss = F.binary_cross_entropy_with_logits(logits.float(), batch.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            losses.append(loss.item())
            step += 1
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            if step >= total:
                break
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        cpu_seconds += time.process_time() - c0
        record = {"epoch": epoch, "step": step, "train_loss": float(np.mean(losses[-per_epoch:]))}
        if eval_split is not None and config.eval_every_epoch:
            record.update(evaluate(model, eval_split, base_rate, config.eval_batch_size, dev, config.amp).as_dict())
        history.append(record)
    if bar is not None:
        bar.close()
    metrics = evaluate(model, eval_split, base_rate, config.eval_batch_size, dev, config.amp) \
        if eval_split is not None else None
    return TrainResult(steps=step, seconds=seconds, cpu_seconds=cpu_seconds, final_loss=float(np.mean(losses[-50:])), metrics=metrics,
                       history=history)
