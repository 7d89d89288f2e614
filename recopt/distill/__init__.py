"""ExFM external distillation (arXiv 2502.17494; docs/exfm.md): a foundation-model teacher serving several students.

- :mod:`~recopt.distill.das` — data augmentation system: teacher predictions logged once per
  unique example on disk (Parquet, needs ``pip install 'recopt[distill]'``) and shared by students;
- :mod:`~recopt.ops.grad_scale` — GS_β, identity forward / gradient × β backward
  (``torch.ops.recopt.grad_scale``);
- :mod:`~recopt.distill.losses` — plain KD, auxiliary-head and adapter losses;
- :mod:`~recopt.distill.adapter` — the student adapter and Algorithm 1;
- :mod:`~recopt.distill.loop` — stream training of one teacher and several students;
- the ``aux_head`` graph pass and :func:`strip_distill_heads` live in :mod:`recopt.passes.exfm`.

pyarrow is imported only when a DAS is created.
"""
from .adapter import StudentAdapter, adapter_step, algorithm1_step
from .das import ChunkSummary, DataAugmentationSystem, StreamChunk, StudentRows
from ..modules.grad_scale import GradScale
from ..ops.grad_scale import GRAD_SCALE_OP, grad_scale
from .losses import ExFMLossConfig, aux_head_loss, kd_loss, label_scale

__all__ = ["StudentAdapter", "adapter_step", "algorithm1_step", "ChunkSummary", "DataAugmentationSystem",
           "StreamChunk", "StudentRows", "GRAD_SCALE_OP", "GradScale", "grad_scale", "ExFMLossConfig",
           "aux_head_loss", "kd_loss", "label_scale"]
