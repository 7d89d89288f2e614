"""The pass contract: what a graph pass is, what it returns, and how it reports.

A pass takes an ``torch.fx.GraphModule`` whose nodes carry shape/dtype
metadata (``node.meta["tensor_meta"]`` and ``node.meta["val"]`` where capture
could infer them) and returns a :class:`PassResult`: the (possibly new) graph
module and one :class:`Site` per candidate it looked at, rewritten or
rejected with a reason a user can act on.

Passes never verify themselves: the :class:`~recopt.passes.manager.PassManager`
runs the graph before and after each pass and rolls back an ``exact`` pass
whose output moved past tolerance.
"""
from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
import torch.fx as fx

from ..graph.scopes import module_path_of
from ..report import REJECTED, REWRITTEN, Site, _jsonable  # noqa: F401  (the report's vocabulary)


class Semantics(str, enum.Enum):
    """What a pass promises about the function the model computes.

    ``EXACT``: the output is unchanged within the dtype's tolerance; verified
    after the pass and rolled back if not. ``ARCHITECTURE``: the pass changes
    the model (it needs retraining); off by default, opted into by name, and
    verified only for shapes/dtypes and finiteness.
    """

    EXACT = "exact"
    ARCHITECTURE = "architecture"




@dataclass
class PassConfig:
    """Base class of pass configs: a small dataclass that round-trips via JSON.

    Subclasses add fields with JSON-friendly types (bool, int, float, str,
    lists/dicts of those). Unknown keys in :meth:`from_dict` are an error that
    lists the valid keys.
    """

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "PassConfig":
        if data is None:
            return cls()
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise TypeError(
                f"{cls.__name__} expects a dict of options, got {type(data).__name__}"
            )
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for {cls.__name__}; valid options: {sorted(valid)}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "PassConfig":
        return cls.from_dict(json.loads(text))


@dataclass
class PassResult:
    """What :meth:`Pass.run` returns.

    ``inference_only``: the rewrite is meant for inference (e.g. FP8 in
    inference mode) and need not keep gradients; the manager then checks
    outputs only and says so in the report.
    """

    graph_module: fx.GraphModule
    sites: list = field(default_factory=list)
    inference_only: bool = False

    @property
    def modified(self) -> bool:
        return any(s.status == REWRITTEN for s in self.sites)


@dataclass
class PassContext:
    """What a pass may read besides the graph.

    ``target`` is a :class:`recopt.Target`; ``example_inputs`` the captured
    sample inputs (a tuple of tensors; do not mutate them); ``options`` holds
    the extra keyword arguments given to ``recopt.optimize`` (for example
    ``calibration_data``), so passes can take inputs that are not config.
    ``training``: the mode of the graph being optimized (recopt optimizes
    one graph per mode); a rewrite that cannot keep train-mode semantics
    (dropout, batch statistics) must reject the site with a reason when it
    is True.
    """

    target: Any
    example_inputs: tuple = ()
    options: dict = field(default_factory=dict)
    training: bool = False
    input_names: tuple = ()
    guards: list = field(default_factory=list)
    pass_name: str = ""

    def add_guard(self, input_index: int, dim: int, value: int, reason: str, op: str = "==") -> None:
        """Record that this rewrite holds only while ``input[input_index].size(dim) <op> value``.

        Call it when a decision reads a concrete size of the example (a mask
        width, a dimension that is 1 only in the example). The guard is kept
        with the optimized graph if the pass is applied (dropped on
        rollback); a call that breaks it re-optimizes for the new shapes. A
        decision that holds for every size records nothing.
        """
        from ..guards import Guard

        if not 0 <= input_index < len(self.example_inputs):
            raise IndexError(f"add_guard: input_index {input_index} out of range for "
                             f"{len(self.example_inputs)} example inputs")
        x = self.example_inputs[input_index]
        if not isinstance(x, torch.Tensor) or not -x.dim() <= dim < x.dim():
            raise IndexError(f"add_guard: input {input_index} has no dimension {dim}")
        names = self.input_names or tuple(f"arg{i}" for i in range(len(self.example_inputs)))
        self.guards.append(Guard(names[input_index], dim % x.dim(), int(value), op, reason, self.pass_name))

    def input_index(self, node: fx.Node) -> int:
        """The position among the graph's inputs of a ``placeholder`` node."""
        if node.op != "placeholder":
            raise ValueError(f"input_index expects a placeholder node, got {node.op} {node.name}")
        return [n for n in node.graph.nodes if n.op == "placeholder"].index(node)


class Pass:
    """Base class of graph passes.

    Subclasses set the class attributes and implement :meth:`run`:

    - ``name``: registry key, lowercase (``"gdpa"``).
    - ``semantics``: :class:`Semantics` (``EXACT`` by default).
    - ``config_cls``: the :class:`PassConfig` subclass it takes.
    - ``after`` / ``before``: names of passes this one must run after/before
      when both are in a pipeline.
    - ``default_targets``: target names whose default pipeline includes this
      pass (``("*",)`` for all). Architecture passes are never default.
    - ``tolerance``: optional ``(rtol, atol)`` override for verification.
      Its ``rtol`` also bounds the relative change of parameter gradients
      (unless ``gradient_rtol`` is set), so a pass that declares FP8-sized
      errors for outputs is held to FP8-sized errors for gradients.
    - ``gradient_rtol``: optional override of that gradient bound.
    - ``output_contract``: ``"same"`` (the output keeps its structure) or
      ``"prefix"`` (the pass appends outputs, e.g. a distillation head: the
      original outputs must come first in the new output, values unchanged
      within tolerance, and the new ones must be finite).

    :meth:`run` gets a deep copy of the graph module whose parameters and
    buffers are *shared* with the user's model (the optimized model trains
    the user's weights). So a pass may rewire, add and remove modules and
    nodes freely, but must never modify an existing parameter's data in
    place: make a new ``nn.Parameter`` instead (its rollback could not undo
    the change).
    """

    name: ClassVar[str] = ""
    semantics: ClassVar[Semantics] = Semantics.EXACT
    config_cls: ClassVar[type] = PassConfig
    after: ClassVar[tuple] = ()
    before: ClassVar[tuple] = ()
    default_targets: ClassVar[tuple] = ()
    tolerance: ClassVar[Optional[tuple]] = None
    gradient_rtol: ClassVar[Optional[float]] = None
    output_contract: ClassVar[str] = "same"
    description: ClassVar[str] = ""

    def __init__(self, config: Any = None):
        self.config = self.config_cls.from_dict(config) if not isinstance(
            config, self.config_cls
        ) else config

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError(f"pass {self.name!r} does not implement run()")

    # Helpers that build sites with this pass's name filled in.
    def rewritten(self, node: fx.Node, reason: str = "", **kw) -> Site:
        return Site(
            pass_name=self.name,
            node=node.name,
            status=REWRITTEN,
            reason=reason,
            module_path=kw.pop("module_path", module_path_of(node)),
            op=kw.pop("op", _op_label(node)),
            **kw,
        )

    def rejected(self, node: fx.Node, reason_code: str, reason: str, **kw) -> Site:
        return Site(
            pass_name=self.name,
            node=node.name,
            status=REJECTED,
            reason=reason,
            reason_code=reason_code,
            module_path=kw.pop("module_path", module_path_of(node)),
            op=kw.pop("op", _op_label(node)),
            **kw,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def _op_label(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module:{node.target}"
    t = node.target
    return getattr(t, "__name__", None) or str(t)
