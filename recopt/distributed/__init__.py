"""2D sparse parallelism on TorchRec + torch.distributed (the 2D sparse parallelism paper, arXiv 2508.03854; docs/sparse2d.md).

- :func:`shard_2d` (inside each rank): shard a model's TorchRec collections
  over ``T = L × G`` ranks and return a :class:`Sharded2DModel` with
  ``maybe_sync()`` / ``sync()`` / ``describe()``; :func:`describe_plan`
  prints the same plan before any process starts.
- :func:`launch` (one machine, T local processes) and :func:`init_from_env`
  (torchrun), both with bounded process-group timeouts.
- :class:`Layout2D`, :func:`place_tables`, :func:`plan_costs`,
  :func:`format_plan`: the layout and its memory/communication costs.
- :mod:`recopt.distributed.simulate`: the paper model for T = 8 … 4096.

TorchRec is imported lazily: without it, everything except the pure layout
and cost helpers raises an error naming ``pip install 'recopt[rec]'``.
"""
from .launch import DistributedJobError, RankContext, init_from_env, init_process_group, launch
from .plan import (Layout2D, LayoutError, PlanCosts, TableShard, TableSpec, check_layout, format_plan,
                   place_tables, plan_costs)

__all__ = ["shard_2d", "Sharded2DModel", "describe_plan", "launch", "init_from_env", "init_process_group", "RankContext",
           "DistributedJobError", "Layout2D", "LayoutError", "TableSpec", "TableShard", "PlanCosts",
           "check_layout", "place_tables", "plan_costs", "format_plan", "find_collections", "make_plan"]


def __getattr__(name):
    if name in ("shard_2d", "Sharded2DModel", "describe_plan", "find_collections", "make_plan", "remap_plan",
                "table_specs"):
        from . import sharded

        return getattr(sharded, name)
    raise AttributeError(f"module 'recopt.distributed' has no attribute {name!r}")
