"""Event-level personalization (Kunlun): a config transform.

Each event type of a :class:`~recopt.models.Kunlun` has its own sequence tower
(:class:`~recopt.models.EventTowerConfig`: ``d_model``, ``n_heads``,
``n_summary``, ``n_layers``, ``window``, ...). :func:`personalize_event_towers`
re-instantiates the model with new per-event settings (high-value events get
more compute, cheap ones less) and reports the forward FLOPs of every tower
before and after, measured with :class:`recopt.costs.FlopCounter` on sample
inputs and attributed to ``towers.<e>`` by module scope. Not a graph rewrite:
the new model has new parameters and must be trained. It lives beside the
models (it builds a Kunlun), so ``recopt.passes`` imports nothing from
``recopt.models``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

import torch

from ..graph.scopes import flops_by_prefix, node_flops
from .kunlun import EventTowerConfig, Kunlun


@dataclass
class EventTowerReport:
    """FLOPs per sample: ``towers_before[name]`` / ``towers_after[name]``, and totals."""

    towers_before: dict = field(default_factory=dict)
    towers_after: dict = field(default_factory=dict)
    total_before: float = 0.0
    total_after: float = 0.0
    configs_before: dict = field(default_factory=dict)
    configs_after: dict = field(default_factory=dict)
    note: str = "architecture change: the personalized model must be trained"

    def table(self) -> str:
        rows = ["| event tower | FLOPs/sample before | after | change |", "|---|---|---|---|"]
        for name in self.towers_before:
            b, a = self.towers_before[name], self.towers_after.get(name, 0.0)
            rows.append(f"| {name} | {b:,.0f} | {a:,.0f} | {(a - b) / b * 100 if b else 0:+.1f}% |")
        tb, ta = self.total_before, self.total_after
        rows.append(f"| whole model | {tb:,.0f} | {ta:,.0f} | {(ta - tb) / tb * 100 if tb else 0:+.1f}% |")
        return "\n".join(rows)


def tower_flops(model: torch.nn.Module, inputs: tuple) -> tuple:
    """``({event name: FLOPs per sample}, total FLOPs per sample)`` of a Kunlun model."""
    from ..capture import capture  # at call time: capture is an optimizer layer above the models

    was = model.training
    model.eval()
    try:
        gm = capture(model, inputs).graph_module
        flops = node_flops(gm, inputs)
    finally:
        model.train(was)
    B = int(inputs[0].shape[0])
    names = list(model.spec.event_names)
    per = flops_by_prefix(gm, flops, [f"towers.{e}" for e in range(len(names))])
    return {names[e]: per[f"towers.{e}"] / B for e in range(len(names))}, sum(flops.values()) / B


def personalize_event_towers(model: torch.nn.Module, towers: Mapping[Any, Any], inputs: Optional[tuple] = None,
                             seed: Optional[int] = None) -> tuple:
    """``(new_model, EventTowerReport)``: ``model`` (a Kunlun) rebuilt with per-event tower configs.

    ``towers`` maps an event name or index to an :class:`~recopt.models.EventTowerConfig`
    or a dict of fields to change (``{"clicks": {"d_model": 64, "n_layers": 3}}``);
    events not listed keep their tower. ``inputs`` (the five model inputs) enable
    the FLOP report; ``seed`` seeds the new model's initialisation.
    """
    if not isinstance(model, Kunlun):
        raise TypeError(f"personalize_event_towers expects a recopt.models.Kunlun, got {type(model).__name__}; "
                        "event towers are a Kunlun config concept")
    names = list(model.spec.event_names)
    new_towers = list(model.config.towers)
    for key, cfg in towers.items():
        if isinstance(key, str):
            if key not in names:
                raise KeyError(f"unknown event type {key!r}; the model's events are {names}")
            e = names.index(key)
        else:
            e = int(key)
            if not 0 <= e < len(names):
                raise KeyError(f"event index {e} out of range 0..{len(names) - 1}")
        if isinstance(cfg, Mapping):
            cfg = replace(new_towers[e], **cfg)
        if not isinstance(cfg, EventTowerConfig):
            raise TypeError(f"tower config for {names[e]!r} must be an EventTowerConfig or a dict of its fields")
        new_towers[e] = cfg
    if seed is not None:
        torch.manual_seed(seed)
    new = Kunlun(model.spec, replace(model.config, towers=tuple(new_towers)))
    report = EventTowerReport(
        configs_before={n: vars(c).copy() if hasattr(c, "__dict__") else c for n, c in zip(names, model.config.towers)},
        configs_after={n: vars(c).copy() if hasattr(c, "__dict__") else c for n, c in zip(names, new_towers)})
    if inputs is not None:
        report.towers_before, report.total_before = tower_flops(model, tuple(inputs))
        report.towers_after, report.total_after = tower_flops(new, tuple(inputs))
    return new, report
