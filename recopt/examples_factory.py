"""Factories for the bundled models, used by the CLI as ``recopt:<name>``.

Each returns ``(model, example_inputs)`` for a small MovieLens-shaped feature
spec (random example batch), so the command line can be tried without
writing a model file: ``recopt optimize recopt:kunlun``.
"""
from __future__ import annotations


def movielens_like_spec(max_seq_len: int = 32):
    """A FeatureSpec shaped like the MovieLens CTR task (user, movie, genres; two event types)."""
    from .data import FeatureSpec

    return FeatureSpec(
        n_dense=4,
        sparse_cardinalities=(611, 9743, 21),
        seq_feature_tables=(1, 2),
        max_seq_len=max_seq_len,
        event_names=("liked", "not_liked"),
        sparse_names=("user", "movie", "genre"),
    )


def bundled_factory(name: str):
    """A zero-argument factory for bundled model ``name`` (interformer, kunlun, dlrm, dlrm_torchrec)."""
    from .models import MODELS

    if name not in MODELS:
        raise ValueError(f"unknown bundled model {name!r}; choose one of {', '.join(sorted(MODELS))}")

    def build():
        import torch

        from .data import example_batch
        from .models import build_model

        torch.manual_seed(0)
        spec = movielens_like_spec()
        model = build_model(name, spec).eval()
        return model, example_batch(spec, batch_size=8).inputs()

    return build
