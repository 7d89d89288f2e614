"""torchao as an execution backend of a chosen FP8 site (optional extra ``fp8``).

``to_torchao_linear(linear, recipe)`` returns torchao's ``Float8Linear``
built from ``linear`` with torchao's ``"rowwise"`` or ``"tensorwise"`` recipe;
it shares ``linear``'s weight and bias Parameters (no copy), keeps the
``weight``/``bias`` state-dict keys, and ``torch.compile`` fuses its casts
with the neighbouring ops. Dispatch (:mod:`recopt.passes.fp8`) times it
against recopt's own FP8 op and bf16 on the GPU and keeps the fastest
accurate one; without torchao installed none of this is used (and
:func:`available` says so).
"""
from __future__ import annotations

import torch.nn as nn

from ..errors import require

RECIPES = ("rowwise", "tensorwise")


def available() -> bool:
    """Whether torchao's float8 training module can be imported here."""
    try:
        import torchao.float8  # noqa: F401
    except ImportError:  # not installed (or blocked): torchao is not a candidate
        return False
    return True


def to_torchao_linear(linear: nn.Linear, recipe: str) -> nn.Module:
    """torchao's float8 linear for ``linear`` (parameters shared) with recipe ``rowwise`` or ``tensorwise``."""
    if recipe not in RECIPES:
        raise ValueError(f"torchao float8 recipe {recipe!r} is not one of {RECIPES}")
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"torchao's float8 linear replaces nn.Linear modules, got {type(linear).__name__}")
    require("torchao", "fp8", "torchao's float8 linear")
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear

    mod = Float8Linear.from_float(linear, config=Float8LinearConfig.from_recipe_name(recipe))
    mod.train(linear.training)
    return mod


def is_torchao_linear(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torchao.") and isinstance(module, nn.Linear)
