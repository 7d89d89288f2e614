"""Which parts of a model behave differently in train and eval mode.

``optimize`` captures a separate train-mode graph only where the model has
such parts, so models without them pay for one capture and one pass run.
A module counts as mode-dependent when it is one of torch's layers that
read ``self.training`` (batch/instance norm; dropout, attention and RNNs
with a non-zero dropout probability; transformer layers through those
children) or when its class's source mentions
``.training`` (``F.dropout(x, training=self.training)``, hand-written
batch statistics). A class whose source cannot be read counts as
mode-dependent: when unsure, capture both.
"""
from __future__ import annotations

import inspect
from functools import lru_cache

import torch.nn as nn

_TORCH_MODE_DEPENDENT = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)
# Dependent only with a non-zero dropout probability. Transformer layers are
# judged by their children (their dropouts and attention), which
# named_modules visits too.
_DROPOUT_ATTRIBUTE = (
    (nn.modules.dropout._DropoutNd, "p"),
    (nn.MultiheadAttention, "dropout"),
    (nn.RNNBase, "dropout"),
)
# torch.nn containers and layers whose behaviour never depends on the mode.
_SAFE_PACKAGES = ("torch.nn.modules.", "torch.fx.")


@lru_cache(maxsize=None)
def _class_reads_training(cls: type) -> bool:
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        if klass.__module__.startswith(_SAFE_PACKAGES):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            return True
        if ".training" in source or "training=" in source:
            return True
    return False


def mode_dependent_modules(model: nn.Module) -> list:
    """``"path (Class)"`` for each module whose output or state depends on train/eval mode."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, _TORCH_MODE_DEPENDENT) or _class_reads_training(type(m)) or any(
                isinstance(m, cls) and float(getattr(m, attr, 1.0)) != 0.0 for cls, attr in _DROPOUT_ATTRIBUTE):
            out.append(f"{name or '(root)'} ({type(m).__name__})")
    return out
