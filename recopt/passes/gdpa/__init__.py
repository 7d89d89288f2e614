"""Attention rewrites by job.

- :mod:`.decompose` — the ``decompose_attention`` pass: opens encoder and
  ``nn.MultiheadAttention`` leaves into plain ops (runs first);
- :mod:`.sdpa` — SDPA calls (those of opened MHAs included) → GDPA softmax mode;
- :mod:`.pffn` — PFFN re-association;
- :mod:`.emit` — graph-building helpers they share.

The ``gdpa`` pass (:mod:`recopt.passes.gdpa_fusion`) drives the attention chain
(matched by :mod:`recopt.graph.attention`), ``sdpa`` and ``pffn``.
"""
from . import decompose  # noqa: F401  (registers decompose_attention)
