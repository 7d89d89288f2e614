"""Attention passes by job: ``decompose`` (open encoder leaves, at the front).

The ``gdpa`` fusion pass itself lives in :mod:`recopt.passes.gdpa_fusion`."""
from . import decompose  # noqa: F401  (registers decompose_attention)
