"""Shape guards: the conditions on call inputs under which an optimized graph is valid.

Two sources record guards:

- Dynamo capture specialises Python branches on sizes (``if x.shape[0] > 4``)
  and hands back guard expressions such as ``L['x'].size()[0] == 6``;
- a pass that decides from a concrete size of the example (a band-mask
  width, a gate that is a scalar only at batch 1) records a :class:`Guard`
  with :meth:`recopt.passes.base.PassContext.add_guard`.

Every call of the optimized model checks all of them with one compiled
function (:func:`compile_guards`); a call that breaks one re-specialises
(the model is optimized again for the new shapes). A decision that holds
for every size records nothing.

Guard expressions are Python expressions over ``L`` (the call's inputs by
parameter name) using only ``.size()``, ``.dim()``, ``.ndimension()``,
``.dtype``, ``.device``, ``len``, comparisons and arithmetic; they come from
Dynamo or from :class:`Guard`, never from files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

_OPS = ("==", "!=", ">=", "<=", ">", "<")


@dataclass(frozen=True)
class Guard:
    """``inputs[input_name].size(dim) <op> value``, recorded by ``pass_name`` because of ``reason``."""

    input_name: str
    dim: int
    value: int
    op: str = "=="
    reason: str = ""
    pass_name: str = ""

    def __post_init__(self):
        if self.op not in _OPS:
            raise ValueError(f"guard op must be one of {_OPS}, got {self.op!r}")
        if not isinstance(self.dim, int) or not isinstance(self.value, int):
            raise TypeError(f"guard dim and value must be ints, got {self.dim!r} and {self.value!r}")
        if not self.input_name.isidentifier():
            raise ValueError(f"guard input name must be an identifier, got {self.input_name!r}")

    @property
    def code(self) -> str:
        """The expression checked at call time (the same form as Dynamo's guards)."""
        return f"L[{self.input_name!r}].size()[{self.dim}] {self.op} {self.value}"

    def describe(self) -> str:
        who = f"{self.pass_name}: " if self.pass_name else ""
        return f"{self.code}  ({who}{self.reason})" if self.reason else self.code


def compile_guards(codes: Sequence[str], input_names: Sequence[str]) -> Callable[[tuple], bool]:
    """One function ``check(args) -> bool`` evaluating every guard expression.

    The expressions are compiled once into a single code object; a call
    binds the inputs by name and evaluates the conjunction. An expression
    that raises (an input of another rank, a non-tensor) counts as broken.
    """
    codes = list(dict.fromkeys(codes))
    if not codes:
        return _always
    names = list(input_names)
    body = " and ".join(f"({c})" for c in codes)
    source = f"lambda L: {body}"
    fn = eval(compile(source, "<recopt guards>", "eval"),  # noqa: S307 - expressions from Dynamo/Guard, see module doc
              {"__builtins__": {"str": str, "len": len}})

    def check(args: tuple) -> bool:
        try:
            return bool(fn(dict(zip(names, args))))
        except Exception:  # a guard that cannot be evaluated on these inputs does not hold
            return False

    check.source = source
    return check


def _always(args: tuple) -> bool:
    return True
