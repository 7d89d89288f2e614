"""Kunlun's efficiency passes (architecture changes; retrain after them).

Importing this package registers the graph passes ``compskip``,
``sliding_window`` (and its exact variant ``band_attention``) and ``hsp``.
Event-level personalization is a config transform, not a graph pass:
:func:`recopt.models.personalize_event_towers` (beside the models it rebuilds).
"""
from . import compskip, hsp, window  # noqa: F401  (registers the passes)
from .compskip import CompSkip, CompSkipConfig
from .hsp import HSPConfig, PMAToHSP
from recopt.ops.local_attention import band_attention_reference, local_attention  # re-exported (run-time op)
from .window import BandAttention, SlidingWindow, SlidingWindowConfig

__all__ = ["CompSkip", "CompSkipConfig", "PMAToHSP", "HSPConfig", "SlidingWindow", "BandAttention",
           "SlidingWindowConfig", "local_attention", "band_attention_reference"]
