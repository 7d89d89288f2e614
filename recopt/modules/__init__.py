"""nn.Modules that optimized graphs call at run time.

A pass that puts a module into a graph builds it from here (functions and
custom ops come from :mod:`recopt.ops`), never from a pass module or from
:mod:`recopt.models`: the graph keeps working wherever the pass that made it
lives, and ``recopt.models`` may import from here, never the other way.

- :mod:`recopt.modules.attention`: ``MultiHeadAttention`` and Kunlun's ``HSP``
  (inserted by the ``hsp`` pass; also built by the bundled Kunlun model).
- :mod:`recopt.modules.scheduled_encoder`: ``ScheduledEncoderLayer`` /
  ``ScheduledEncoder``, torch.nn encoder layers with a CompSkip schedule and/or
  a sliding window (inserted by ``compskip``, ``sliding_window``,
  ``band_attention``).
- :mod:`recopt.modules.blocknorm`: ``BlockNorm`` (inserted by the FP8
  ``blocknorm`` mod).
- :mod:`recopt.modules.grad_scale`: ``GradScale``, the module form of
  ``torch.ops.recopt.grad_scale`` (ExFM's GS_β).
"""
